//! Classification JSONL: `{"text": string, "label": string|integer, "group"?: string}` per line.

use super::DataError;
use crate::config::hex_sha256;
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::Tokenizer;

/// One tokenised record.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub label: usize,
}

/// A tokenised classification dataset.
#[derive(Debug, Clone)]
pub struct ClassificationSet {
    pub examples: Vec<Example>,
    /// Label names; an example's `label` indexes this.
    pub labels: Vec<String>,
    /// sha256 of the file's bytes.
    pub content_hash: String,
}

impl ClassificationSet {
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

struct RawRecord {
    text: String,
    label: String,
}

fn parse_line(path: &Path, lineno: usize, line: &str) -> Result<RawRecord, DataError> {
    let err = |message: String| DataError::Record { path: path.into(), line: lineno, message };
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("malformed JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "text" | "label" | "group") {
            return Err(err(format!("unknown field `{key}` (expected text, label, group)")));
        }
    }
    let text = match obj.get("text") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(err("field `text` must be a string".into())),
        None => return Err(err("missing field `text`".into())),
    };
    let label = match obj.get("label") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(_) => return Err(err("field `label` must be a string or an integer".into())),
        None => return Err(err("missing field `label`".into())),
    };
    Ok(RawRecord { text, label })
}

/// Load and tokenise a classification file. With `labels = None` the label set is the sorted set
/// of labels in this file (the training set); with `Some(labels)` every label must be among them
/// (the test set).
pub fn load_classification(
    path: &Path,
    tokenizer: &Tokenizer,
    labels: Option<&[String]>,
) -> Result<ClassificationSet, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| DataError::Dataset { path: path.into(), message: format!("not UTF-8: {e}") })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        records.push((i + 1, parse_line(path, i + 1, line)?));
    }
    if records.is_empty() {
        return Err(DataError::Dataset { path: path.into(), message: "no records".into() });
    }
    let labels: Vec<String> = match labels {
        Some(l) => l.to_vec(),
        None => {
            let set: BTreeSet<&str> = records.iter().map(|(_, r)| r.label.as_str()).collect();
            if set.len() < 2 {
                return Err(DataError::Dataset {
                    path: path.into(),
                    message: format!("classification needs at least 2 labels, found {set:?}"),
                });
            }
            set.into_iter().map(String::from).collect()
        }
    };
    let mut label_idx = Vec::with_capacity(records.len());
    for (line, r) in &records {
        let idx = labels.iter().position(|l| *l == r.label).ok_or_else(|| DataError::Record {
            path: path.into(),
            line: *line,
            message: format!("label `{}` is not among the training labels {labels:?}", r.label),
        })?;
        label_idx.push(idx);
    }
    let texts: Vec<&str> = records.iter().map(|(_, r)| r.text.as_str()).collect();
    let encodings =
        tokenizer.encode_batch(texts, true).map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
    let examples =
        encodings.iter().zip(label_idx).map(|(enc, label)| Example { ids: enc.get_ids().to_vec(), label }).collect();
    Ok(ClassificationSet { examples, labels, content_hash: hex_sha256(&bytes) })
}
