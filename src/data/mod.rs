//! Data: JSONL records, tokenisation, the Poisson sampler and physical micro-batches.
//!
//! Invariant: one JSONL line is one privacy unit (one example); nothing here ever merges two
//! records into one example.

mod batch;
mod jsonl;
mod sampler;

pub use batch::{make_micro_batches, Batch, FeatureCache, LmTargets, MicroBatchLimits};
pub use jsonl::{load_classification, load_lm, Dataset, Example};
pub use sampler::PoissonSampler;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Record { path: PathBuf, line: usize, message: String },
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}
