//! The run loop: plan → data → model → steps (each recorded in the ledger, the step that would
//! exceed the target ε never taken) → evaluation → outputs.

use super::checkpoint::{self, Checkpoint, CheckpointError, Fingerprint, OptimizerState, RngState, State};
use super::eval::feature_cache;
use super::optimizer::{learning_rate, Optimizer, ParamEma, SgdMomentum};
use super::params::FlatParams;
use super::step::{private_gradient_audited, ClipImpl, Mechanism};
use crate::accounting::event::Ledger;
use crate::accounting::{AccountantKind, PldAccountant, RdpAccountant};
use crate::config::{NoiseSpec, OptimizerKind, Plan};
use crate::data::{load_classification, load_lm, Dataset, PoissonSampler};
use crate::kernels::FusedAdamW;
use crate::lora::LoraSpec;
use crate::model::load_tokenizer;
use crate::model::probe::{probe_data, LinearProbe};
use crate::model::{Architecture, BertClassifier, DpModel, LlamaConfig, LlamaLm, Task};
use crate::privacy::{CommitmentKey, GaussianNoise, RandomStreams};
use crate::report::rundir::{self, RunDir};
use crate::report::{self, RunSummary, StepMetrics};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Train without clipping or noise (the utility reference; certifies nothing).
    pub non_private: bool,
    /// Replace the outputs of an earlier run in the output folder.
    pub overwrite: bool,
    /// Draw a progress bar.
    pub progress: bool,
    /// Without a progress bar, print a status line every 10% of the steps.
    pub log_lines: bool,
    /// Continue from this checkpoint, or from the newest one under this run folder.
    pub resume: Option<std::path::PathBuf>,
    /// Stop as if interrupted after this many steps (checkpoint written, error returned): how
    /// tests and users can exercise resume without killing the process.
    pub stop_after: Option<u64>,
    /// A non-private run's output folder (same config, base model and data) whose held-out
    /// metrics are reported beside this run's.
    pub reference: Option<std::path::PathBuf>,
    /// A white-box audit's gradient canaries (`dptrain audit --mode white-box`): inserted into
    /// the training set (N and q include them), scored from every step's privatised gradient.
    pub gradient_canaries: Option<crate::audit::CanarySpec>,
    /// Key the run's random streams with this secret (kept by the caller in a private part)
    /// instead of fresh OS entropy: `dptrain tune` fixes each trial's key before it runs, so a
    /// trial restarted after an interruption draws the same sampling and noise again. Refused
    /// together with a seed.
    pub streams_key: Option<crate::privacy::StreamsKey>,
}

pub struct RunOutcome {
    pub summary: RunSummary,
    /// The gradient canaries with their scores, when the run was audited.
    pub canaries: Option<crate::audit::GradientCanaries>,
    /// The trained model (base + the adapter as released).
    pub model: Box<dyn DpModel>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Accounting(#[from] crate::accounting::AccountingError),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// Shown as "training: <cause>" by the CLI's error chain.
    #[error("training")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Adapter(#[from] crate::lora::peft::AdapterError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("interrupted {why} after step {step} of {planned}; checkpoint written to {checkpoint}. Resume with: dptrain --config <the same config> --resume {run_dir}")]
    Interrupted { why: &'static str, step: u64, planned: u64, checkpoint: String, run_dir: String },
    #[error("{0}")]
    Plan(String),
}

/// A run in three stages a reader can follow: `prepare` (output folder locked and checked, data,
/// model and mechanism validated, resume state read and checked; nothing of an earlier run removed
/// before this succeeds) → `train` (the steps, each in the ledger, checkpoints in the private part)
/// → `release` (evaluation, ε re-checked against the target, outputs written, checkpoints removed).
pub fn run(plan: &Plan, opts: &RunOptions) -> Result<RunOutcome, RunError> {
    if plan.tune.is_some() {
        return Err(RunError::Plan(format!(
            "{} has a [tune] table: run `dptrain tune --config {0}` for the private search, or remove the table to train once with the settings above it",
            plan.config_path.display()
        )));
    }
    // Lock, writability and temporaries first: before any data or model is loaded.
    let dir = RunDir::open(&plan.output_dir)?;
    let resuming_here = check_existing(&dir, opts)?;
    let mut prepared = prepare(plan, opts)?;
    if opts.overwrite {
        // Only now that config, model and data are known good is anything of an earlier run removed.
        dir.clear_previous(resuming_here)?;
    }
    // The steps' peak memory beside the plan's prediction (a check of the plan on every run).
    let device = prepared.model.device().clone();
    let in_use = crate::memory::in_use(&device)?;
    crate::memory::reset_peak(&device, false)?;
    let trained = train(plan, opts, &dir, &mut prepared)?;
    if let (Some(base), Some(peak)) = (in_use, crate::memory::peak(&device)?) {
        let peak = peak.saturating_sub(base);
        prepared.steps_peak = Some(peak);
        eprintln!(
            "memory: the steps peaked at {} above the model and feature cache (planned {})",
            crate::memory::bytes(peak),
            prepared
                .memory
                .planned(prepared.memory.micro_batch)
                .map_or("—".into(), |p| crate::memory::bytes(p - prepared.memory.cache))
        );
    }
    release(plan, opts, &dir, prepared, trained)
}

/// Refuses a folder that holds another run unless `--overwrite`. Returns whether the run resumes
/// from this very folder (then its outputs and checkpoints are its own).
fn check_existing(dir: &RunDir, opts: &RunOptions) -> Result<bool, RunError> {
    let resuming_here = match &opts.resume {
        None => false,
        Some(p) => {
            let ck = checkpoint::locate(p)?;
            let from = checkpoint::run_dir_of(&ck).and_then(|d| d.canonicalize().ok());
            from.is_some() && from == dir.root.canonicalize().ok()
        }
    };
    if resuming_here || opts.overwrite {
        return Ok(resuming_here);
    }
    if dir.holds_outputs() {
        return Err(report::ReportError::OutputExists(dir.root.clone()).into());
    }
    if checkpoint::has_checkpoints(&dir.checkpoints()) {
        return Err(RunError::Plan(format!(
            "output folder {0} holds checkpoints of an earlier run: continue it with --resume {0}, or pass --overwrite to start over",
            dir.root.display()
        )));
    }
    Ok(false)
}

/// Everything validated before the first step.
struct Prepared {
    train: Dataset,
    test: Dataset,
    q: f64,
    /// All planned steps: the linear probe's (the first `probe_steps`), then LoRA's.
    steps: u64,
    probe_steps: u64,
    sigma: f64,
    target: Option<f64>,
    mech: Mechanism,
    seeded: bool,
    target_modules: Vec<String>,
    model: Box<dyn DpModel>,
    base_test_metric: Option<crate::model::EvalResult>,
    model_hash: String,
    reference: Option<report::Reference>,
    fingerprint: Fingerprint,
    key: CommitmentKey,
    inputs: report::Inputs,
    layout: FlatParams,
    params: candle_core::Tensor,
    cache: Option<crate::data::FeatureCache>,
    opt: Optimizer,
    /// `training.ema-decay`: the moving average of the LoRA-phase iterates, released instead of
    /// the last step's parameters.
    ema: Option<ParamEma>,
    sampler: PoissonSampler,
    noise: GaussianNoise,
    ledger: Ledger,
    metrics: Vec<StepMetrics>,
    start: u64,
    prior_seconds: f64,
    examples_seen: usize,
    /// The stop rule's step limit (`None`: the planned steps).
    max_steps: Option<u64>,
    /// Micro-batch limits: the memory plan's size and the config's token cap.
    micro: crate::data::MicroBatchLimits,
    /// The run's memory plan.
    memory: crate::memory::MemoryPlan,
    /// The training steps' measured peak beyond the model and the feature cache.
    steps_peak: Option<u64>,
    /// The records sampled from: N, plus an audit's inserted canaries.
    n: usize,
    canaries: Option<crate::audit::GradientCanaries>,
}

fn input_file(path: &std::path::Path, sha256: &str, key: &CommitmentKey) -> Result<report::InputFile, RunError> {
    let commitment =
        key.commit_file(path).map_err(|e| RunError::Plan(format!("cannot read {}: {e}", path.display())))?;
    Ok(report::InputFile { path: path.display().to_string(), sha256: sha256.to_string(), commitment })
}

fn prepare(plan: &Plan, opts: &RunOptions) -> Result<Prepared, RunError> {
    // Open the device first: a missing GPU or a CPU-only build fails before any data is read.
    let device = plan.device.open()?;
    let arch = Architecture::detect(&plan.model_dir)?;
    let (train, test) = load_data(plan, arch)?;
    let mut canaries = match &opts.gradient_canaries {
        None => None,
        Some(_) if opts.resume.is_some() => {
            return Err(RunError::Plan("an audited run cannot be resumed (its canaries are not checkpointed)".into()))
        }
        Some(spec) => {
            let mut coins = match plan.seed {
                Some(s) => {
                    let mut r = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(s);
                    r.set_stream(5);
                    r
                }
                None => <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng(),
            };
            Some(crate::audit::GradientCanaries::new(spec, &mut coins).map_err(RunError::Plan)?)
        }
    };
    // The records the sampler draws from: the training set and an audit's inserted canaries.
    let n = train.len() + canaries.as_ref().map_or(0, |c| c.inserted_count());
    let l = plan.expected_batch_size;
    if l > n {
        return Err(RunError::Plan(format!(
            "training.expected-batch-size {l} exceeds the {n} records of {}",
            plan.train_path.display()
        )));
    }
    if plan.delta >= 1.0 / n as f64 {
        return Err(RunError::Plan(format!(
            "privacy.delta {} is not below 1/N = {:.3e} (N = {n}): such a δ allows releasing a record outright",
            plan.delta,
            1.0 / n as f64
        )));
    }
    if plan.delta > 0.1 / n as f64 {
        eprintln!(
            "warning: privacy.delta {} is above 0.1/N = {:.3e}; a δ well below 1/N is advised",
            plan.delta,
            0.1 / n as f64
        );
    }
    let q = l as f64 / n as f64;
    let steps = plan.planned_steps(n);
    let probe_steps = plan.probe_steps(n);
    if probe_steps > 0 {
        if arch != Architecture::Bert {
            return Err(RunError::Plan(
                "training.linear-probe-epochs: the linear probe trains a classification head; this model is a language model".into(),
            ));
        }
        if let Some(k) = opts.stop_after.filter(|&k| k < probe_steps) {
            return Err(RunError::Plan(format!(
                "--stop-after-step {k} falls inside the linear probe (steps 1..{probe_steps}), which writes no checkpoints: choose {probe_steps} or later"
            )));
        }
    }
    let (sigma, target) = if opts.non_private {
        (0.0, None)
    } else {
        match plan.noise {
            NoiseSpec::NoiseMultiplier(s) => (s, None),
            NoiseSpec::TargetEpsilon(t) => {
                let (s, _) = crate::accounting::calibrate(plan.accountant, t, plan.delta, q, steps, 1e-4)?;
                (s, Some(t))
            }
        }
    };
    let mech = if opts.non_private {
        Mechanism { clip: None, clip_kind: plan.clip_kind, noise_multiplier: 0.0, expected_batch_size: l }
    } else {
        Mechanism {
            clip: Some(plan.clip_norm),
            clip_kind: plan.clip_kind,
            noise_multiplier: sigma,
            expected_batch_size: l,
        }
    };

    if let Some(c) = canaries.as_mut() {
        c.configure(q, sigma, plan.clip_norm, l);
    }
    let mut streams = match (&opts.streams_key, plan.seed) {
        (None, seed) => RandomStreams::new(seed),
        (Some(k), None) => RandomStreams::from_key(k),
        (Some(_), Some(_)) => {
            return Err(RunError::Plan("a run keyed by a secret streams key cannot also be seeded".into()))
        }
    };
    let target_modules = match &plan.target_modules {
        Some(t) => t.clone(),
        None => arch.default_lora_targets_of(&plan.model_dir)?,
    };
    let spec = LoraSpec {
        rank: plan.lora_rank,
        alpha: plan.lora_alpha,
        targets: target_modules.clone(),
        layers: plan.lora_layers.clone(),
    };
    let in_use_before_model = crate::memory::in_use(&device)?;
    let mut model: Box<dyn DpModel> = match arch {
        Architecture::Bert if plan.base_format().is_quantized() => {
            return Err(RunError::Plan(
                "model.quantize, model.quantize-vocab: quantized base weights are implemented for the Llama family only (this is a BERT-family model)"
                    .into(),
            ))
        }
        Architecture::Bert => Box::new(
            BertClassifier::load(&plan.model_dir, Some(&spec), train.labels.len(), &mut streams.init, &device)?
                .with_base_dtype(plan.base_dtype())?,
        ),
        Architecture::Llama => {
            Box::new(LlamaLm::load(&plan.model_dir, Some(&spec), &mut streams.init, &device, plan.base_format())?)
        }
    };
    let model_hash = checkpoint::model_hash(&plan.model_dir)?;
    // Checked before training: a reference that does not match fails now, not after hours.
    let reference = match &opts.reference {
        Some(dir) => Some(read_reference(dir, &model_hash, &train, &test)?),
        None => None,
    };
    let fingerprint = Fingerprint {
        config_sha256: plan.config_hash.clone(),
        config_text: plan.config_text.clone(),
        model_sha256: model_hash.clone(),
        train_sha256: train.content_hash.clone(),
        test_sha256: test.content_hash.clone(),
        non_private: opts.non_private,
    };
    let resumed = match &opts.resume {
        None => None,
        Some(path) => Some(read_resume_checkpoint(path, &fingerprint, n, q, sigma, probe_steps, opts.non_private)?),
    };
    // The memory plan and the micro-batch size (before anything else is computed in
    // micro-batches: the base model's metric, the feature cache).
    let weights = match (in_use_before_model, crate::memory::in_use(&device)?) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let resumed_micro_batch = resumed.as_ref().and_then(|(_, c)| c.state.micro_batch);
    let memory = memory_plan(plan, model.as_ref(), &mech, n, weights, resumed_micro_batch)?;
    eprint!("{}", memory.render());
    let micro = crate::data::MicroBatchLimits { examples: memory.micro_batch, tokens: plan.max_tokens };
    // The base model's held-out perplexity (B = 0: the adapters add exactly nothing yet).
    let base_test_metric = match model.task() {
        Task::CausalLm => Some(model.evaluate(&test.examples, memory.micro_batch)?),
        Task::Classification => None,
    };
    let seeded = streams.seeded;
    let key = match &resumed {
        Some((_, c)) => CommitmentKey::from_hex(&c.state.commitment_key)
            .map_err(|m| CheckpointError::Corrupt { path: plan.output_dir.clone(), message: m })?,
        None if seeded => CommitmentKey::from_rng(&mut streams.commitment),
        None => CommitmentKey::fresh(),
    };
    let inputs = report::Inputs {
        train: input_file(&plan.train_path, &train.content_hash, &key)?,
        test: input_file(&plan.test_path, &test.content_hash, &key)?,
        config: input_file(&plan.config_path, &plan.config_hash, &key)?,
    };
    let layout = FlatParams::from_named(&model.trainable())?;
    let params = match &resumed {
        None => layout.to_tensor(model.device())?,
        Some((dir, c)) => {
            if c.params.len() != layout.len() {
                return Err(CheckpointError::Corrupt {
                    path: dir.clone(),
                    message: format!("{} parameters, the model has {}", c.params.len(), layout.len()),
                }
                .into());
            }
            let p = candle_core::Tensor::from_vec(c.params.clone(), layout.len(), model.device())?;
            model.set_trainable(&layout.split(&p)?)?;
            p
        }
    };
    // Frozen lower layers: computed once per record (a function of that record alone).
    let cache = feature_cache(model.as_ref(), &train.examples, micro)?;
    let mut opt = new_optimizer(plan);
    let mut ema = plan.ema_decay.map(ParamEma::new);
    let (sampler, noise, ledger, metrics, start, prior_seconds, examples_seen) = match resumed {
        None => (
            PoissonSampler::new(q, streams.sampling.clone()),
            GaussianNoise::new(streams.noise.clone()),
            Ledger::default(),
            Vec::with_capacity(steps as usize),
            0,
            0.0,
            0usize,
        ),
        Some((dir, c)) => {
            let bad = |message: String| CheckpointError::Corrupt { path: dir.clone(), message };
            let rng = c.state.sampler.restore().map_err(bad)?;
            let mut vectors = c.optimizer_vectors;
            match (&mut opt, &c.state.optimizer) {
                (Optimizer::AdamW(o), OptimizerState::AdamW { steps }) => {
                    let moments = match (vectors.remove("adam_m"), vectors.remove("adam_v")) {
                        (Some(m), Some(v)) => Some((m, v)),
                        (None, None) => None,
                        _ => return Err(bad("AdamW state has one moment vector without the other".into()).into()),
                    };
                    o.restore(*steps, moments)?;
                }
                (Optimizer::Sgd(o), OptimizerState::Sgd) => {
                    o.restore(vectors.remove("sgd_velocity"), model.device())?
                }
                _ => return Err(bad("the optimiser differs from the config's".into()).into()),
            }
            // The average exists exactly when the config asks for one and a LoRA step was taken.
            let average = vectors.remove("ema");
            match (&mut ema, average) {
                (Some(e), a) if a.is_some() == (c.state.step > probe_steps) => e.restore(a, model.device())?,
                (None, None) => {}
                (e, a) => {
                    return Err(bad(format!(
                    "the checkpoint {} a parameter average at step {} (probe steps {probe_steps}); the config {} one",
                    if a.is_some() { "holds" } else { "lacks" },
                    c.state.step,
                    if e.is_some() { "asks for" } else { "does not ask for" }
                ))
                    .into())
                }
            }
            (
                PoissonSampler::new(q, rng),
                GaussianNoise::from_key(crate::kernels::NoiseKey::new(c.state.noise_key)),
                c.state.ledger,
                c.state.metrics,
                c.state.step,
                c.state.train_seconds,
                c.state.examples_seen,
            )
        }
    };
    // ε of the planned steps by the run's accountant, before any step: an accountant failure
    // (e.g. a σ too small for the PLD grid) stops the run here, not after training. Every step is
    // the same PoissonSampled(q, Gaussian(σ)), and the ledger of k such steps is exactly this
    // event (`Ledger::as_event`), so the stop rule evaluates what the certificate will.
    let eps_of =
        |k: u64| crate::accounting::epsilon(plan.accountant, &Ledger::uniform(q, sigma, k).as_event(), plan.delta);
    let max_steps = if opts.non_private {
        None
    } else {
        let planned = eps_of(steps)?;
        match target {
            Some(target) if planned > target => {
                // Largest k with ε(k) ≤ target (bisection on the monotone step count).
                let (mut ok, mut bad) = (0u64, steps);
                while bad - ok > 1 {
                    let mid = ok + (bad - ok) / 2;
                    if eps_of(mid)? <= target {
                        ok = mid;
                    } else {
                        bad = mid;
                    }
                }
                Some(ok)
            }
            _ => None,
        }
    };
    Ok(Prepared {
        train,
        test,
        q,
        steps,
        probe_steps,
        sigma,
        target,
        mech,
        seeded,
        target_modules,
        model,
        base_test_metric,
        model_hash,
        reference,
        fingerprint,
        key,
        inputs,
        layout,
        params,
        cache,
        opt,
        ema,
        sampler,
        noise,
        ledger,
        metrics,
        start,
        prior_seconds,
        examples_seen,
        max_steps,
        micro,
        memory,
        steps_peak: None,
        n,
        canaries,
    })
}

/// The run's memory plan: the micro-batch size is the config's `training.max-physical-batch`
/// when set, a resumed checkpoint's when resuming, else the largest up to the default that the
/// measured step memory fits in the available memory. Refuses a run whose plan does not fit
/// even one example, naming the numbers. The step is measured on synthetic sequences of
/// max-seq-len tokens (public quantities), so the choice depends on no record.
fn memory_plan(
    plan: &Plan,
    model: &dyn DpModel,
    mech: &Mechanism,
    n: usize,
    weights: Option<u64>,
    resumed: Option<usize>,
) -> Result<crate::memory::MemoryPlan, RunError> {
    use crate::memory::{fitting_micro_batch, MemoryPlan, MicroBatchChoice};
    let device = model.device().clone();
    let trainable: usize = model.trainable().iter().map(|(_, t)| t.elem_count()).sum();
    let tokens = plan.max_seq_len;
    let cache = if model.first_adapted_layer() > 0 { (n * tokens * model.hidden_size() * 4) as u64 } else { 0 };
    // training.max-memory-gib bounds the whole run: the loaded model counts against it.
    let available =
        match (crate::memory::available(&device)?, plan.max_memory.map(|m| m.saturating_sub(weights.unwrap_or(0)))) {
            (Some(a), Some(m)) => Some(a.min(m)),
            (a, m) => a.or(m),
        };
    // values and gradient f32, AdamW's two moments f64.
    let optimizer = (trainable * (4 + 4 + 16)) as u64;
    let room = available.map(|a| ((a as f64 * crate::memory::HEADROOM) as u64).saturating_sub(optimizer + cache));
    let step = crate::memory::measure_step(model, mech.clip, mech.clip_kind, tokens, room)?;
    let mut m = MemoryPlan {
        device: plan.device.name(),
        available,
        weights,
        trainable_params: trainable,
        optimizer,
        cache,
        step,
        at_choice: None,
        tokens,
        micro_batch: plan.max_physical_batch,
        choice: MicroBatchChoice::Configured,
    };
    if let Some(b) = resumed {
        m.micro_batch = b;
        m.choice = MicroBatchChoice::Resumed;
        return Ok(m);
    }
    if plan.max_physical_batch_configured {
        if let (Some(p), Some(a)) = (m.planned(m.micro_batch), m.available) {
            if p as f64 > a as f64 * crate::memory::HEADROOM {
                eprintln!(
                    "warning: micro-batches of {} (training.max-physical-batch) are planned to need {} of {} available",
                    m.micro_batch,
                    crate::memory::bytes(p),
                    crate::memory::bytes(a)
                );
            }
        }
        return Ok(m);
    }
    m.choice = MicroBatchChoice::Automatic;
    if let (Some(fit), Some(a)) = (m.step, m.available) {
        let b = fitting_micro_batch(m.optimizer + m.cache + fit.fixed, fit.per_example, a, plan.max_physical_batch);
        if b == 0 {
            return Err(RunError::Plan(format!(
                "not enough memory on {}: one example of {tokens} tokens is planned to need {} beyond the model, {} is available \
                 (planning to use {:.0}% of it); shorten model.max-seq-len, adapt fewer layers or use a device with more memory\n{}",
                m.device,
                crate::memory::bytes(m.planned(1).unwrap_or(0)),
                crate::memory::bytes(a),
                crate::memory::HEADROOM * 100.0,
                m.render()
            )));
        }
        m.micro_batch = b;
        // The fit is from 1 and 4 examples: above that, measure the chosen size itself and step
        // down (proportionally) while it does not fit.
        let budget = a as f64 * crate::memory::HEADROOM;
        for _ in 0..4 {
            if m.micro_batch <= 4 {
                break;
            }
            let Some(at) = crate::memory::measure_micro_batch(model, mech.clip, mech.clip_kind, tokens, m.micro_batch)?
            else {
                break;
            };
            let fixed = (m.optimizer + m.cache) as f64;
            m.at_choice = Some(at);
            if fixed + at as f64 <= budget {
                break;
            }
            let scaled = (m.micro_batch as f64 * (budget - fixed).max(0.0) / at as f64).floor() as usize;
            m.micro_batch = scaled.clamp(1, m.micro_batch - 1);
            m.at_choice = None;
        }
    }
    Ok(m)
}

/// Reads the checkpoint `--resume PATH` names and refuses it unless it belongs to this run and
/// every part of its state accounts for the same steps.
fn read_resume_checkpoint(
    path: &std::path::Path,
    fingerprint: &Fingerprint,
    n: usize,
    q: f64,
    sigma: f64,
    probe_steps: u64,
    non_private: bool,
) -> Result<(std::path::PathBuf, Checkpoint), RunError> {
    let dir = checkpoint::locate(path)?;
    let c = Checkpoint::read(&dir)?;
    let mut diffs = c.state.fingerprint.differences(fingerprint);
    if c.state.noise_multiplier != sigma || c.state.sample_rate != q {
        diffs.push(format!(
            "σ / q: the checkpoint has {} / {}, this run computes {sigma} / {q}",
            c.state.noise_multiplier, c.state.sample_rate
        ));
    }
    if !diffs.is_empty() {
        return Err(CheckpointError::Mismatch { path: dir, differences: diffs.join("; ") }.into());
    }
    // The ledger must account for exactly the steps taken, each with this run's q and σ: a
    // shortened or altered ledger would under-state ε in the certificate; a sampler position that
    // does not match the steps would replay (or skip) samples the ledger counts as fresh.
    let expected = if non_private { Ledger::default() } else { Ledger::uniform(q, sigma, c.state.step) };
    let mut problems = c.state.consistency_problems(n, probe_steps);
    if c.state.ledger != expected || c.state.metrics.len() as u64 != c.state.step {
        problems.push(format!(
            "its ledger ({} steps) and metrics ({} lines) do not account for its {} steps at q = {q}, σ = {sigma}",
            c.state.ledger.steps(),
            c.state.metrics.len(),
            c.state.step
        ));
    }
    if !problems.is_empty() {
        return Err(CheckpointError::Corrupt { path: dir, message: problems.join("; ") }.into());
    }
    eprintln!("resuming from {} (step {} of {})", dir.display(), c.state.step, c.state.planned_steps);
    Ok((dir, c))
}

/// A fresh optimiser of the plan's kind (LoRA phase and linear probe each have their own).
fn new_optimizer(plan: &Plan) -> Optimizer {
    match plan.optimizer {
        OptimizerKind::AdamW { eps } => Optimizer::AdamW(FusedAdamW::new(plan.weight_decay, eps)),
        OptimizerKind::Sgd { momentum } => Optimizer::Sgd(SgdMomentum::new(momentum, plan.weight_decay)),
    }
}

/// The linear probe's state during its steps (see `model::probe`).
struct Probe {
    model: LinearProbe,
    examples: Vec<crate::data::Example>,
    cache: crate::data::FeatureCache,
    layout: FlatParams,
    params: candle_core::Tensor,
    opt: Optimizer,
}

impl Probe {
    /// Pooled features of every training record from the model as it starts (every LoRA B zero:
    /// checked, so these are the frozen base model's), and a probe from the model's head.
    fn new(plan: &Plan, p: &Prepared) -> Result<Probe, RunError> {
        let trainable = p.model.trainable();
        for (name, t) in &trainable {
            if name.contains("lora_B")
                && t.abs()?.max_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? != 0.0
            {
                return Err(RunError::Plan(format!(
                    "linear probe: {name} is not zero, so the pooled features would depend on trained tensors"
                )));
            }
        }
        let (examples, cache) = probe_data(p.model.as_ref(), &p.train.examples, p.cache.as_ref(), p.micro)?;
        let [.., (_, w), (_, b)] = trainable.as_slice() else {
            return Err(RunError::Plan("linear probe: the model has no head".into()));
        };
        let model = LinearProbe::new(w.clone(), b.clone())?;
        let layout = FlatParams::from_named(&model.trainable())?;
        let params = layout.to_tensor(model.device())?;
        let opt = new_optimizer(plan);
        Ok(Probe { model, examples, cache, layout, params, opt })
    }

    /// The trained head goes into the full model (the last tensors of its flat parameters); its
    /// LoRA tensors are untouched.
    fn install(self, p: &mut Prepared) -> Result<(), RunError> {
        let head = self.layout.split(&self.params)?;
        let mut all = p.layout.split(&p.params)?;
        let k = all.len() - head.len();
        all.splice(k.., head);
        let flat: Vec<candle_core::Tensor> = all.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<_>>()?;
        p.params = candle_core::Tensor::cat(&flat, 0)?;
        p.model.set_trainable(&p.layout.split(&p.params)?)?;
        Ok(())
    }
}

/// What the steps produced.
struct Trained {
    stopped_early: Option<String>,
    train_seconds: f64,
}

fn train(plan: &Plan, opts: &RunOptions, dir: &RunDir, p: &mut Prepared) -> Result<Trained, RunError> {
    let n = p.n;
    let (q, sigma, steps) = (p.q, p.sigma, p.steps);
    let rdp_accountant = RdpAccountant::default();
    let bar = if opts.progress { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    bar.set_position(p.start);
    let mut stopped_early = None;
    let limit = p.max_steps.unwrap_or(steps);
    if opts.resume.is_some() && p.start >= limit {
        eprintln!(
            "no steps left: the checkpoint is at step {}, the last one {}{}; writing the outputs from it",
            p.start,
            if p.max_steps.is_some() { "within the privacy budget" } else { "planned" },
            p.target.map(|t| format!(" (target ε = {t})")).unwrap_or_default()
        );
    }
    let checkpoints = dir.checkpoints();
    let save = |p: &Prepared, step: u64| -> Result<std::path::PathBuf, RunError> {
        let mut vectors = std::collections::HashMap::new();
        let optimizer = match &p.opt {
            Optimizer::AdamW(o) => {
                let (steps, moments) = o.state()?;
                if let Some((m, v)) = moments {
                    vectors.insert("adam_m".to_string(), m);
                    vectors.insert("adam_v".to_string(), v);
                }
                OptimizerState::AdamW { steps }
            }
            Optimizer::Sgd(o) => {
                if let Some(v) = o.state()? {
                    vectors.insert("sgd_velocity".to_string(), v);
                }
                OptimizerState::Sgd
            }
        };
        if let Some(v) = p.ema.as_ref().map(|e| e.state()).transpose()?.flatten() {
            vectors.insert("ema".to_string(), v);
        }
        let mut c = Checkpoint {
            state: State {
                format: checkpoint::FORMAT,
                engine: report::ENGINE.into(),
                step,
                planned_steps: steps,
                max_steps: p.max_steps,
                noise_multiplier: sigma,
                sample_rate: q,
                target_epsilon: p.target,
                sampler: RngState::of(p.sampler.rng()),
                noise_key: *p.noise.key().bytes(),
                commitment_key: p.key.to_hex(),
                seeded: p.seeded,
                optimizer,
                ledger: p.ledger.clone(),
                metrics: p.metrics.clone(),
                examples_seen: p.examples_seen,
                train_seconds: p.prior_seconds + started.elapsed().as_secs_f64(),
                fingerprint: p.fingerprint.clone(),
                micro_batch: Some(p.micro.examples),
                tensors_sha256: String::new(),
            },
            params: p.params.to_vec1::<f32>()?,
            optimizer_vectors: vectors,
        };
        Ok(c.write(&checkpoints, plan.keep_checkpoints)?)
    };
    // The linear probe (the first `probe_steps` steps; never checkpointed, so a resumed run is
    // always past it): the head alone, on the frozen model's pooled features.
    let mut probe = if p.start < p.probe_steps { Some(Probe::new(plan, p)?) } else { None };
    for t in p.start..steps {
        if let (Some(limit), Some(target)) = (p.max_steps, p.target) {
            // Stop rule: never take the step that would exceed the target.
            if t >= limit {
                stopped_early = Some(format!("step {} would spend more than the target ε = {target}", t + 1));
                break;
            }
        }
        let indices = p.sampler.sample(n);
        let (indices, sampled_canaries) = match &p.canaries {
            Some(c) => c.split(&indices, p.train.len()),
            None => (indices, Vec::new()),
        };
        let block = p.canaries.as_ref().map(|c| c.block(&sampled_canaries));
        let (rep, lr, canary_grad) = if let Some(pr) = probe.as_mut().filter(|_| t < p.probe_steps) {
            let (grad, canary_grad, rep) = private_gradient_audited(
                &pr.model,
                &pr.examples,
                Some(&pr.cache),
                &indices,
                p.micro,
                pr.layout.len(),
                &p.mech,
                &p.noise,
                t,
                ClipImpl::Fused,
                block,
            )?;
            let lr =
                learning_rate(plan.linear_probe_learning_rate, t, 0, p.probe_steps, crate::config::LrSchedule::Linear);
            pr.opt.step(&pr.params, &grad, lr)?;
            pr.model.set_trainable(&pr.layout.split(&pr.params)?)?;
            if t + 1 == p.probe_steps {
                probe.take().expect("in the probe").install(p)?;
            }
            (rep, lr, canary_grad)
        } else {
            let (grad, canary_grad, rep) = private_gradient_audited(
                p.model.as_ref(),
                &p.train.examples,
                p.cache.as_ref(),
                &indices,
                p.micro,
                p.layout.len(),
                &p.mech,
                &p.noise,
                t,
                ClipImpl::Fused,
                block,
            )?;
            let lora_t = t - p.probe_steps;
            let lr =
                learning_rate(plan.learning_rate, lora_t, plan.warmup_steps, steps - p.probe_steps, plan.lr_schedule);
            if let (Some(e), 0) = (p.ema.as_mut(), lora_t) {
                e.start(&p.params)?;
            }
            p.opt.step(&p.params, &grad, lr)?;
            if let Some(e) = p.ema.as_mut() {
                e.update(&p.params, lora_t)?;
            }
            p.model.set_trainable(&p.layout.split(&p.params)?)?;
            (rep, lr, canary_grad)
        };
        if let (Some(c), Some(g)) = (p.canaries.as_mut(), canary_grad) {
            c.observe(&g)?;
        }
        if !opts.non_private {
            p.ledger.record_step(q, sigma);
        }
        p.examples_seen += rep.batch_size;
        let eps = if opts.non_private {
            f64::INFINITY
        } else {
            rdp_accountant.epsilon(&p.ledger.as_event(), plan.delta)?.epsilon
        };
        let m = StepMetrics {
            step: t + 1,
            batch_size: rep.batch_size,
            mean_loss: if rep.batch_size > 0 { rep.loss_sum / rep.batch_size as f64 } else { f64::NAN },
            clipped_fraction: if rep.batch_size > 0 { rep.clipped as f64 / rep.batch_size as f64 } else { 0.0 },
            nonfinite: rep.nonfinite,
            epsilon_rdp: eps,
            learning_rate: lr,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        let msg = format!(
            "ε(rdp) ≤ {}  loss {:.4}  {:.1} ex/s",
            report::round_up(eps, 3),
            m.mean_loss,
            p.examples_seen as f64 / started.elapsed().as_secs_f64()
        );
        if !opts.progress && opts.log_lines && ((t + 1) % (steps / 10).max(1) == 0 || t + 1 == steps) {
            eprintln!("step {}/{steps}  {msg}", t + 1);
        }
        bar.set_message(msg);
        bar.inc(1);
        p.metrics.push(m);
        let done = t + 1;
        if done < p.probe_steps {
            // Inside the probe: no checkpoint (a signal is acted on after its last step).
            continue;
        }
        let signalled = super::interrupt::requested();
        if (signalled || opts.stop_after == Some(done)) && done < limit {
            bar.abandon();
            let path = save(p, done)?;
            return Err(RunError::Interrupted {
                why: if signalled { "by a signal" } else { "as asked (--stop-after-step)" },
                step: done,
                planned: limit,
                checkpoint: path.display().to_string(),
                run_dir: plan.output_dir.display().to_string(),
            });
        }
        if plan.checkpoint_every > 0 && done.is_multiple_of(plan.checkpoint_every) && done < limit {
            save(p, done)?;
        }
    }
    bar.finish();
    if let Some(pr) = probe.take() {
        // Stopped inside the probe (the stop rule): the head trained so far still goes in.
        pr.install(p)?;
    }
    // The final state (also what a crash while writing the outputs would resume from).
    save(p, p.metrics.len() as u64)?;
    if let Some(why) = &stopped_early {
        eprintln!("stopped before the privacy budget was exceeded: {why}");
    }
    Ok(Trained { stopped_early, train_seconds: p.prior_seconds + started.elapsed().as_secs_f64() })
}

fn release(
    plan: &Plan,
    opts: &RunOptions,
    dir: &RunDir,
    mut p: Prepared,
    trained: Trained,
) -> Result<RunOutcome, RunError> {
    let canaries = p.canaries.take();
    // The parameter average (when configured and a LoRA step was taken) is what is released and
    // evaluated; the last step's parameters stay in the final checkpoint.
    let mut last_iterate_test_metric = None;
    let averaged = match p.ema.as_ref().map(|e| e.average()).transpose()?.flatten() {
        Some(avg) => {
            // The last iterate's metric too (private part only), so a user sees what averaging did.
            let scores = p.model.score_examples(&p.test.examples, p.micro.examples.max(1))?;
            last_iterate_test_metric = Some(crate::model::EvalResult::aggregate(scores.iter().copied()));
            p.model.set_trainable(&p.layout.split(&avg)?)?;
            p.params = avg;
            true
        }
        None => {
            if plan.ema_decay.is_some() {
                eprintln!(
                    "note: training.ema-decay is set but no LoRA step was taken: the adapter holds the parameters after the last step (the report says so)"
                );
            }
            false
        }
    };
    let eval_batch = p.micro.examples.max(1);
    let eval_started = Instant::now();
    let scores = p.model.score_examples(&p.test.examples, eval_batch)?;
    let test_metric = crate::model::EvalResult::aggregate(scores.iter().copied());
    let test_groups = super::eval::per_group(&scores, &p.test.groups);
    if std::env::var_os("DPTRAIN_TIMING").is_some() {
        eprintln!("timing: train {:.1}s, eval {:.1}s", trained.train_seconds, eval_started.elapsed().as_secs_f64());
    }
    let event = p.ledger.as_event();
    // The run's own accountant must succeed (it was evaluated for the planned steps before
    // training); the other one is a cross-check and may be unavailable.
    let (rdp, pld) = if opts.non_private {
        (None, None)
    } else {
        (
            Some(RdpAccountant::default().epsilon(&event, plan.delta)),
            Some(PldAccountant::default().epsilon(&event, plan.delta)),
        )
    };
    let pld_eps = pld.as_ref().map(|r| r.as_ref().map(|x| x.epsilon).map_err(|e| e.to_string()));
    let rdp_eps = rdp.as_ref().map(|r| r.as_ref().map(|x| x.epsilon).map_err(|e| e.to_string()));
    let certified = match plan.accountant {
        AccountantKind::Pld => pld_eps.clone(),
        AccountantKind::Rdp => rdp_eps.clone(),
    }
    .transpose()
    .map_err(|e| RunError::Plan(format!("the {} accountant failed on the ledger: {e}", plan.accountant.name())))?;
    // Before any output is written: the certified ε from the ledger is within the target.
    if let (Some(eps), Some(t)) = (certified, p.target) {
        if eps > t {
            return Err(RunError::Plan(format!(
                "the certified ε {eps} exceeds the target {t}: no outputs written (the checkpoints in {} are kept)",
                dir.checkpoints().display()
            )));
        }
    }
    if let Some(Ok(r)) = &rdp {
        if r.order_at_grid_edge {
            eprintln!(
                "warning: the RDP optimal order {} is at the edge of the order grid; ε may be loose",
                r.optimal_order
            );
        }
    }
    let epsilon_curve = if opts.non_private { Vec::new() } else { epsilon_curve(&p.ledger, plan.delta) };
    let summary = RunSummary {
        non_private: opts.non_private,
        epsilon: certified,
        epsilon_pld: pld_eps.map(report::Epsilon::of),
        epsilon_rdp: rdp_eps.map(report::Epsilon::of),
        rdp_optimal_order: rdp.as_ref().and_then(|r| r.as_ref().ok()).map(|r| r.optimal_order),
        target_epsilon: p.target,
        delta: plan.delta,
        noise_multiplier: p.sigma,
        sample_rate: p.q,
        expected_batch_size: plan.expected_batch_size,
        steps: p.metrics.len() as u64,
        planned_steps: p.steps,
        linear_probe_steps: p.probe_steps.min(p.metrics.len() as u64),
        ema_decay: plan.ema_decay.filter(|_| averaged),
        clip_norm: p.mech.clip,
        seeded: p.seeded,
        // N as sampled: an audited run's inserted canaries are records of its training set.
        dataset_size: p.n,
        test_size: p.test.len(),
        inputs: p.inputs.clone(),
        labels: p.train.labels.clone(),
        task: p.model.task(),
        target_modules: p.target_modules.clone(),
        adapted_modules: report::adapted_modules(p.model.as_ref()),
        test_metric,
        last_iterate_test_metric,
        base_test_metric: p.base_test_metric,
        test_groups,
        reference: p.reference.clone(),
        model_hash: p.model_hash.clone(),
        epsilon_curve,
        train_seconds: trained.train_seconds,
        examples_per_second: p.examples_seen as f64 / trained.train_seconds,
        stopped_early: trained.stopped_early,
        ledger: p.ledger.clone(),
        memory: p.memory.to_json(p.steps_peak),
    };
    report::write_outputs(plan, dir, p.model.as_ref(), &summary, &p.metrics, &p.key)?;
    if !plan.keep_final_checkpoint {
        dir.remove_checkpoints()?;
    }
    Ok(RunOutcome { summary, canaries, model: p.model })
}

/// ε after each of up to `EPSILON_CURVE_POINTS` evenly spaced steps (always including the last),
/// by both accountants, from the ledger's prefixes.
fn epsilon_curve(ledger: &Ledger, delta: f64) -> Vec<report::EpsilonPoint> {
    const EPSILON_CURVE_POINTS: u64 = 40;
    let total = ledger.steps();
    let mut steps: Vec<u64> = (1..=EPSILON_CURVE_POINTS).map(|i| (i * total).div_ceil(EPSILON_CURVE_POINTS)).collect();
    steps.dedup();
    steps.retain(|&k| k > 0);
    let (pld, rdp) = (PldAccountant::default(), RdpAccountant::default());
    steps
        .into_iter()
        .map(|k| {
            let event = ledger.prefix(k).as_event();
            report::EpsilonPoint {
                step: k,
                pld: pld.epsilon(&event, delta).ok().map(|e| e.epsilon),
                rdp: rdp.epsilon(&event, delta).ok().map(|e| e.epsilon),
            }
        })
        .collect()
}

/// The held-out metrics of a non-private run in the run folder `dir`, refused unless it is
/// non-private and used the same base model, training data and held-out data (checked against
/// the plain hashes in its private part: the release carries only keyed commitments).
fn read_reference(
    dir: &std::path::Path,
    model_hash: &str,
    train: &Dataset,
    test: &Dataset,
) -> Result<report::Reference, RunError> {
    let bad = |why: String| RunError::Plan(format!("--reference {}: {why}", dir.display()));
    let read = |path: std::path::PathBuf| -> Result<serde_json::Value, RunError> {
        let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| bad(format!("{} is not JSON: {e}", path.display())))
    };
    let path = dir.join(rundir::RELEASE).join("privacy_report.json");
    let r = read(path.clone())?;
    let private = read(dir.join(rundir::PRIVATE).join(rundir::RUN_RECORD))?;
    if r["private"].as_bool() != Some(false) {
        return Err(bad("is not a non-private run (train it with --non-private)".into()));
    }
    let same = |what: &str, theirs: &serde_json::Value, ours: &str| {
        if theirs.as_str() == Some(ours) {
            Ok(())
        } else {
            Err(bad(format!("its {what} differs (sha256 {} there, {ours} here)", theirs)))
        }
    };
    same("base model", &r["base_model"]["sha256"], model_hash)?;
    same("training data", &private["inputs"]["train"]["sha256"], &train.content_hash)?;
    same("held-out data", &private["inputs"]["test"]["sha256"], &test.content_hash)?;
    let test_metric = serde_json::from_value(r["metrics"]["test"].clone())
        .map_err(|e| bad(format!("no held-out metric in {}: {e}", path.display())))?;
    let test_groups = serde_json::from_value(r["metrics"]["test_groups"].clone())
        .map_err(|e| bad(format!("bad per-group metrics in {}: {e}", path.display())))?;
    Ok(report::Reference { dir: dir.display().to_string(), test_metric, test_groups })
}

/// Training and held-out data in the format of the model's task.
pub fn load_data(plan: &Plan, arch: Architecture) -> Result<(Dataset, Dataset), RunError> {
    // model.max-seq-len against the model's positions, before any record is read.
    let positions = match arch {
        Architecture::Bert => {
            // RoBERTa's positions start after the padding index (514 embeddings hold 512 tokens).
            let c = crate::model::BertConfig::from_file(&plan.model_dir.join("config.json"))?;
            Some(c.max_position_embeddings - c.position_offset())
        }
        Architecture::Llama => LlamaConfig::from_file(&plan.model_dir.join("config.json"))?.max_position_embeddings,
    };
    if let Some(p) = positions.filter(|&p| plan.max_seq_len > p) {
        return Err(RunError::Plan(format!(
            "model.max-seq-len {} exceeds the {p} positions of the model's max_position_embeddings ({})",
            plan.max_seq_len,
            plan.model_dir.join("config.json").display()
        )));
    }
    match arch {
        Architecture::Bert => {
            let tokenizer = load_tokenizer(&plan.model_dir, Some(plan.max_seq_len))?;
            let train = load_classification(&plan.train_path, &tokenizer, plan.labels.as_deref())?;
            let test = load_classification(&plan.test_path, &tokenizer, Some(&train.labels))?;
            Ok((train, test))
        }
        Architecture::Llama => {
            if plan.labels.is_some() {
                return Err(RunError::Plan(
                    "data.labels: a Llama-family model trains language modelling, which has no labels".into(),
                ));
            }
            let cfg = LlamaConfig::from_file(&plan.model_dir.join("config.json"))?;
            let tokenizer = load_tokenizer(&plan.model_dir, None)?;
            let train = load_lm(&plan.train_path, &tokenizer, plan.max_seq_len, cfg.eos_token())?;
            let test = load_lm(&plan.test_path, &tokenizer, plan.max_seq_len, cfg.eos_token())?;
            Ok((train, test))
        }
    }
}
