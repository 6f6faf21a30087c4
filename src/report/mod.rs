//! Outputs of a run: the adapter in the HF PEFT layout with the privacy certificate in its
//! safetensors `__metadata__`, `adapter_config.json`, `privacy_report.json` and `metrics.jsonl`.
//!
//! Invariant: every file is written to a temporary name, fsynced and renamed, so a failure never
//! leaves a half-written output, and an output folder holding another run is never overwritten
//! without `--overwrite`.

pub mod markdown;
pub mod plots;
pub mod verify;

use crate::accounting::event::Ledger;
use crate::config::{hex_sha256, Plan};
use crate::model::bert::HEAD_MODULE;
use crate::model::{DpModel, EvalResult, Task};
use crate::train::eval::GroupMetric;
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
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// What a run did, as the report and certificate state it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub non_private: bool,
    /// ε by the run's accountant (`plan.accountant`): the certified upper bound.
    pub epsilon: Option<f64>,
    /// ε by each accountant (the other one is the cross-check).
    pub epsilon_pld: Option<f64>,
    pub epsilon_rdp: Option<f64>,
    pub rdp_optimal_order: Option<f64>,
    pub target_epsilon: Option<f64>,
    pub delta: f64,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub expected_batch_size: usize,
    pub steps: u64,
    pub planned_steps: u64,
    pub clip_norm: Option<f64>,
    pub seeded: bool,
    pub dataset_size: usize,
    pub dataset_hash: String,
    pub test_dataset_hash: String,
    pub test_size: usize,
    pub labels: Vec<String>,
    pub task: Task,
    /// LoRA target modules as trained (the configured ones or the architecture's default).
    pub target_modules: Vec<String>,
    /// Held-out metric after training: accuracy (classification) or perplexity (LM).
    pub test_metric: EvalResult,
    /// The same metric of the base model before training (LM runs; B = 0 is the base model).
    pub base_test_metric: Option<EvalResult>,
    /// The held-out metric per `group` of the test records (empty when they have none).
    pub test_groups: Vec<GroupMetric>,
    /// A non-private run of the same config, model and data, for comparison (`--reference`).
    pub reference: Option<Reference>,
    /// sha256 over the base model folder's config.json and weight files.
    pub model_hash: String,
    /// ε spent after each of a set of steps, by both accountants (empty for non-private runs).
    pub epsilon_curve: Vec<EpsilonPoint>,
    pub train_seconds: f64,
    pub examples_per_second: f64,
    pub stopped_early: Option<String>,
    pub ledger: Ledger,
}

/// ε after `step` steps, by each accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct EpsilonPoint {
    pub step: u64,
    pub pld: f64,
    pub rdp: f64,
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

const OUTPUT_FILES: [&str; 5] =
    ["adapter_model.safetensors", "adapter_config.json", "privacy_report.json", "privacy_report.md", "metrics.jsonl"];

/// Refuse an output folder that already holds a run, unless overwriting.
pub fn check_output_dir(dir: &Path, overwrite: bool) -> Result<(), ReportError> {
    let holds_run = OUTPUT_FILES.iter().any(|f| dir.join(f).exists());
    if holds_run && !overwrite {
        return Err(ReportError::OutputExists(dir.into()));
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io { path: path.into(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp =
        dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("out"), std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
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

/// What the guarantee does not cover, for this run.
fn not_protected(plan: &Plan, s: &RunSummary) -> Vec<String> {
    let mut v = vec![
        "training losses, gradient norms and clip fractions (metrics.jsonl, the plots, this report) are computed on the private data without noise: they are not covered by ε".to_string(),
        "held-out metrics (overall and per group) are computed on the test file without noise: the test records are not protected".to_string(),
    ];
    v.push(if plan.tuned_on_private_data {
        "hyper-parameters WERE tuned on this private data (privacy.hyperparameters-tuned-on-private-data = true): that tuning leaks information ε does not account for".to_string()
    } else {
        "hyper-parameters: the config states they were not tuned on this private data (privacy.hyperparameters-tuned-on-private-data = false); if they were, that tuning leaks information ε does not account for".to_string()
    });
    if s.task == Task::Classification {
        v.push(if plan.labels.is_some() {
            "the label set is given in the config (public)".to_string()
        } else {
            "the label set is read from the training data: which labels occur is not protected".to_string()
        });
    }
    v.push("the dataset size N and the number of steps are treated as public".to_string());
    v.push("the base model's own training data (the guarantee covers only this fine-tuning data)".to_string());
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

/// The certificate: the facts an auditor needs, stored in the adapter file itself.
pub fn certificate(plan: &Plan, s: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "engine": ENGINE,
        "private": !s.non_private,
        "guarantee": if s.non_private {
            "NONE: trained without clipping or noise (non-private reference run)".to_string()
        } else {
            format!("({:.6}, {:e})-DP at the level of one record, {NEIGHBOURING}, under Poisson sampling", s.epsilon.unwrap_or(f64::INFINITY), s.delta)
        },
        "epsilon": s.epsilon.map(json_number).unwrap_or(serde_json::Value::Null),
        "epsilon_kind": "upper bound",
        "delta": s.delta,
        "accountant": plan.accountant.name(),
        "accountant_detail": match plan.accountant {
            crate::accounting::AccountantKind::Pld => "privacy loss distribution, connect-the-dots discretisation (interval 1e-4), FFT composition, pessimistic tails; both add and remove directions",
            crate::accounting::AccountantKind::Rdp => "Rényi DP, orders 1.1-10.9 and 12-63, conversion of Balle et al. 2020",
        },
        "epsilon_cross_check": {
            "pld": s.epsilon_pld.map(json_number),
            "rdp": s.epsilon_rdp.map(json_number),
        },
        "noise_multiplier": s.noise_multiplier,
        "sample_rate": s.sample_rate,
        "expected_batch_size": s.expected_batch_size,
        "steps": s.steps,
        "clip_norm": s.clip_norm,
        "clipping": "flat (total L2 norm over all trainable tensors)",
        "neighbouring_relation": NEIGHBOURING,
        "sampler": SAMPLER,
        "noise_generator": NOISE_GENERATOR,
        "dataset_size": s.dataset_size,
        "dataset_sha256": s.dataset_hash,
        "config_sha256": plan.config_hash,
        "seeded": if s.seeded { "seeded: not for release" } else { "no (OS entropy)" },
        "ledger": s.ledger,
    })
}

fn adapter_config(plan: &Plan, s: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": s.task.peft_task_type(),
        "base_model_name_or_path": plan.model_dir.display().to_string(),
        "r": plan.lora_rank,
        "lora_alpha": plan.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": s.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": match s.task {
            Task::Classification => serde_json::json!([HEAD_MODULE]),
            Task::CausalLm => serde_json::Value::Null,
        },
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "layers_to_transform": plan.lora_layers,
        "revision": null,
    })
}

/// The adapter tensors as safetensors bytes, with `metadata`.
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
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

pub fn write_outputs(
    plan: &Plan,
    model: &dyn DpModel,
    s: &RunSummary,
    metrics: &[StepMetrics],
) -> Result<(), ReportError> {
    let dir = &plan.output_dir;
    let cert = certificate(plan, s);
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("dptrain_certificate".to_string(), cert.to_string());
    let adapter_path = dir.join("adapter_model.safetensors");
    let bytes =
        adapter_bytes(model, meta).map_err(|message| ReportError::Format { path: adapter_path.clone(), message })?;
    let adapter_hash = hex_sha256(&bytes);
    let mut lines = String::new();
    for m in metrics {
        lines.push_str(&serde_json::to_string(m).expect("metrics serialise"));
        lines.push('\n');
    }
    let report = serde_json::json!({
        "epsilon": s.epsilon.map(json_number).unwrap_or(serde_json::Value::Null),
        "delta": s.delta,
        "noise_multiplier": s.noise_multiplier,
        "sample_rate": s.sample_rate,
        "steps": s.steps,
        "clip_norm": s.clip_norm,
        "accountant": plan.accountant.name(),
        "seeded": s.seeded,
        "private": !s.non_private,
        "target_epsilon": s.target_epsilon,
        "planned_steps": s.planned_steps,
        "stopped_early": s.stopped_early,
        "expected_batch_size": s.expected_batch_size,
        "rdp_optimal_order": s.rdp_optimal_order,
        "epsilon_by_accountant": {
            "pld": s.epsilon_pld.map(json_number),
            "rdp": s.epsilon_rdp.map(json_number),
        },
        "neighbouring_relation": NEIGHBOURING,
        "guarantee": cert["guarantee"],
        "delta_times_n": s.delta * s.dataset_size as f64,
        "epochs": s.steps as f64 * s.sample_rate,
        "sampler": SAMPLER,
        "noise_generator": NOISE_GENERATOR,
        "clipping": "flat (total L2 norm over all trainable tensors)",
        "base_model": { "path": plan.model_dir.display().to_string(), "sha256": s.model_hash },
        "task": s.task,
        "target_modules": s.target_modules,
        "dataset": { "size": s.dataset_size, "sha256": s.dataset_hash, "labels": s.labels },
        "test_dataset": { "size": s.test_size, "sha256": s.test_dataset_hash },
        "hyperparameters_tuned_on_private_data": plan.tuned_on_private_data,
        "not_protected": not_protected(plan, s),
        "compute": {
            "device": plan.device.name(),
            "base_weights_dtype": format!("{:?}", plan.base_dtype()).to_lowercase(),
            "per_example_gradients_clipping_noise_dtype": "f32 (noise and clip sums in f64)",
        },
        "metrics": {
            "test_accuracy": match s.test_metric { EvalResult::Accuracy(a) => json_number(a), _ => serde_json::Value::Null },
            "test_perplexity": perplexity_json(Some(s.test_metric)),
            "base_test_perplexity": perplexity_json(s.base_test_metric),
            "test": s.test_metric,
            "base_test": s.base_test_metric,
            "test_groups": s.test_groups,
            "train_seconds": s.train_seconds,
            "examples_per_second": s.examples_per_second,
        },
        "non_private_reference": s.reference,
        "epsilon_curve": s.epsilon_curve,
        "plots": plots::PLOTS
            .iter()
            .filter(|p| p.applies(s))
            .map(|p| serde_json::json!({ "file": p.file, "title": p.title }))
            .collect::<Vec<_>>(),
        "adapter_sha256": adapter_hash,
        "certificate": cert,
        "ledger": s.ledger,
        "config": plan.config_text,
    });
    write_atomic(&adapter_path, &bytes)?;
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config(plan, s)).expect("json").as_bytes(),
    )?;
    write_atomic(&dir.join("metrics.jsonl"), lines.as_bytes())?;
    for p in plots::PLOTS.iter().filter(|p| p.applies(s)) {
        let svg = (p.draw)(s, metrics).map_err(|message| ReportError::Format { path: dir.join(p.file), message })?;
        write_atomic(&dir.join(p.file), svg.as_bytes())?;
    }
    write_atomic(&dir.join("privacy_report.md"), markdown::render(&report).as_bytes())?;
    write_atomic(&dir.join("privacy_report.json"), serde_json::to_string_pretty(&report).expect("json").as_bytes())?;
    Ok(())
}
