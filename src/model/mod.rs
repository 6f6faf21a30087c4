//! Models: loading Hugging Face folders and our own BERT definition (LoRA must reach inside,
//! and the training forward must use only differentiable ops).

pub mod bert;
pub mod ops;

pub use bert::{BertClassifier, BertConfig};

use std::path::PathBuf;

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
