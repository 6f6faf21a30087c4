//! Outputs of a run, in two parts (`rundir`): the release (the adapter in the HF PEFT layout with
//! the privacy certificate in its safetensors `__metadata__`, `adapter_config.json`,
//! `privacy_report.json` / `.md`, the ε and group plots) and the private part (`run.json` with the
//! seed, commitment key and plain hashes, `metrics.jsonl`, the loss and clip plots, checkpoints).
//!
//! Invariants: nothing in the release is outside ε's cover except what `not_protected` names
//! (tested by scanning every released byte); every file is written to a temporary name, fsynced
//! and renamed, so a failure never leaves a half-written output; an output folder holding another
//! run is never overwritten without `--overwrite`.

pub mod markdown;
pub mod plots;
pub mod rundir;
pub mod verify;

use crate::accounting::event::Ledger;
use crate::config::{hex_sha256, Plan};
use crate::model::GroupMetric;
use crate::model::HEAD_MODULE;
use crate::model::{DpModel, EvalResult, Task};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const ENGINE: &str = concat!("dptrain ", env!("CARGO_PKG_VERSION"));
pub const NEIGHBOURING: &str = "add/remove-one record";
pub const SAMPLER: &str = "Poisson sampling (each record independently with probability q), ChaCha20 stream";
pub const NOISE_GENERATOR: &str = "ChaCha20 CSPRNG, counter-based (256-bit secret key; stream = step, block = coordinate pair); each N(0, σ²C²) draw is a sum of 4 Box–Muller Gaussians (f64)";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("output folder {0} already holds a run (adapter or report); pass --overwrite to replace it")]
    OutputExists(PathBuf),
    #[error("output folder {path}: {message}")]
    Unusable { path: PathBuf, message: String },
    #[error("output folder {path} is in use by {holder} (another dptrain run); wait for it to finish or choose another output folder")]
    Locked { path: PathBuf, holder: String },
    #[error("writing {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// ε by one accountant, or why it could not be computed (a cross-check that cannot be computed
/// never sinks a run: it is reported as unavailable with its reason).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Epsilon {
    Value(f64),
    Unavailable(String),
}

impl Epsilon {
    pub fn of<E: std::fmt::Display>(r: Result<f64, E>) -> Epsilon {
        match r {
            Ok(e) => Epsilon::Value(e),
            Err(e) => Epsilon::Unavailable(e.to_string()),
        }
    }

    pub fn value(&self) -> Option<f64> {
        match self {
            Epsilon::Value(e) => Some(*e),
            Epsilon::Unavailable(_) => None,
        }
    }

    /// A number, or `{"unavailable": reason}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Epsilon::Value(e) => json_number(*e),
            Epsilon::Unavailable(why) => serde_json::json!({ "unavailable": why }),
        }
    }
}

/// Where an input file is, and how it is identified: the plain sha256 (private part only) and the
/// keyed commitment (released).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct InputFile {
    pub path: String,
    pub sha256: String,
    pub commitment: String,
}

/// The run's input files.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Inputs {
    pub train: InputFile,
    pub test: InputFile,
    pub config: InputFile,
}

/// What a run did, as the report and certificate state it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub non_private: bool,
    /// ε by the run's accountant (`plan.accountant`): the certified upper bound.
    pub epsilon: Option<f64>,
    /// ε by each accountant (the other one is the cross-check).
    pub epsilon_pld: Option<Epsilon>,
    pub epsilon_rdp: Option<Epsilon>,
    pub rdp_optimal_order: Option<f64>,
    pub target_epsilon: Option<f64>,
    pub delta: f64,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub expected_batch_size: usize,
    pub steps: u64,
    pub planned_steps: u64,
    /// The first steps of the plan that trained the head alone (linear probe; 0 without one).
    pub linear_probe_steps: u64,
    /// `training.ema-decay` when the released parameters are the average of the LoRA-phase
    /// iterates (None: the last step's parameters, also when no LoRA step was taken).
    pub ema_decay: Option<f64>,
    pub clip_norm: Option<f64>,
    pub seeded: bool,
    pub dataset_size: usize,
    pub test_size: usize,
    /// The input files: plain hashes (private) and keyed commitments (released).
    pub inputs: Inputs,
    pub labels: Vec<String>,
    pub task: Task,
    /// LoRA target modules as trained (the configured ones or the architecture's default).
    pub target_modules: Vec<String>,
    /// The full names of the modules that carry LoRA adapters (PEFT module paths).
    pub adapted_modules: Vec<String>,
    /// Held-out metric after training: accuracy (classification) or perplexity (LM).
    pub test_metric: EvalResult,
    /// With `training.ema-decay`: the same metric of the last iterate, which is not released
    /// (private part only).
    pub last_iterate_test_metric: Option<EvalResult>,
    /// The same metric of the base model before training (LM runs; B = 0 is the base model).
    pub base_test_metric: Option<EvalResult>,
    /// The held-out metric per `group` of the test records (empty when they have none).
    pub test_groups: Vec<GroupMetric>,
    /// A non-private run of the same config, model and data, for comparison (`--reference`):
    /// private part only (a non-private model of the same data).
    pub reference: Option<Reference>,
    /// sha256 over the base model folder's config.json and weight files.
    pub model_hash: String,
    /// ε spent after each of a set of steps, by both accountants (empty for non-private runs).
    pub epsilon_curve: Vec<EpsilonPoint>,
    /// Private part only (with the realised batch sizes they give the number of sampled records).
    pub train_seconds: f64,
    pub examples_per_second: f64,
    pub stopped_early: Option<String>,
    pub ledger: Ledger,
    /// Private part only: the memory plan, the micro-batch size it chose and the steps' measured
    /// peak (`memory::MemoryPlan::to_json`; facts about the machine, not the data).
    pub memory: serde_json::Value,
}

impl RunSummary {
    /// Does the run certify a DP guarantee (private and not seeded)?
    pub fn certifies(&self) -> bool {
        !self.non_private && !self.seeded
    }
}

/// ε after `step` steps, by each accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct EpsilonPoint {
    pub step: u64,
    /// `None` where the accountant could not compute it (the run's own accountant never is).
    pub pld: Option<f64>,
    pub rdp: Option<f64>,
}

/// The utility of a non-private run on the same config, base model and data: the "what did
/// privacy cost" comparison. It certifies nothing.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Reference {
    /// Its output folder.
    pub dir: String,
    pub test_metric: EvalResult,
    pub test_groups: Vec<GroupMetric>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub batch_size: usize,
    pub mean_loss: f64,
    pub clipped_fraction: f64,
    pub nonfinite: usize,
    /// ε spent so far by the RDP accountant (cheap to track per step; the final certified ε is in
    /// the report).
    pub epsilon_rdp: f64,
    pub learning_rate: f64,
    pub elapsed_s: f64,
}

/// Write `bytes` to `path` atomically: temporary file in the same folder, fsync, rename. The
/// temporary name (`.NAME.tmp-PID`) is removed by the next run of the folder if a crash leaves it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    write_atomic_mode(path, bytes, 0o644)
}

/// `write_atomic` for the private part: the file is owner-only (0600), so it stays so when the
/// folder is copied elsewhere.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    write_atomic_mode(path, bytes, 0o600)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReportError> {
    let io = |source| ReportError::Io { path: path.into(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp =
        dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("out"), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn json_number(x: f64) -> serde_json::Value {
    // JSON has no infinity: an unbounded ε is written as the string "inf".
    serde_json::Number::from_f64(x)
        .map(serde_json::Value::Number)
        .unwrap_or_else(|| serde_json::Value::String(format!("{x}")))
}

/// `x` with `decimals` decimals, rounded up (never below `x`): how every human-readable ε is
/// printed, so a rounded bound is still a bound.
pub fn round_up(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let scale = 10f64.powi(decimals as i32);
    let mut v = (x * scale).ceil() / scale;
    loop {
        let s = format!("{v:.decimals$}");
        if s.parse::<f64>().is_ok_and(|p| p >= x) {
            return s;
        }
        v += 0.5 / scale;
    }
}

/// The guarantee sentence of a run, derived from the certificate's own values (`verify` derives
/// it again and compares).
pub fn guarantee_sentence(private: bool, seeded: bool, epsilon: Option<f64>, delta: f64) -> String {
    if !private {
        return "NONE: trained without clipping or noise (non-private reference run)".to_string();
    }
    if seeded {
        return "NONE: a seeded run (training.seed): its sampling and noise can be reproduced from the config, so it certifies nothing; for experiments only".to_string();
    }
    format!(
        "({}, {delta:e})-DP at the level of one record, {NEIGHBOURING}, under Poisson sampling",
        round_up(epsilon.unwrap_or(f64::INFINITY), 6)
    )
}

/// How the base was quantized for training, or null: an adapter trained on a quantized base is
/// meant for that quantized base.
fn base_quantization_statement(plan: &Plan) -> serde_json::Value {
    let mut parts = Vec::new();
    if let Some(formats) = &plan.model_stored_quant {
        parts.push(format!(
            "{} as stored: the frozen linear weights of the decoder layers{} are the GGML blocks of {} (copied from the GGUF file by dptrain convert --keep-quantized; the sha256 covers that file)",
            formats.join(", "),
            if plan.model_stored_vocab { " and the token embedding / LM head" } else { "" },
            crate::model::quant::STORED_FILE
        ));
    }
    if let Some(q) = plan.model_quant {
        parts.push(format!(
            "{}: the frozen linear weights of the decoder layers were quantized to GGML {} blocks at load (the sha256 is of the unquantized files)",
            q.name(),
            q.name()
        ));
    }
    if let Some(q) = plan.model_quant_vocab {
        parts.push(format!(
            "vocabulary {}: the token embedding and the LM head were quantized to GGML {} blocks at load (the sha256 is of the unquantized files)",
            q.name(),
            q.name()
        ));
    }
    if parts.is_empty() {
        return serde_json::Value::Null;
    }
    format!("{}; the adapter was trained for, and is to be deployed on, this quantized base", parts.join("; ")).into()
}

/// The base's quantization in a few words ("stored q4_1", "q8_0; vocabulary q8_0"), or None.
fn base_quantization_short(plan: &Plan) -> Option<String> {
    let parts: Vec<String> = [
        plan.model_stored_quant.as_ref().map(|f| format!("stored {}", f.join(", "))),
        plan.model_quant.map(|q| q.name().to_string()),
        plan.model_quant_vocab.map(|q| format!("vocabulary {}", q.name())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("; "))
    }
}

/// The dtype in which per-example gradients are really computed, for this run's base dtype.
pub fn gradient_dtype_statement(base: candle_core::DType) -> String {
    match base {
        candle_core::DType::F32 => "per-example gradients, clipping and the clipped sum in f32 (squared norms, clip factors and noise in f64; the sum over micro-batches in f64)".into(),
        other => format!("per-example gradients of the LoRA tensors in f32, but the gradient propagated through the frozen {other:?} base weights is rounded to {other:?} at every frozen linear layer; clipping in f32 (squared norms, clip factors and noise in f64; the sum over micro-batches in f64)").to_lowercase(),
    }
}

/// What the guarantee does not cover in the released files, for this run. Everything else a run
/// writes is in the private part (README "What to publish, what to keep").
pub fn not_protected(plan: &Plan, s: &RunSummary) -> Vec<String> {
    let mut v = vec![
        "held-out metrics (overall and per group, this report and plots/groups.svg) are computed on the test file without noise: the test records are not protected".to_string(),
        format!(
            "hyper-parameters: the config states privacy.hyperparameters-tuned-on-private-data = {}{}",
            plan.tuned_on_private_data,
            if plan.tuned_on_private_data {
                ": that tuning leaks information ε does not account for"
            } else {
                " (the user's statement; if they were tuned on this data, that tuning leaks information ε does not account for)"
            }
        ),
    ];
    if s.task == Task::Classification {
        v.push(if plan.labels.is_some() {
            "the label set is given in the config (public)".to_string()
        } else {
            "the label set is read from the training data: which labels occur is not protected".to_string()
        });
    }
    v.push("the dataset size N, the number of steps and the stop reason are treated as public".to_string());
    v.push(if s.seeded {
        "the config text is kept in the private part (it holds the seed)".to_string()
    } else {
        "the config (hyper-parameters and file paths) is published as given in this report".to_string()
    });
    v.push("the data commitments are HMAC-SHA256 under a secret key kept in the private part: without the key they reveal nothing about the data".to_string());
    v.push("the base model's own training data (the guarantee covers only this fine-tuning data)".to_string());
    v.push("not released, kept in the private part (never publish it): per-step losses, clip fractions, realised batch sizes, non-finite counts and timings (metrics.jsonl, the loss and clip plots), training time and examples/s (together with the batch sizes they give the noise-free number of sampled records), the --reference run's metrics, the seed, the commitment key, plain hashes of the input files, and the checkpoints (noise key, sampler state)".to_string());
    v.push("side channels of running the job: whoever observes it (wall-clock time per step, memory, error messages such as a refused record's file and line, or whether a run was aborted) learns things ε does not cover".to_string());
    v
}

/// `{perplexity, mean_nll, tokens}` of a perplexity result, else null.
fn perplexity_json(m: Option<EvalResult>) -> serde_json::Value {
    match m {
        Some(EvalResult::Perplexity { perplexity, mean_nll, tokens }) => {
            serde_json::json!({ "perplexity": json_number(perplexity), "mean_nll": json_number(mean_nll), "tokens": tokens })
        }
        _ => serde_json::Value::Null,
    }
}

pub const COMMITMENT: &str =
    "HMAC-SHA256 of the file's bytes under a fresh 256-bit key kept in the run's private part (private/run.json)";
pub const CLIPPING: &str = "flat (total L2 norm over all trainable tensors), to C·(1 − 2⁻²⁰) so that the f32 rounding of the clip factor and of the scaled values keeps every clipped norm ≤ C";

/// Which parameters the adapter holds: the last step's, or the moving average of the LoRA-phase
/// iterates (post-processing of the privatised updates, so inside ε like the last iterate).
pub fn released_parameters_statement(s: &RunSummary) -> String {
    match s.ema_decay {
        None => "the parameters after the last step".into(),
        Some(d) => format!(
            "an exponential moving average of the parameters over the {} LoRA-phase steps (decay min({d}, (1 + k)/(10 + k)) after step k), started from the parameters the LoRA phase began with; a function of the privatised updates only (post-processing), so covered by the same ε",
            s.steps.saturating_sub(s.linear_probe_steps)
        ),
    }
}

/// The clipping statement of the report for the run's kind.
pub fn clipping_statement(kind: crate::privacy::ClipKind) -> String {
    match kind {
        crate::privacy::ClipKind::Flat => CLIPPING.to_string(),
        crate::privacy::ClipKind::Automatic { stability } => format!(
            "automatic (Bu et al. 2023): every example's gradient (total L2 norm over all trainable tensors) scaled by C·(1 − 2⁻²⁰)/(‖g‖ + {stability}), so every scaled norm is below C whatever ‖g‖"
        ),
        crate::privacy::ClipKind::PerLayer => "per layer: each adapted layer's LoRA A and B together, and the head, clipped flat to C·(1 − 2⁻²⁰)/√G (G groups), so every example's whole gradient has norm ≤ C".to_string(),
    }
}

/// The certificate: the facts an auditor needs, stored in the adapter file itself.
pub fn certificate(plan: &Plan, s: &RunSummary) -> serde_json::Value {
    let eps_json = |e: &Option<Epsilon>| e.as_ref().map(Epsilon::to_json).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "engine": ENGINE,
        "private": !s.non_private,
        "seeded": s.seeded,
        "certified": s.certifies(),
        "guarantee": guarantee_sentence(!s.non_private, s.seeded, s.epsilon, s.delta),
        "epsilon": s.epsilon.map(json_number).unwrap_or(serde_json::Value::Null),
        "epsilon_kind": "upper bound",
        "delta": s.delta,
        "target_epsilon": s.target_epsilon,
        "accountant": plan.accountant.name(),
        "accountant_detail": match plan.accountant {
            crate::accounting::AccountantKind::Pld => "privacy loss distribution, connect-the-dots discretisation (interval 1e-4), FFT composition, pessimistic tails; both add and remove directions",
            crate::accounting::AccountantKind::Rdp => "Rényi DP, orders 1.1-10.9 and 12-63, conversion of Balle et al. 2020",
        },
        "epsilon_cross_check": { "pld": eps_json(&s.epsilon_pld), "rdp": eps_json(&s.epsilon_rdp) },
        "noise_multiplier": s.noise_multiplier,
        "sample_rate": s.sample_rate,
        "expected_batch_size": s.expected_batch_size,
        "steps": s.steps,
        "clip_norm": s.clip_norm,
        "clipping": clipping_statement(plan.clip_kind),
        "gradient_dtype": gradient_dtype_statement(plan.base_dtype()),
        "neighbouring_relation": NEIGHBOURING,
        "sampler": SAMPLER,
        "noise_generator": NOISE_GENERATOR,
        "dataset_size": s.dataset_size,
        "commitments": {
            "scheme": COMMITMENT,
            "train": s.inputs.train.commitment,
            "test": s.inputs.test.commitment,
            "config": s.inputs.config.commitment,
        },
        "ledger": s.ledger,
    })
}

/// The full PEFT module names of the adapted layers, from the adapter's tensor names
/// (`base_model.model.<module>.lora_A.weight`).
pub fn adapted_modules(model: &dyn DpModel) -> Vec<String> {
    let mut v: Vec<String> = model
        .trainable()
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight").map(String::from))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `adapter_config.json`. `target_modules` lists the full names of exactly the trained modules:
/// PEFT matches a short name as a suffix (so "output.dense" would also wrap
/// "attention.output.dense"), a full name only itself.
fn adapter_config(plan: &Plan, s: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": s.task.peft_task_type(),
        "base_model_name_or_path": plan.model_dir.display().to_string(),
        "r": plan.lora_rank,
        "lora_alpha": plan.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": s.adapted_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": match s.task {
            Task::Classification => serde_json::json!([HEAD_MODULE]),
            Task::CausalLm => serde_json::Value::Null,
        },
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "revision": null,
    })
}

/// Rewrites a safetensors file's header as JSON with sorted keys (`__metadata__` entries included),
/// padded with spaces to a multiple of 8 bytes: the `safetensors` crate writes its metadata map in
/// hash order, which differs from process to process, so the same adapter would get a different
/// file (and sha256) each time.
pub fn canonical_safetensors(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(bytes.get(..8).ok_or("no header")?.try_into().map_err(|_| "no header")?) as usize;
    let header = bytes.get(8..8 + n).ok_or("truncated header")?;
    // serde_json's map is ordered by key (no `preserve_order`), so this re-serialisation is sorted.
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut h = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// The adapter tensors as safetensors bytes, with `metadata` (byte-identical for equal inputs).
pub fn adapter_bytes(model: &dyn DpModel, metadata: HashMap<String, String>) -> Result<Vec<u8>, String> {
    let named = model.trainable();
    let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, t) in &named {
        let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?;
        data.push((name.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), t.dims().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    canonical_safetensors(&safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?)
}

/// The private run record (`private/run.json`): what identifies and reproduces the run and must
/// never be published.
pub fn run_record(
    plan: &Plan,
    s: &RunSummary,
    key: &crate::privacy::CommitmentKey,
    adapter_sha256: &str,
) -> serde_json::Value {
    serde_json::json!({
        "engine": ENGINE,
        "warning": "PRIVATE: never publish this folder (seed, commitment key, plain hashes of the data, timings)",
        "seed": plan.seed,
        "seeded": s.seeded,
        "commitment_key": key.to_hex(),
        "inputs": s.inputs,
        "config_text": plan.config_text,
        "base_model": { "path": plan.model_dir.display().to_string(), "sha256": s.model_hash },
        "adapter_sha256": adapter_sha256,
        "train_seconds": s.train_seconds,
        "examples_per_second": s.examples_per_second,
        "non_private_reference": s.reference,
        "metrics": { "test": s.test_metric, "test_groups": s.test_groups, "test_last_iterate": s.last_iterate_test_metric },
        "memory": s.memory,
    })
}

/// The release report (`privacy_report.json`, rendered as `privacy_report.md`).
fn release_report(plan: &Plan, s: &RunSummary, cert: &serde_json::Value, adapter_hash: &str) -> serde_json::Value {
    let eps_json = |e: &Option<Epsilon>| e.as_ref().map(Epsilon::to_json).unwrap_or(serde_json::Value::Null);
    let mut report = serde_json::json!({
        "epsilon": s.epsilon.map(json_number).unwrap_or(serde_json::Value::Null),
        "delta": s.delta,
        "noise_multiplier": s.noise_multiplier,
        "sample_rate": s.sample_rate,
        "steps": s.steps,
        "clip_norm": s.clip_norm,
        "accountant": plan.accountant.name(),
        "seeded": s.seeded,
        "private": !s.non_private,
        "certified": s.certifies(),
        "target_epsilon": s.target_epsilon,
        "planned_steps": s.planned_steps,
        "linear_probe_steps": s.linear_probe_steps,
        "stopped_early": s.stopped_early,
        "expected_batch_size": s.expected_batch_size,
        "rdp_optimal_order": s.rdp_optimal_order,
        "epsilon_by_accountant": { "pld": eps_json(&s.epsilon_pld), "rdp": eps_json(&s.epsilon_rdp) },
        "neighbouring_relation": NEIGHBOURING,
        "guarantee": cert["guarantee"],
        "delta_times_n": s.delta * s.dataset_size as f64,
        "epochs": s.steps as f64 * s.sample_rate,
        "sampler": SAMPLER,
        "noise_generator": NOISE_GENERATOR,
        "clipping": clipping_statement(plan.clip_kind),
        "base_model": {
            "path": plan.model_dir.display().to_string(),
            "sha256": s.model_hash,
            "quantization": base_quantization_statement(plan),
        },
        "task": s.task,
        "target_modules": s.target_modules,
        "adapted_modules": s.adapted_modules,
        "dataset": { "size": s.dataset_size, "commitment": s.inputs.train.commitment, "labels": s.labels },
        "test_dataset": { "size": s.test_size, "commitment": s.inputs.test.commitment },
        "hyperparameters_tuned_on_private_data": plan.tuned_on_private_data,
        "not_protected": not_protected(plan, s),
        "release_files": rundir::RELEASE_FILES
            .iter()
            // A plot file is released only when its plot applies to this run.
            .filter(|(f, _)| plots::PLOTS.iter().find(|p| p.file == *f).is_none_or(|p| p.release && p.applies(s)))
            .map(|(f, covered)| serde_json::json!({ "file": f, "covered_by_epsilon": covered }))
            .collect::<Vec<_>>(),
        "compute": {
            "device": plan.device.name(),
            "base_weights_dtype": format!("{:?}", plan.base_dtype()).to_lowercase(),
            "base_weights_quantization": base_quantization_short(plan),
            "gradient_dtype": gradient_dtype_statement(plan.base_dtype()),
        },
        "metrics": {
            "test_accuracy": match s.test_metric { EvalResult::Accuracy(a) => json_number(a), _ => serde_json::Value::Null },
            "test_perplexity": perplexity_json(Some(s.test_metric)),
            "base_test_perplexity": perplexity_json(s.base_test_metric),
            "test": s.test_metric,
            "base_test": s.base_test_metric,
            "test_groups": s.test_groups,
        },
        "epsilon_curve": s.epsilon_curve,
        "plots": plots::PLOTS
            .iter()
            .filter(|p| p.release && p.applies(s))
            .map(|p| serde_json::json!({ "file": p.file, "title": p.title }))
            .collect::<Vec<_>>(),
        "adapter_sha256": adapter_hash,
        "certificate": cert,
        "ledger": s.ledger,
        "config": if s.seeded { serde_json::Value::Null } else { serde_json::Value::String(plan.config_text.clone()) },
    });
    // Outside the macro: one more key would pass serde_json's recursion limit.
    report["released_parameters"] = released_parameters_statement(s).into();
    report
}

/// Writes a finished run: the private part first (run record, metrics, private plots), then the
/// release (adapter, adapter config, release plots, the report last). Every file is atomic.
pub fn write_outputs(
    plan: &Plan,
    dir: &rundir::RunDir,
    model: &dyn DpModel,
    s: &RunSummary,
    metrics: &[StepMetrics],
    key: &crate::privacy::CommitmentKey,
) -> Result<(), ReportError> {
    let cert = certificate(plan, s);
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("dptrain_certificate".to_string(), cert.to_string());
    let adapter_path = dir.release.join("adapter_model.safetensors");
    let bytes =
        adapter_bytes(model, meta).map_err(|message| ReportError::Format { path: adapter_path.clone(), message })?;
    let adapter_hash = hex_sha256(&bytes);
    let report = release_report(plan, s, &cert, &adapter_hash);

    // Private part.
    let mut lines = String::new();
    for m in metrics {
        lines.push_str(&serde_json::to_string(m).expect("metrics serialise"));
        lines.push('\n');
    }
    write_private(&dir.private.join(rundir::METRICS), lines.as_bytes())?;
    for p in plots::PLOTS.iter().filter(|p| p.applies(s)) {
        // The private copy of the group plot carries the reference's bars; the release one never.
        let (part, summary) = if p.release {
            let mut public = s.clone();
            public.reference = None;
            (&dir.release, std::borrow::Cow::Owned(public))
        } else {
            (&dir.private, std::borrow::Cow::Borrowed(s))
        };
        let svg =
            (p.draw)(&summary, metrics).map_err(|message| ReportError::Format { path: part.join(p.file), message })?;
        if p.release {
            write_atomic(&part.join(p.file), svg.as_bytes())?;
        } else {
            write_private(&part.join(p.file), svg.as_bytes())?;
        }
        if p.release && s.reference.is_some() && p.file == "plots/groups.svg" {
            let svg = (p.draw)(s, metrics)
                .map_err(|message| ReportError::Format { path: dir.private.join(p.file), message })?;
            write_private(&dir.private.join(p.file), svg.as_bytes())?;
        }
    }
    write_private(
        &dir.private.join(rundir::RUN_RECORD),
        serde_json::to_string_pretty(&run_record(plan, s, key, &adapter_hash)).expect("json").as_bytes(),
    )?;

    // Release.
    write_atomic(&adapter_path, &bytes)?;
    write_atomic(
        &dir.release.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config(plan, s)).expect("json").as_bytes(),
    )?;
    write_atomic(&dir.release.join("privacy_report.md"), markdown::render(&report).as_bytes())?;
    write_atomic(
        &dir.release.join("privacy_report.json"),
        serde_json::to_string_pretty(&report).expect("json").as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_epsilon_is_never_below_the_bound() {
        for &x in &[2.9999994, 2.9999995, 3.0, 0.1 + 0.2, 1.0 / 3.0, 7.123456789, 1e-9, 123456.0000001] {
            for d in [2, 4, 6] {
                let s = round_up(x, d);
                assert!(s.parse::<f64>().unwrap() >= x, "{x} → {s}");
                assert!(s.parse::<f64>().unwrap() - x <= 1.5 * 10f64.powi(-(d as i32)), "{x} → {s}");
            }
        }
        assert_eq!(round_up(2.9999994, 6), "3.000000");
        assert_eq!(round_up(1.0000001, 2), "1.01");
        assert_eq!(round_up(3.0, 4), "3.0000");
        assert!(guarantee_sentence(true, false, Some(2.99999941), 1e-5).starts_with("(3.000000, 1e-5)-DP"));
        assert!(guarantee_sentence(true, true, Some(1.0), 1e-5).starts_with("NONE: a seeded run"));
    }

    /// `verify` re-renders the markdown from the parsed JSON: every number must read back as the
    /// very f64 that was written (serde_json's default parser is off by an ulp for some, e.g.
    /// δ·N = 1e-4 · 300 = 0.030000000000000002).
    #[test]
    fn every_number_a_report_writes_survives_the_json_round_trip() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(17);
        let mut checked = 0;
        for delta in [1e-3, 1e-4, 3e-5, 1e-5, 2.5e-6, 1e-6, 1e-7, 1e-8] {
            for n in (50..20_000).step_by(97) {
                let l = 1 + n / 37;
                let sigma: f64 = rng.random_range(0.3..5.0);
                let eps: f64 = rng.random_range(0.01..20.0);
                let v = serde_json::json!({
                    "delta_times_n": delta * n as f64,
                    "sample_rate": l as f64 / n as f64,
                    "noise_multiplier": sigma,
                    "epsilon": eps,
                    "epochs": 113.0 * (l as f64 / n as f64),
                });
                let back: serde_json::Value = serde_json::from_str(&serde_json::to_string_pretty(&v).unwrap()).unwrap();
                for key in ["delta_times_n", "sample_rate", "noise_multiplier", "epsilon", "epochs"] {
                    assert_eq!(
                        back[key].as_f64().unwrap().to_bits(),
                        v[key].as_f64().unwrap().to_bits(),
                        "{key} = {} (δ {delta}, N {n})",
                        v[key]
                    );
                }
                assert_eq!(back, v);
                checked += 1;
            }
        }
        assert!(checked > 1000);
        let x: f64 = 1e-4 * 300.0;
        assert_eq!(serde_json::from_str::<f64>(&serde_json::to_string(&x).unwrap()).unwrap().to_bits(), x.to_bits());
    }

    #[test]
    fn canonical_header_has_sorted_keys_and_the_same_tensors() {
        let data: Vec<u8> = (0..24u8).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut meta = HashMap::new();
            for k in ["format", "dptrain_certificate", "b", "a", "zz"] {
                meta.insert(k.to_string(), format!("v-{k}"));
            }
            let raw = safetensors::serialize(vec![("t".to_string(), view.clone())], Some(meta)).unwrap();
            let c = canonical_safetensors(&raw).unwrap();
            let st = safetensors::SafeTensors::deserialize(&c).unwrap();
            assert_eq!(st.tensor("t").unwrap().data(), &data[..]);
            let n = u64::from_le_bytes(c[..8].try_into().unwrap()) as usize;
            assert_eq!(n % 8, 0);
            let header = std::str::from_utf8(&c[8..8 + n]).unwrap();
            let pos = |k: &str| header.find(&format!("\"{k}\"")).unwrap();
            assert!(pos("a") < pos("b") && pos("b") < pos("dptrain_certificate") && pos("format") < pos("zz"));
            seen.insert(c);
        }
        assert_eq!(seen.len(), 1, "one byte sequence whatever the hash order");
    }
}
