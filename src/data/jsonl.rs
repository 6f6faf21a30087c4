//! JSONL datasets, one record (one privacy unit) per line:
//! - classification: `{"text": string, "label": string|integer, "group"?: string}`;
//! - language modelling: `{"text": string, "group"?: string}` (loss on every token after the
//!   first) or `{"prompt": string, "completion": string, "group"?: string}` (loss on the
//!   completion tokens only). A record is truncated to the model's max length, never split or
//!   packed with another record.

use super::DataError;
use crate::config::hex_sha256;
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::Tokenizer;

/// One tokenised record.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Class index (classification); 0 for language modelling.
    pub label: usize,
    /// Language modelling: the first position whose token is a prediction target (1 for plain
    /// text: every token after the first; the prompt length for prompt/completion records).
    /// `None` for classification.
    pub target_start: Option<usize>,
}

impl Example {
    /// A classification record.
    pub fn classification(ids: Vec<u32>, label: usize) -> Example {
        Example { ids, label, target_start: None }
    }
}

/// A tokenised dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Label names (classification; empty for language modelling); `label` indexes this.
    pub labels: Vec<String>,
    /// sha256 of the file's bytes.
    pub content_hash: String,
    /// Each record's `group` field (parallel to `examples`), for per-group metrics; all `None`
    /// when the file has no groups.
    pub groups: Vec<Option<String>>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    /// Does any record carry a `group`?
    pub fn has_groups(&self) -> bool {
        self.groups.iter().any(Option::is_some)
    }
}

/// A record's optional `group`: a string or an integer (written as its decimal form).
fn parse_group(obj: &JsonObject, err: impl Fn(String) -> DataError) -> Result<Option<String>, DataError> {
    match obj.get("group") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(_) => Err(err("field `group` must be a non-empty string or an integer".into())),
    }
}

struct RawRecord {
    text: String,
    label: String,
    group: Option<String>,
}

fn parse_record(path: &Path, lineno: usize, obj: &JsonObject) -> Result<RawRecord, DataError> {
    let err = |message: String| DataError::Record { path: path.into(), line: lineno, message };
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
    let group = parse_group(obj, err)?;
    Ok(RawRecord { text, label, group })
}

/// Load and tokenise a classification file. With `labels = None` the label set is the sorted set
/// of labels in this file (the training set); with `Some(labels)` every label must be among them
/// (the test set).
pub fn load_classification(
    path: &Path,
    tokenizer: &Tokenizer,
    labels: Option<&[String]>,
) -> Result<Dataset, DataError> {
    let (objects, bytes) = read_objects(path)?;
    let records = objects
        .iter()
        .map(|(line, obj)| Ok((*line, parse_record(path, *line, obj)?)))
        .collect::<Result<Vec<_>, DataError>>()?;
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
    let examples = encodings
        .iter()
        .zip(label_idx)
        .map(|(enc, label)| Example::classification(enc.get_ids().to_vec(), label))
        .collect();
    let groups = records.into_iter().map(|(_, r)| r.group).collect();
    Ok(Dataset { examples, labels, content_hash: hex_sha256(&bytes), groups })
}

type JsonObject = serde_json::Map<String, serde_json::Value>;
/// (line number, object) per record.
type Records = Vec<(usize, JsonObject)>;

/// Reads a JSONL file: (line number, parsed object) per non-blank line, and the file's bytes.
/// An empty file, a line that is not JSON or not an object is an error naming file and line.
/// The longest line (record) accepted: far more text than any `max-seq-len` keeps (a record is
/// truncated to it), and a bound on the memory one line can take while it is parsed and tokenised.
pub const MAX_LINE_BYTES: usize = 1 << 20;

fn read_objects(path: &Path) -> Result<(Records, Vec<u8>), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let err = |message: String| DataError::Record { path: path.into(), line: i + 1, message };
        if raw.len() > MAX_LINE_BYTES {
            return Err(err(format!(
                "the line is {} bytes, over the limit of {MAX_LINE_BYTES} (1 MiB) per record; records are truncated to model.max-seq-len tokens anyway: shorten it",
                raw.len()
            )));
        }
        let line = std::str::from_utf8(raw)
            .map_err(|e| err(format!("not UTF-8 (byte {} of the line)", e.valid_up_to() + 1)))?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("malformed JSON: {e}")))?;
        match v {
            serde_json::Value::Object(o) => out.push((i + 1, o)),
            _ => return Err(err("expected a JSON object".into())),
        }
    }
    if out.is_empty() {
        return Err(DataError::Dataset { path: path.into(), message: "no records".into() });
    }
    Ok((out, bytes))
}

/// Load and tokenise a language-modelling file (`{"text"}` or `{"prompt", "completion"}` records,
/// one format per file). `tokenizer` must not truncate: each record is cut here to `max_len`
/// tokens. Plain text is encoded with the tokenizer's special tokens (e.g. a BOS, if its
/// post-processor adds one); a prompt likewise, its completion without, followed by `eos` when
/// given. A record with no target token left is an error naming its line.
pub fn load_lm(path: &Path, tokenizer: &Tokenizer, max_len: usize, eos: Option<u32>) -> Result<Dataset, DataError> {
    let (objects, bytes) = read_objects(path)?;
    let mut examples = Vec::with_capacity(objects.len());
    let mut groups = Vec::with_capacity(objects.len());
    let mut format: Option<(bool, usize)> = None;
    for (line, obj) in &objects {
        let err = |message: String| DataError::Record { path: path.into(), line: *line, message };
        for key in obj.keys() {
            match key.as_str() {
                "text" | "prompt" | "completion" | "group" => {}
                "label" => return Err(err(
                    "field `label`: this is a language model (llama family); classification needs a BERT-family model"
                        .into(),
                )),
                _ => {
                    return Err(err(format!("unknown field `{key}` (expected text, or prompt and completion; group)")))
                }
            }
        }
        let string = |key: &str| -> Result<Option<&str>, DataError> {
            match obj.get(key) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(err(format!("field `{key}` must be a string"))),
            }
        };
        let is_pc = match (string("text")?, string("prompt")?, string("completion")?) {
            (Some(_), None, None) => false,
            (None, Some(_), Some(_)) => true,
            (Some(_), _, _) => return Err(err("give either `text` or `prompt` and `completion`, not both".into())),
            (None, Some(_), None) => return Err(err("missing field `completion`".into())),
            (None, None, Some(_)) => return Err(err("missing field `prompt`".into())),
            (None, None, None) => return Err(err("missing field `text` (or `prompt` and `completion`)".into())),
        };
        match format {
            None => format = Some((is_pc, *line)),
            Some((f, first)) if f != is_pc => {
                return Err(err(format!(
                    "mixes record formats: line {first} is {}, this line is {}",
                    if f { "prompt/completion" } else { "text" },
                    if is_pc { "prompt/completion" } else { "text" }
                )))
            }
            _ => {}
        }
        let encode = |s: &str, special: bool| -> Result<Vec<u32>, DataError> {
            tokenizer
                .encode(s, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer(format!("{}:{line}: {e}", path.display())))
        };
        let (mut ids, start) = if is_pc {
            let prompt = encode(string("prompt")?.expect("checked"), true)?;
            let mut completion = encode(string("completion")?.expect("checked"), false)?;
            completion.extend(eos);
            if prompt.len() >= max_len {
                return Err(err(format!(
                    "the prompt has {} tokens, leaving no completion token within model.max-seq-len = {max_len}",
                    prompt.len()
                )));
            }
            let start = prompt.len().max(1);
            let mut ids = prompt;
            ids.extend(completion);
            (ids, start)
        } else {
            (encode(string("text")?.expect("checked"), true)?, 1)
        };
        ids.truncate(max_len);
        if ids.len() <= start {
            return Err(err(format!(
                "{} token(s) after truncation: nothing to predict (a record needs at least one target token)",
                ids.len()
            )));
        }
        groups.push(parse_group(obj, err)?);
        examples.push(Example { ids, label: 0, target_start: Some(start) });
    }
    Ok(Dataset { examples, labels: Vec::new(), content_hash: hex_sha256(&bytes), groups })
}
