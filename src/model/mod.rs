//! Models: loading Hugging Face folders and our own model definitions (LoRA must reach inside,
//! and the training forward must use only differentiable ops): BERT-family encoders with a
//! classification head (`bert`) and Llama-family decoders for language modelling (`llama`).
//! Training sees them only through `DpModel`.

pub mod bert;
pub mod llama;
pub mod ops;

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
    /// The held-out metric of the task on `examples`, in micro-batches of `batch_size`.
    fn evaluate(&self, examples: &[crate::data::Example], batch_size: usize) -> Result<EvalResult>;
}

/// A held-out metric.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
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
pub const BERT_MODEL_TYPES: [&str; 1] = ["bert"];
pub const LLAMA_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

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
            Err(ModelError::Config {
                path,
                message: format!("unsupported architecture (model_type {mt:?}); supported: {}", known.join(", ")),
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
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file missing: {0} (run scripts/fetch-assets.sh, or check model.path)")]
    MissingFile(PathBuf),
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{file}: tensor `{name}`: {message}")]
    Tensor { file: PathBuf, name: String, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
