//! Configuration: the raw TOML schema (unknown keys are errors) and its validation into a `Plan`
//! with every default resolved and every path checked, before any heavy work starts.

mod plan;
mod raw;

pub use plan::{
    hex_sha256, parse_base_dtype, AccountantKind, DeviceSpec, LrSchedule, NoiseSpec, OptimizerKind, Plan, TuneSpec,
    BERT_LORA_MODULES,
};
pub use raw::RawConfig;

use std::path::{Path, PathBuf};

/// Errors in a configuration file, each naming the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

/// Read and validate a config file. Relative paths inside it are resolved against the current
/// directory (the README runs everything from the project root).
pub fn load(path: &Path) -> Result<Plan, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let raw: RawConfig =
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    Plan::from_raw(raw, path, &text)
}
