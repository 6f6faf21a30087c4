//! The validated plan: what a run will do, with defaults resolved.

use super::{ConfigError, RawConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// How the noise multiplier is decided.
#[derive(Debug, Clone, PartialEq)]
pub enum NoiseSpec {
    /// Calibrate σ so the planned steps spend at most ε = target.
    TargetEpsilon(f64),
    /// Use this σ; ε is whatever the steps spend.
    NoiseMultiplier(f64),
}

/// The optimiser and its own settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    AdamW { eps: f64 },
    Sgd { momentum: f64 },
}

/// Learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    /// Linear decay to 0 at the last planned step.
    Linear,
}

pub use crate::accounting::AccountantKind;

/// Where a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA GPU by ordinal (needs a build with `--features cuda`).
    Cuda(usize),
}

impl DeviceSpec {
    /// "cpu", "cuda" (= GPU 0) or "cuda:N".
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("unsupported device `{s}` (expected cpu, cuda or cuda:N)")),
            },
        }
    }

    pub fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// The default dtype of the frozen base weights on this device: f32 on the CPU (its fast
    /// path), bf16 on a GPU (tensor cores, half the memory).
    pub fn default_base_dtype(self) -> candle_core::DType {
        match self {
            DeviceSpec::Cpu => candle_core::DType::F32,
            DeviceSpec::Cuda(_) => candle_core::DType::BF16,
        }
    }

    /// Opens the device. A CUDA device in a build without the `cuda` feature is an error.
    pub fn open(self) -> candle_core::Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => candle_core::bail!(
                "device {}: this dptrain was built without CUDA support (build with `--features cuda`)",
                self.name()
            ),
        }
    }
}

/// Parses a base-weight dtype name.
pub fn parse_base_dtype(s: &str) -> Result<candle_core::DType, String> {
    match s {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        _ => Err(format!("unsupported dtype `{s}` (expected f32, bf16 or f16)")),
    }
}

pub use crate::model::llama::LLAMA_LORA_MODULES;

/// Module names a BERT layer exposes to LoRA.
pub const BERT_LORA_MODULES: [&str; 6] =
    ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

#[derive(Debug, Clone)]
pub struct Plan {
    pub config_path: PathBuf,
    /// sha256 of the config file's bytes.
    pub config_hash: String,
    pub config_text: String,
    pub model_dir: PathBuf,
    pub max_seq_len: usize,
    pub train_path: PathBuf,
    pub test_path: PathBuf,
    pub labels: Option<Vec<String>>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// LoRA targets as configured; `None` = the architecture's default (see
    /// `model::Architecture::default_lora_targets`).
    pub target_modules: Option<Vec<String>>,
    pub lora_layers: Option<Vec<usize>>,
    pub noise: NoiseSpec,
    pub delta: f64,
    pub clip_norm: f64,
    pub clip_kind: crate::privacy::ClipKind,
    pub accountant: AccountantKind,
    pub tuned_on_private_data: bool,
    pub expected_batch_size: usize,
    pub max_physical_batch: usize,
    /// Whether the config sets `training.max-physical-batch` (else the run chooses it from its
    /// memory plan, `memory::MemoryPlan`, at most `max_physical_batch`).
    pub max_physical_batch_configured: bool,
    /// `training.max-memory-gib` in bytes: the memory plan's budget instead of the device's
    /// available memory (when smaller).
    pub max_memory: Option<u64>,
    /// Padded-token bound per micro-batch (`training.max-tokens`).
    pub max_tokens: Option<usize>,
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    /// Epochs of the DP linear probe before the LoRA steps (0: none).
    pub linear_probe_epochs: f64,
    pub linear_probe_learning_rate: f64,
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    /// `training.ema-decay`: release the moving average of the LoRA-phase iterates (None: the
    /// last step's parameters).
    pub ema_decay: Option<f64>,
    pub seed: Option<u64>,
    pub device: DeviceSpec,
    /// dtype of the frozen linear weights as configured (`model.dtype`); see `base_dtype()`.
    pub model_dtype: Option<candle_core::DType>,
    /// Quantization of the frozen linear weights (`model.quantize`), if any.
    pub model_quant: Option<crate::model::quant::QuantFormat>,
    /// Quantization of the token embedding and LM head (`model.quantize-vocab`), if any.
    pub model_quant_vocab: Option<crate::model::quant::QuantFormat>,
    /// The GGML types of the blocks the model folder stores (`dptrain convert --keep-quantized`:
    /// `model::quant::STORED_FILE`), if it does.
    pub model_stored_quant: Option<Vec<&'static str>>,
    /// Whether those stored blocks include the token embedding or the LM head.
    pub model_stored_vocab: bool,
    /// Checkpoint interval in steps (0: only after the last step).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Keep the final checkpoint after a finished run (default: deleted).
    pub keep_final_checkpoint: bool,
    pub output_dir: PathBuf,
    /// The `[tune]` table (`dptrain tune`), if any.
    pub tune: Option<TuneSpec>,
}

/// A private hyper-parameter search (`[tune]`, see `crate::tune`).
#[derive(Debug, Clone, PartialEq)]
pub struct TuneSpec {
    pub validation: PathBuf,
    pub mean_trials: f64,
    pub trials_shape: f64,
    pub score_noise: f64,
    /// Listed values per setting; an empty list keeps the config's value.
    pub learning_rate: Vec<f64>,
    pub clip_norm: Vec<f64>,
    pub epochs: Vec<f64>,
    pub expected_batch_size: Vec<usize>,
    pub linear_probe_epochs: Vec<f64>,
    pub linear_probe_learning_rate: Vec<f64>,
}

fn tune_spec(raw: &super::raw::RawTune, steps_given: bool, path: &Path) -> Result<TuneSpec, ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Invalid { path: path.into(), key: key.into(), message };
    let mean_trials = raw.mean_trials.unwrap_or(4.0);
    if !(mean_trials > 1.0 && mean_trials.is_finite()) {
        return Err(bad("tune.mean-trials", format!("must be a number > 1, got {mean_trials}")));
    }
    let trials_shape = raw.trials_shape.unwrap_or(0.0);
    if !(trials_shape >= 0.0 && trials_shape.is_finite()) {
        return Err(bad("tune.trials-shape", format!("must be a number ≥ 0, got {trials_shape}")));
    }
    let score_noise = raw.score_noise.unwrap_or(10.0);
    if !(score_noise > 0.0 && score_noise.is_finite()) {
        return Err(bad("tune.score-noise", format!("must be a positive number, got {score_noise}")));
    }
    let positive = |key: &str, v: &Option<Vec<f64>>, zero_ok: bool| -> Result<Vec<f64>, ConfigError> {
        let v = v.clone().unwrap_or_default();
        if let Some(x) = v.iter().find(|&&x| !(x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)))) {
            return Err(bad(
                &format!("tune.{key}"),
                format!("every value must be {}, got {x}", if zero_ok { "≥ 0" } else { "positive" }),
            ));
        }
        Ok(v)
    };
    let lists =
        [&raw.learning_rate, &raw.clip_norm, &raw.epochs, &raw.linear_probe_epochs, &raw.linear_probe_learning_rate];
    if lists.iter().all(|l| l.as_ref().is_none_or(|v| v.is_empty()))
        && raw.expected_batch_size.as_ref().is_none_or(|v| v.is_empty())
    {
        return Err(bad(
            "tune",
            "lists no setting to search: give at least one of learning-rate, clip-norm, epochs, expected-batch-size, linear-probe-epochs, linear-probe-learning-rate".into(),
        ));
    }
    if steps_given && raw.epochs.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad(
            "tune.epochs",
            "the config fixes training.steps; search epochs with training.epochs instead".into(),
        ));
    }
    let expected_batch_size = raw.expected_batch_size.clone().unwrap_or_default();
    if expected_batch_size.contains(&0) {
        return Err(bad("tune.expected-batch-size", "every value must be at least 1".into()));
    }
    Ok(TuneSpec {
        validation: raw.validation.clone(),
        mean_trials,
        trials_shape,
        score_noise,
        learning_rate: positive("learning-rate", &raw.learning_rate, false)?,
        clip_norm: positive("clip-norm", &raw.clip_norm, false)?,
        epochs: positive("epochs", &raw.epochs, false)?,
        expected_batch_size,
        linear_probe_epochs: positive("linear-probe-epochs", &raw.linear_probe_epochs, true)?,
        linear_probe_learning_rate: positive("linear-probe-learning-rate", &raw.linear_probe_learning_rate, false)?,
    })
}

impl Plan {
    pub fn from_raw(raw: RawConfig, path: &Path, text: &str) -> Result<Plan, ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid { path: path.into(), key: key.into(), message };
        let p = &raw.privacy;
        let noise = match (p.target_epsilon, p.noise_multiplier) {
            (Some(e), None) if e > 0.0 && e.is_finite() => NoiseSpec::TargetEpsilon(e),
            (Some(e), None) => {
                return Err(bad("privacy.target-epsilon", format!("must be a positive number, got {e}")))
            }
            (None, Some(s)) if s > 0.0 && s.is_finite() => NoiseSpec::NoiseMultiplier(s),
            (None, Some(s)) => {
                return Err(bad("privacy.noise-multiplier", format!("must be a positive number, got {s}")))
            }
            (Some(_), Some(_)) => {
                return Err(bad("privacy", "give either target-epsilon or noise-multiplier, not both".into()))
            }
            (None, None) => return Err(bad("privacy", "give target-epsilon or noise-multiplier".into())),
        };
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err(bad("privacy.delta", format!("must be in (0, 1), got {}", p.delta)));
        }
        if !(p.clip_norm > 0.0 && p.clip_norm.is_finite()) {
            return Err(bad("privacy.clip-norm", format!("must be a positive number, got {}", p.clip_norm)));
        }
        let clip_kind = match (p.clipping.as_deref().unwrap_or("flat"), p.automatic_clipping_stability) {
            ("flat", None) => crate::privacy::ClipKind::Flat,
            ("flat", Some(_)) => {
                return Err(bad(
                    "privacy.automatic-clipping-stability",
                    "only applies to clipping = \"automatic\"".into(),
                ))
            }
            ("per-layer", None) => crate::privacy::ClipKind::PerLayer,
            ("per-layer", Some(_)) => {
                return Err(bad(
                    "privacy.automatic-clipping-stability",
                    "only applies to clipping = \"automatic\"".into(),
                ))
            }
            ("automatic", g) => {
                let stability = g.unwrap_or(0.01);
                if !(stability > 0.0 && stability.is_finite()) {
                    return Err(bad(
                        "privacy.automatic-clipping-stability",
                        format!("must be a positive number, got {stability}"),
                    ));
                }
                crate::privacy::ClipKind::Automatic { stability }
            }
            (other, _) => {
                return Err(bad(
                    "privacy.clipping",
                    format!("unknown clipping `{other}` (supported: flat, automatic, per-layer)"),
                ))
            }
        };
        let accountant = match p.accountant.as_deref() {
            None => AccountantKind::default(),
            Some(a) => AccountantKind::parse(a).map_err(|e| bad("privacy.accountant", e))?,
        };
        let t = &raw.training;
        if t.expected_batch_size == 0 {
            return Err(bad("training.expected-batch-size", "must be at least 1".into()));
        }
        let max_physical_batch = t.max_physical_batch.unwrap_or(crate::memory::DEFAULT_MICRO_BATCH);
        if max_physical_batch == 0 {
            return Err(bad("training.max-physical-batch", "must be at least 1".into()));
        }
        match (t.steps, t.epochs) {
            (Some(0), None) => return Err(bad("training.steps", "must be at least 1".into())),
            (None, Some(e)) if !(e > 0.0 && e.is_finite()) => {
                return Err(bad("training.epochs", format!("must be a positive number, got {e}")))
            }
            (Some(_), Some(_)) => return Err(bad("training", "give either steps or epochs, not both".into())),
            (None, None) => return Err(bad("training", "give steps or epochs".into())),
            _ => {}
        }
        let learning_rate = t.learning_rate.unwrap_or(1e-3);
        if !(learning_rate > 0.0 && learning_rate.is_finite()) {
            return Err(bad("training.learning-rate", format!("must be a positive number, got {learning_rate}")));
        }
        let linear_probe_epochs = t.linear_probe_epochs.unwrap_or(0.0);
        if !(linear_probe_epochs >= 0.0 && linear_probe_epochs.is_finite()) {
            return Err(bad("training.linear-probe-epochs", format!("must be ≥ 0, got {linear_probe_epochs}")));
        }
        let linear_probe_learning_rate = t.linear_probe_learning_rate.unwrap_or(learning_rate);
        if !(linear_probe_learning_rate > 0.0 && linear_probe_learning_rate.is_finite()) {
            return Err(bad(
                "training.linear-probe-learning-rate",
                format!("must be a positive number, got {linear_probe_learning_rate}"),
            ));
        }
        if t.linear_probe_learning_rate.is_some() && linear_probe_epochs == 0.0 {
            return Err(bad("training.linear-probe-learning-rate", "set without training.linear-probe-epochs".into()));
        }
        let weight_decay = t.weight_decay.unwrap_or(0.0);
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return Err(bad("training.weight-decay", format!("must be ≥ 0, got {weight_decay}")));
        }
        let device = DeviceSpec::parse(t.device.as_deref().unwrap_or("cpu")).map_err(|e| bad("training.device", e))?;
        let model_dtype = match raw.model.dtype.as_deref() {
            None => None,
            Some(d) => Some(parse_base_dtype(d).map_err(|e| bad("model.dtype", e))?),
        };
        let model_quant = match raw.model.quantize.as_deref() {
            None => None,
            Some(q) => Some(crate::model::quant::QuantFormat::parse(q).map_err(|e| bad("model.quantize", e))?),
        };
        let model_quant_vocab = match raw.model.quantize_vocab.as_deref() {
            None => None,
            Some(q) => Some(crate::model::quant::QuantFormat::parse(q).map_err(|e| bad("model.quantize-vocab", e))?),
        };
        if model_quant_vocab.is_some() && model_dtype.is_some_and(|d| d != candle_core::DType::F32) {
            return Err(bad(
                "model.dtype",
                "a quantized embedding and head (model.quantize-vocab) are dequantized to f32 for each use: leave model.dtype unset or f32"
                    .into(),
            ));
        }
        let model_stored_quant =
            crate::model::quant::stored_formats(&raw.model.path).map_err(|e| bad("model.path", e.to_string()))?;
        if model_stored_quant.is_some() {
            let stored = format!(
                "the model folder holds quantized linear weights ({}, from dptrain convert --keep-quantized)",
                crate::model::quant::STORED_FILE
            );
            if model_quant.is_some() {
                return Err(bad("model.quantize", format!("{stored}, used as they are: leave model.quantize unset")));
            }
            if model_dtype.is_some_and(|d| d != candle_core::DType::F32) {
                return Err(bad(
                    "model.dtype",
                    format!("{stored}, dequantized to f32 for each product: leave model.dtype unset or f32"),
                ));
            }
        }
        let model_stored_vocab =
            crate::model::quant::stored_vocab(&raw.model.path).map_err(|e| bad("model.path", e.to_string()))?;
        if model_stored_vocab && model_quant_vocab.is_some() {
            return Err(bad(
                "model.quantize-vocab",
                format!(
                    "the model folder holds its embedding or LM head as blocks already ({}): leave model.quantize-vocab unset",
                    crate::model::quant::STORED_FILE
                ),
            ));
        }
        if model_quant.is_some() && model_dtype.is_some_and(|d| d != candle_core::DType::F32) {
            return Err(bad(
                "model.dtype",
                "a quantized base (model.quantize) is dequantized to f32 for each product: leave model.dtype unset or f32"
                    .into(),
            ));
        }
        if let Some(d) = t.ema_decay {
            if !(d > 0.0 && d < 1.0) {
                return Err(bad("training.ema-decay", format!("must be in (0, 1), got {d}")));
            }
        }
        if t.adam_eps.is_some() && t.optimizer.as_deref() == Some("sgd") {
            return Err(bad("training.adam-eps", "only applies to optimizer = \"adamw\"".into()));
        }
        let optimizer = match (t.optimizer.as_deref().unwrap_or("adamw"), t.momentum) {
            ("adamw", None) => {
                let eps = t.adam_eps.unwrap_or(1e-8);
                if !(eps > 0.0 && eps.is_finite()) {
                    return Err(bad("training.adam-eps", format!("must be a positive number, got {eps}")));
                }
                OptimizerKind::AdamW { eps }
            }
            ("adamw", Some(_)) => {
                return Err(bad(
                    "training.momentum",
                    "only applies to optimizer = \"sgd\" (AdamW has its own betas)".into(),
                ))
            }
            ("sgd", m) => {
                let momentum = m.unwrap_or(0.9);
                if !(0.0..1.0).contains(&momentum) {
                    return Err(bad("training.momentum", format!("must be in [0, 1), got {momentum}")));
                }
                OptimizerKind::Sgd { momentum }
            }
            (other, _) => {
                return Err(bad("training.optimizer", format!("unknown optimizer `{other}` (supported: adamw, sgd)")))
            }
        };
        let lr_schedule = match t.lr_schedule.as_deref().unwrap_or("constant") {
            "constant" => LrSchedule::Constant,
            "linear" => LrSchedule::Linear,
            other => {
                return Err(bad(
                    "training.lr-schedule",
                    format!("unknown schedule `{other}` (supported: constant, linear)"),
                ))
            }
        };
        let l = &raw.lora;
        let lora_rank = l.rank.unwrap_or(8);
        if lora_rank == 0 {
            return Err(bad("lora.rank", "must be at least 1".into()));
        }
        let lora_alpha = l.alpha.unwrap_or(16.0);
        if !(lora_alpha > 0.0 && lora_alpha.is_finite()) {
            return Err(bad("lora.alpha", format!("must be a positive number, got {lora_alpha}")));
        }
        let target_modules = l.target_modules.clone();
        if let Some(targets) = &target_modules {
            if targets.is_empty() {
                return Err(bad("lora.target-modules", "must name at least one module".into()));
            }
            // Checked against the model's own list when it is loaded; here, names no family has.
            for m in targets {
                let distil = crate::model::bert::DISTILBERT_LORA_MODULES;
                let phi3 = crate::model::llama::PHI3_LORA_MODULES;
                if !BERT_LORA_MODULES.contains(&m.as_str())
                    && !LLAMA_LORA_MODULES.contains(&m.as_str())
                    && !distil.iter().any(|(d, _)| d == m)
                    && !phi3.contains(&m.as_str())
                {
                    return Err(bad(
                        "lora.target-modules",
                        format!(
                            "`{m}` matches no linear layer (BERT: {}; DistilBERT: {}; Llama: {}; Phi-3: {})",
                            BERT_LORA_MODULES.join(", "),
                            distil.iter().map(|(d, _)| *d).collect::<Vec<_>>().join(", "),
                            LLAMA_LORA_MODULES.join(", "),
                            phi3.join(", ")
                        ),
                    ));
                }
            }
        }
        let lora_layers = match &l.layers {
            Some(v) if v.is_empty() => return Err(bad("lora.layers", "must name at least one layer".into())),
            Some(v) => {
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                Some(v)
            }
            None => None,
        };
        let labels = match &raw.data.labels {
            Some(v) => {
                let mut sorted = v.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != v.len() || v.len() < 2 {
                    return Err(bad("data.labels", "must list at least 2 distinct labels".into()));
                }
                Some(v.clone())
            }
            None => None,
        };
        let max_seq_len = raw.model.max_seq_len.unwrap_or(128);
        if max_seq_len < 2 {
            return Err(bad("model.max-seq-len", "must be at least 2 ([CLS] and [SEP])".into()));
        }
        Ok(Plan {
            config_path: path.into(),
            config_hash: hex_sha256(text.as_bytes()),
            config_text: text.into(),
            model_dir: raw.model.path,
            max_seq_len,
            train_path: raw.data.train,
            test_path: raw.data.test,
            labels,
            lora_rank,
            lora_alpha,
            target_modules,
            lora_layers,
            noise,
            delta: p.delta,
            clip_norm: p.clip_norm,
            clip_kind,
            accountant,
            tuned_on_private_data: p.hyperparameters_tuned_on_private_data.ok_or_else(|| {
                bad(
                    "privacy.hyperparameters-tuned-on-private-data",
                    "is required: state true or false (were the hyper-parameters chosen by looking at results on this private data?); the report quotes it".into(),
                )
            })?,
            expected_batch_size: t.expected_batch_size,
            max_physical_batch,
            max_physical_batch_configured: t.max_physical_batch.is_some(),
            max_memory: match t.max_memory_gib {
                None => None,
                Some(g) if g > 0.0 && g.is_finite() => Some((g * (1u64 << 30) as f64) as u64),
                Some(g) => return Err(bad("training.max-memory-gib", format!("must be a positive number, got {g}"))),
            },
            max_tokens: match t.max_tokens {
                Some(0) => return Err(bad("training.max-tokens", "must be at least 1".into())),
                m => m,
            },
            steps: t.steps,
            epochs: t.epochs,
            linear_probe_epochs,
            linear_probe_learning_rate,
            optimizer,
            learning_rate,
            weight_decay,
            warmup_steps: t.warmup_steps.unwrap_or(0),
            ema_decay: t.ema_decay,
            lr_schedule,
            seed: t.seed,
            device,
            model_dtype,
            model_quant,
            model_quant_vocab,
            model_stored_quant,
            model_stored_vocab,
            checkpoint_every: t.checkpoint_every.unwrap_or(50),
            keep_checkpoints: match t.keep_checkpoints {
                Some(0) => return Err(bad("training.keep-checkpoints", "must be at least 1".into())),
                k => k.unwrap_or(2),
            },
            keep_final_checkpoint: t.keep_final_checkpoint.unwrap_or(false),
            tune: raw.tune.as_ref().map(|t| tune_spec(t, raw.training.steps.is_some(), path)).transpose()?,
            output_dir: raw.output.dir,
        })
    }

    /// dtype of the frozen base weights: as configured, else the device's default.
    /// f32 for a quantized base, configured or stored (its products run in f32).
    pub fn base_dtype(&self) -> candle_core::DType {
        if self.model_quant.is_some() || self.model_quant_vocab.is_some() || self.model_stored_quant.is_some() {
            return candle_core::DType::F32;
        }
        self.model_dtype.unwrap_or_else(|| self.device.default_base_dtype())
    }

    /// How the frozen base weights are stored: `base_dtype()` and the quantization, if any.
    pub fn base_format(&self) -> crate::model::quant::BaseFormat {
        crate::model::quant::BaseFormat {
            dtype: self.base_dtype(),
            quant: self.model_quant,
            quant_vocab: self.model_quant_vocab,
        }
    }

    /// The micro-batch bounds of training and evaluation.
    pub fn micro_batch_limits(&self) -> crate::data::MicroBatchLimits {
        crate::data::MicroBatchLimits { examples: self.max_physical_batch, tokens: self.max_tokens }
    }

    /// Planned logical steps for a training set of `n` records: the linear probe's, then LoRA's.
    pub fn planned_steps(&self, n: usize) -> u64 {
        self.probe_steps(n) + self.lora_steps(n)
    }

    /// Steps of the linear probe (the first ones of the run): round(epochs · N / L), at least 1
    /// when a probe is configured.
    pub fn probe_steps(&self, n: usize) -> u64 {
        if self.linear_probe_epochs == 0.0 {
            return 0;
        }
        ((self.linear_probe_epochs * n as f64 / self.expected_batch_size as f64).round() as u64).max(1)
    }

    /// Steps of LoRA training (after the probe's).
    pub fn lora_steps(&self, n: usize) -> u64 {
        match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => ((e * n as f64 / self.expected_batch_size as f64).round() as u64).max(1),
            (None, None) => unreachable!("validated in from_raw"),
        }
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
train = "a.jsonl"
test = "b.jsonl"
[privacy]
target-epsilon = 3.0
delta = 1e-5
clip-norm = 1.0
hyperparameters-tuned-on-private-data = false
[training]
expected-batch-size = 8
steps = 3
[output]
dir = "out"
"#;

    fn plan(text: &str) -> Result<Plan, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "t.toml".into(), message: e.to_string() })?;
        Plan::from_raw(raw, Path::new("t.toml"), text)
    }

    fn err(text: &str) -> String {
        plan(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_resolved() {
        let p = plan(BASE).unwrap();
        assert_eq!(p.lora_rank, 8);
        assert_eq!(p.target_modules, None);
        assert_eq!(p.max_seq_len, 128);
        assert_eq!(p.noise, NoiseSpec::TargetEpsilon(3.0));
        assert_eq!(p.planned_steps(1000), 3);
        assert!(p.seed.is_none());
    }

    #[test]
    fn both_noise_settings_or_neither_is_an_error() {
        assert!(err(&BASE.replace("clip-norm = 1.0", "clip-norm = 1.0\nnoise-multiplier = 1.0")).contains("not both"));
        assert!(err(&BASE.replace("target-epsilon = 3.0", "")).contains("target-epsilon or noise-multiplier"));
    }

    #[test]
    fn unknown_lora_target_and_empty_layer_list_are_errors() {
        let e = err(&format!("{BASE}[lora]\ntarget-modules = [\"qkv\"]\n"));
        assert!(e.contains("lora.target-modules") && e.contains("qkv"), "{e}");
        assert!(err(&format!("{BASE}[lora]\nlayers = []\n")).contains("lora.layers"));
    }

    #[test]
    fn a_quantized_base_computes_in_f32_on_any_device_and_refuses_another_dtype() {
        let q = |extra: &str| BASE.replace("path = \"m\"", &format!("path = \"m\"\n{extra}"));
        let p = plan(&q("quantize = \"q4_k\"").replace("steps = 3", "steps = 3\ndevice = \"cuda\"")).unwrap();
        assert_eq!(p.model_quant, Some(crate::model::quant::QuantFormat::Q4K));
        assert_eq!(p.base_format().dtype, candle_core::DType::F32, "not the GPU's bf16 default");
        assert_eq!(plan(BASE).unwrap().base_format().quant, None);
        let e = err(&q("quantize = \"q8_0\"\ndtype = \"bf16\""));
        assert!(e.contains("model.dtype") && e.contains("f32"), "{e}");
        let e = err(&q("quantize = \"int4\""));
        assert!(e.contains("model.quantize") && e.contains("int4"), "{e}");
        // The embedding and head alone: f32 products too, their own key in errors.
        let p = plan(&q("quantize-vocab = \"q8_0\"").replace("steps = 3", "steps = 3\ndevice = \"cuda\"")).unwrap();
        let base = p.base_format();
        assert_eq!((base.quant, base.quant_vocab), (None, Some(crate::model::quant::QuantFormat::Q8_0)));
        assert_eq!(base.dtype, candle_core::DType::F32, "not the GPU's bf16 default");
        let e = err(&q("quantize-vocab = \"q8_0\"\ndtype = \"f16\""));
        assert!(e.contains("model.dtype") && e.contains("model.quantize-vocab"), "{e}");
        let e = err(&q("quantize-vocab = \"q6_k\""));
        assert!(e.contains("model.quantize-vocab") && e.contains("q6_k"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        assert!(err(&BASE.replace("delta = 1e-5", "delta = 1.5")).contains("privacy.delta"));
        assert!(err(&BASE.replace("clip-norm = 1.0", "clip-norm = -1.0")).contains("privacy.clip-norm"));
        assert!(
            err(&BASE.replace("expected-batch-size = 8", "expected-batch-size = 0")).contains("expected-batch-size")
        );
        assert!(err(&BASE.replace("steps = 3", "steps = 3\ndevice = \"tpu\"")).contains("training.device"));
        assert!(err(&BASE.replace("steps = 3", "steps = 3\ndevice = \"cuda:x\"")).contains("training.device"));
        assert!(err(&BASE.replace("path = \"m\"", "path = \"m\"\ndtype = \"f64\"")).contains("model.dtype"));
        let gpu = plan(&BASE.replace("steps = 3", "steps = 3\ndevice = \"cuda:1\"")).unwrap();
        assert_eq!((gpu.device, gpu.base_dtype()), (DeviceSpec::Cuda(1), candle_core::DType::BF16));
        assert_eq!(plan(BASE).unwrap().base_dtype(), candle_core::DType::F32);
        assert!(err(&BASE.replace("steps = 3", "steps = 3\nlr-schedule = \"cosine\"")).contains("training.lr-schedule"));
        for d in ["0.0", "1.0", "1.5", "-0.5"] {
            let e = err(&BASE.replace("steps = 3", &format!("steps = 3\nema-decay = {d}")));
            assert!(e.contains("training.ema-decay") && e.contains("(0, 1)"), "{d}: {e}");
        }
        assert_eq!(plan(&BASE.replace("steps = 3", "steps = 3\nema-decay = 0.9")).unwrap().ema_decay, Some(0.9));
        assert_eq!(plan(BASE).unwrap().ema_decay, None);
    }

    #[test]
    fn the_tuning_statement_is_required_and_kept_as_given() {
        let e = err(&BASE.replace("hyperparameters-tuned-on-private-data = false\n", ""));
        assert!(e.contains("privacy.hyperparameters-tuned-on-private-data") && e.contains("required"), "{e}");
        let p = plan(&BASE.replace("tuned-on-private-data = false", "tuned-on-private-data = true")).unwrap();
        assert!(p.tuned_on_private_data);
        assert!(!plan(BASE).unwrap().tuned_on_private_data);
    }

    #[test]
    fn linear_probe_steps_come_first_and_count_in_the_plan() {
        let p = plan(&BASE.replace("steps = 3", "steps = 3\nlinear-probe-epochs = 0.5")).unwrap();
        assert_eq!((p.probe_steps(100), p.lora_steps(100), p.planned_steps(100)), (6, 3, 9)); // 0.5 · 100 / 8
        assert_eq!(p.linear_probe_learning_rate, p.learning_rate);
        assert_eq!(plan(BASE).unwrap().probe_steps(100), 0);
        assert!(err(&BASE.replace("steps = 3", "steps = 3\nlinear-probe-epochs = -1")).contains("linear-probe-epochs"));
        let e = err(&BASE.replace("steps = 3", "steps = 3\nlinear-probe-learning-rate = 0.1"));
        assert!(e.contains("without training.linear-probe-epochs"), "{e}");
    }

    #[test]
    fn clipping_kinds_parse_and_bad_ones_name_their_key() {
        assert_eq!(plan(BASE).unwrap().clip_kind, crate::privacy::ClipKind::Flat);
        let auto = BASE.replace("clip-norm = 1.0", "clip-norm = 1.0\nclipping = \"automatic\"");
        assert_eq!(plan(&auto).unwrap().clip_kind, crate::privacy::ClipKind::Automatic { stability: 0.01 });
        let g =
            auto.replace("clipping = \"automatic\"", "clipping = \"automatic\"\nautomatic-clipping-stability = 0.1");
        assert_eq!(plan(&g).unwrap().clip_kind, crate::privacy::ClipKind::Automatic { stability: 0.1 });
        assert!(err(&g.replace("0.1", "0")).contains("privacy.automatic-clipping-stability"));
        let per_layer = BASE.replace("clip-norm = 1.0", "clip-norm = 1.0\nclipping = \"per-layer\"");
        assert_eq!(plan(&per_layer).unwrap().clip_kind, crate::privacy::ClipKind::PerLayer);
        assert!(
            err(&BASE.replace("clip-norm = 1.0", "clip-norm = 1.0\nclipping = \"ghost\"")).contains("privacy.clipping")
        );
        let flat_g = BASE.replace("clip-norm = 1.0", "clip-norm = 1.0\nautomatic-clipping-stability = 0.1");
        assert!(err(&flat_g).contains("only applies"));
    }

    #[test]
    fn epochs_give_rounded_steps() {
        let p = plan(&BASE.replace("steps = 3", "epochs = 2.5")).unwrap();
        assert_eq!(p.planned_steps(100), 31); // 2.5 · 100 / 8 = 31.25
    }
}
