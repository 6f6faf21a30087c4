//! Models: loading Hugging Face folders and our own model definitions (LoRA must reach inside,
//! and the training forward must use only differentiable ops): BERT-family encoders with a
//! classification head (`bert`) and Llama-family decoders for language modelling (`llama`).
//! Training sees them only through `DpModel`.

pub mod attention;
pub mod bert;
pub mod config_keys;
pub mod fused;
pub mod fused_llama;
pub mod gelu;
pub mod llama;
pub mod ops;
pub mod probe;
pub mod quant;
pub mod score;
pub mod vexp;
pub mod vocab;

pub use bert::{BertClassifier, BertConfig};
pub use llama::{LlamaConfig, LlamaLm};

use crate::data::Batch;
use crate::lora::{LoraLinear, Tape};
use candle_core::{DType, Device, Result, Tensor};
use std::path::{Path, PathBuf};

/// What the training loop, the DP step and evaluation need from a model.
///
/// The contract that makes per-example gradients correct: `example_losses` returns one loss per
/// example of the batch, each a function of that example alone (no op mixes examples), and with
/// a tape it records every adapted layer (in `adapted_layers` order) and, for a trainable head,
/// the head. `trainable` lists the trainable tensors in the order per-example gradients use.
pub trait DpModel {
    fn device(&self) -> &Device;
    /// dtype of the frozen linear weights.
    fn base_dtype(&self) -> DType;
    /// The LoRA-adapted layers in forward (tape) order.
    fn adapted_layers(&self) -> Vec<&LoraLinear>;
    /// Trainable tensors in canonical order with their PEFT names: per adapted layer lora_A then
    /// lora_B, then the head's tensors if the model has a trainable head.
    fn trainable(&self) -> Vec<(String, Tensor)>;
    /// Replace the trainable tensors (same order and shapes as `trainable`).
    fn set_trainable(&mut self, tensors: &[Tensor]) -> Result<()>;
    /// Per-example training losses [b] (f32): cross-entropy of the label (classification) or
    /// the mean next-token cross-entropy over the example's targets (language modelling).
    fn example_losses(&self, batch: &Batch, tape: Option<&mut Tape>) -> Result<Tensor>;
    /// Hidden-state width (the feature cache stores [len, H] per example).
    fn hidden_size(&self) -> usize;
    /// Index of the lowest layer with an adapter (the number of layers when none has one).
    /// Nothing below it is trainable, so its input is a fixed function of each record.
    fn first_adapted_layer(&self) -> usize;
    /// Hidden states [b, T, H] entering layer `upto`, from the batch's tokens (no tape).
    fn prefix_hidden(&self, batch: &Batch, upto: usize) -> Result<Tensor>;
    /// The task, which fixes the data format and the held-out metric.
    fn task(&self) -> Task;
    /// Each record's contribution to the held-out metric, in micro-batches of `batch_size`.
    fn score_examples(&self, examples: &[crate::data::Example], batch_size: usize) -> Result<Vec<ExampleScore>>;
    /// Classification: the pooled features [b, H] the head reads, from the current model (no
    /// tape). At the start of a run (every LoRA B zero) these are the frozen base model's: what
    /// the linear probe (`probe`) trains the head on. Other tasks have no such features.
    fn pooled_features(&self, _batch: &Batch) -> Result<Tensor> {
        candle_core::bail!("this model has no pooled features: the linear probe needs a classification model")
    }
    /// The held-out metric of the task on `examples`.
    fn evaluate(&self, examples: &[crate::data::Example], batch_size: usize) -> Result<EvalResult> {
        Ok(EvalResult::aggregate(self.score_examples(examples, batch_size)?))
    }
}

/// One held-out record's contribution to the metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExampleScore {
    /// Classification: is the predicted class the label?
    Correct(bool),
    /// Language modelling: summed next-token NLL over the record's targets, and their count.
    Nll { sum: f64, tokens: usize },
}

/// The metric of each group of held-out records (`groups` parallel to `scores`), sorted by group
/// name; records without a group form the group [`NO_GROUP`]. Empty when no record has a group.
pub fn per_group(scores: &[ExampleScore], groups: &[Option<String>]) -> Vec<GroupMetric> {
    assert_eq!(scores.len(), groups.len(), "one group entry per score");
    if groups.iter().all(Option::is_none) {
        return Vec::new();
    }
    let mut by: std::collections::BTreeMap<&str, Vec<ExampleScore>> = Default::default();
    for (s, g) in scores.iter().zip(groups) {
        by.entry(g.as_deref().unwrap_or(NO_GROUP)).or_default().push(*s);
    }
    by.into_iter()
        .map(|(g, s)| GroupMetric { group: g.to_string(), size: s.len(), metric: EvalResult::aggregate(s) })
        .collect()
}

/// The group name of held-out records without a `group` field, when others have one.
pub const NO_GROUP: &str = "(no group)";

/// One group's held-out metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupMetric {
    pub group: String,
    /// Held-out records in the group.
    pub size: usize,
    pub metric: EvalResult,
}

/// Name of the head in adapters (saved as PEFT saves `modules_to_save`).
pub const HEAD_MODULE: &str = "classifier";

/// Load `tokenizer.json` from a model folder with padding off (batches pad themselves) and
/// truncation at `max_len` tokens (the MiniLM file ships with fixed padding to 128), or none.
pub fn load_tokenizer(dir: &Path, max_len: Option<usize>) -> std::result::Result<tokenizers::Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::MissingFile(path));
    }
    let err = |message: String| ModelError::Tokenizer { path: path.clone(), message };
    let mut tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
    tok.with_padding(None);
    tok.with_truncation(max_len.map(|max_length| tokenizers::TruncationParams { max_length, ..Default::default() }))
        .map_err(|e| err(e.to_string()))?;
    Ok(tok)
}

impl EvalResult {
    /// The metric over `scores`: accuracy when they are `Correct` (NaN for none), else perplexity
    /// exp(Σ NLL / Σ tokens) with sums in f64.
    pub fn aggregate(scores: impl IntoIterator<Item = ExampleScore>) -> EvalResult {
        let (mut n, mut correct, mut nll, mut tokens, mut lm) = (0usize, 0usize, 0f64, 0usize, false);
        for s in scores {
            n += 1;
            match s {
                ExampleScore::Correct(c) => correct += c as usize,
                ExampleScore::Nll { sum, tokens: t } => {
                    lm = true;
                    nll += sum;
                    tokens += t;
                }
            }
        }
        if lm {
            let mean_nll = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
            EvalResult::Perplexity { perplexity: mean_nll.exp(), mean_nll, tokens }
        } else {
            EvalResult::Accuracy(if n > 0 { correct as f64 / n as f64 } else { f64::NAN })
        }
    }

    /// The headline number: accuracy or perplexity.
    pub fn value(&self) -> f64 {
        match *self {
            EvalResult::Accuracy(a) => a,
            EvalResult::Perplexity { perplexity, .. } => perplexity,
        }
    }

    /// "accuracy" or "perplexity".
    pub fn name(&self) -> &'static str {
        match self {
            EvalResult::Accuracy(_) => "accuracy",
            EvalResult::Perplexity { .. } => "perplexity",
        }
    }
}

/// A held-out metric.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalResult {
    Accuracy(f64),
    /// exp(mean next-token NLL over all target tokens of the file), with that mean and the count.
    Perplexity {
        perplexity: f64,
        mean_nll: f64,
        tokens: usize,
    },
}

/// What a model is trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// `{"text", "label"}` records; metric: accuracy.
    Classification,
    /// `{"text"}` or `{"prompt", "completion"}` records; metric: perplexity.
    CausalLm,
}

impl Task {
    /// PEFT `task_type`.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            Task::Classification => "SEQ_CLS",
            Task::CausalLm => "CAUSAL_LM",
        }
    }
}

/// Model families dptrain implements, from `model_type` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Llama,
}

/// `model_type` values accepted per family.
pub const BERT_MODEL_TYPES: [&str; 4] = ["bert", "roberta", "xlm-roberta", "distilbert"];
pub const LLAMA_MODEL_TYPES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"];

impl Architecture {
    /// Reads `model_type` from the folder's config.json.
    pub fn detect(dir: &Path) -> std::result::Result<Architecture, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|_| ModelError::MissingFile(path.clone()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: path.clone(), message: format!("not JSON: {e}") })?;
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if BERT_MODEL_TYPES.contains(&mt) {
            Ok(Architecture::Bert)
        } else if LLAMA_MODEL_TYPES.contains(&mt) {
            Ok(Architecture::Llama)
        } else {
            let known: Vec<&str> = BERT_MODEL_TYPES.iter().chain(&LLAMA_MODEL_TYPES).copied().collect();
            let hint = match mt {
                "gemma3" => {
                    " (a multimodal Gemma 3 checkpoint: its language model sits under `text_config` and \
                     `language_model.`; dptrain reads text-only folders, model_type gemma3_text)"
                }
                _ => "",
            };
            Err(ModelError::Config {
                path,
                message: format!("unsupported architecture (model_type {mt:?}){hint}; supported: {}", known.join(", ")),
            })
        }
    }

    /// LoRA targets when the config names none (PEFT's defaults for these families).
    pub fn default_lora_targets(self) -> Vec<String> {
        let t: &[&str] = match self {
            Architecture::Bert => &["query", "value"],
            Architecture::Llama => &["q_proj", "v_proj"],
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// The same for the model in `dir` (Phi-3's query and value live in its fused `qkv_proj`).
    pub fn default_lora_targets_of(self, dir: &Path) -> std::result::Result<Vec<String>, ModelError> {
        Ok(match self {
            Architecture::Llama => LlamaConfig::from_file(&dir.join("config.json"))?.default_lora_targets(),
            Architecture::Bert => self.default_lora_targets(),
        })
    }
}

/// Every tensor in the weight files is floating point (f32, f16, bf16 or f64): an integer or
/// boolean "weight" (a quantised checkpoint, say) would otherwise be cast to float silently.
/// Integer index buffers that transformers checkpoints carry and the models here recompute
/// (`*.position_ids`, `*.token_type_ids`) are not weights and are allowed. Reads only the headers.
pub fn check_weight_dtypes(files: &[PathBuf]) -> std::result::Result<(), ModelError> {
    use std::io::Read;
    for file in files {
        let bad = |name: &str, message: String| ModelError::Tensor { file: file.clone(), name: name.into(), message };
        let mut f = std::fs::File::open(file).map_err(|_| ModelError::MissingFile(file.clone()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| bad("(header)", format!("not a safetensors file: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return Err(bad("(header)", format!("not a safetensors file (header length {n})")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| bad("(header)", format!("truncated header: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| bad("(header)", format!("header is not JSON: {e}")))?;
        for (name, info) in v.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let index_buffer = name.ends_with("position_ids") || name.ends_with("token_type_ids");
            if index_buffer && matches!(dtype, "I64" | "I32") {
                continue;
            }
            if !matches!(dtype, "F32" | "F16" | "BF16" | "F64") {
                return Err(bad(name, format!("dtype {dtype}: model weights must be floating point (F32, F16, BF16)")));
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file missing: {0} (run scripts/fetch-assets.sh, or check model.path)")]
    MissingFile(PathBuf),
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{file}: tensor `{name}`: {message}")]
    Tensor { file: PathBuf, name: String, message: String },
    /// Building the model from its weights failed (the message names the tensor or setting).
    #[error("{file}: {message}")]
    Load { file: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_weights_are_refused_naming_the_tensor() {
        let dir = std::env::temp_dir().join(format!("dptrain-dtype-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let f = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let i = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
        let w = std::collections::HashMap::from([("a.weight".to_string(), f.clone()), ("b.weight".to_string(), i)]);
        candle_core::safetensors::save(&w, &path).unwrap();
        let err = check_weight_dtypes(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert!(err.contains("b.weight") && err.contains("I64"), "{err}");
        // Index buffers such as BERT's `embeddings.position_ids` are not weights.
        let ids = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
        let ok = std::collections::HashMap::from([
            ("a.weight".to_string(), f),
            ("embeddings.position_ids".to_string(), ids),
        ]);
        candle_core::safetensors::save(&ok, &path).unwrap();
        check_weight_dtypes(&[path]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
