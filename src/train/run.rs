//! The run loop: plan → data → model → steps (each recorded in the ledger, the step that would
//! exceed the target ε never taken) → evaluation → outputs.

use super::checkpoint::{self, Checkpoint, CheckpointError, Fingerprint, OptimizerState, RngState, State};
use super::eval::feature_cache;
use super::optimizer::{learning_rate, Optimizer, SgdMomentum};
use super::params::FlatParams;
use super::step::{private_gradient, Mechanism};
use crate::accounting::event::Ledger;
use crate::accounting::{AccountantKind, PldAccountant, RdpAccountant};
use crate::config::{NoiseSpec, OptimizerKind, Plan};
use crate::data::{load_classification, load_lm, Dataset, PoissonSampler};
use crate::kernels::FusedAdamW;
use crate::model::bert::{load_tokenizer, LoraSpec};
use crate::model::{Architecture, BertClassifier, DpModel, LlamaConfig, LlamaLm, Task};
use crate::privacy::{GaussianNoise, RandomStreams};
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
}

pub struct RunOutcome {
    pub summary: RunSummary,
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

pub fn run(plan: &Plan, opts: &RunOptions) -> Result<RunOutcome, RunError> {
    if opts.resume.is_none() {
        report::check_output_dir(&plan.output_dir, opts.overwrite)?;
        if checkpoint::has_checkpoints(&plan.output_dir) {
            if !opts.overwrite {
                return Err(RunError::Plan(format!(
                    "output folder {0} holds checkpoints of an earlier run: continue it with --resume {0}, or pass --overwrite to start over",
                    plan.output_dir.display()
                )));
            }
            let old = plan.output_dir.join(checkpoint::CHECKPOINT_DIR);
            std::fs::remove_dir_all(&old).map_err(|source| CheckpointError::Io { path: old, source })?;
        }
    }
    // Open the device first: a missing GPU or a CPU-only build fails before any data is read.
    let device = plan.device.open()?;
    let arch = Architecture::detect(&plan.model_dir)?;
    let (train, test) = load_data(plan, arch)?;
    let n = train.len();
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
    let rdp_accountant = RdpAccountant::default();
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
        Mechanism { clip: None, noise_multiplier: 0.0, expected_batch_size: l }
    } else {
        Mechanism { clip: Some(plan.clip_norm), noise_multiplier: sigma, expected_batch_size: l }
    };

    let mut streams = RandomStreams::new(plan.seed);
    let target_modules = plan.target_modules.clone().unwrap_or_else(|| arch.default_lora_targets());
    let spec = LoraSpec {
        rank: plan.lora_rank,
        alpha: plan.lora_alpha,
        targets: target_modules.clone(),
        layers: plan.lora_layers.clone(),
    };
    let mut model: Box<dyn DpModel> = match arch {
        Architecture::Bert => Box::new(
            BertClassifier::load(&plan.model_dir, Some(&spec), train.labels.len(), &mut streams.init, &device)?
                .with_base_dtype(plan.base_dtype())?,
        ),
        Architecture::Llama => {
            Box::new(LlamaLm::load(&plan.model_dir, Some(&spec), &mut streams.init, &device, plan.base_dtype())?)
        }
    };
    let eval_batch = plan.max_physical_batch.max(1);
    // The base model's held-out perplexity (B = 0: the adapters add exactly nothing yet).
    let base_test_metric = match model.task() {
        Task::CausalLm => Some(model.evaluate(&test.examples, eval_batch)?),
        Task::Classification => None,
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
        Some(path) => {
            let dir = checkpoint::locate(path)?;
            let c = Checkpoint::read(&dir)?;
            let mut diffs = c.state.fingerprint.differences(&fingerprint);
            if c.state.noise_multiplier != sigma || c.state.sample_rate != q {
                diffs.push(format!(
                    "σ / q: the checkpoint has {} / {}, this run computes {sigma} / {q}",
                    c.state.noise_multiplier, c.state.sample_rate
                ));
            }
            if !diffs.is_empty() {
                return Err(CheckpointError::Mismatch { path: dir, differences: diffs.join("; ") }.into());
            }
            // The ledger must account for exactly the steps taken, each with this run's q and σ:
            // a shortened or altered ledger would under-state ε in the certificate.
            let mut expected = Ledger::default();
            if !opts.non_private {
                for _ in 0..c.state.step {
                    expected.record_step(q, sigma);
                }
            }
            if c.state.ledger != expected || c.state.metrics.len() as u64 != c.state.step {
                return Err(CheckpointError::Corrupt {
                    path: dir,
                    message: format!(
                        "its ledger ({} steps) and metrics ({} lines) do not account for its {} steps at q = {q}, σ = {sigma}",
                        c.state.ledger.steps(),
                        c.state.metrics.len(),
                        c.state.step
                    ),
                }
                .into());
            }
            eprintln!("resuming from {} (step {} of {})", dir.display(), c.state.step, c.state.planned_steps);
            Some(c)
        }
    };
    let layout = FlatParams::from_named(&model.trainable())?;
    let params = match &resumed {
        None => layout.to_tensor(model.device())?,
        Some(c) => {
            if c.params.len() != layout.len() {
                return Err(CheckpointError::Corrupt {
                    path: plan.output_dir.clone(),
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
    let cache = feature_cache(model.as_ref(), &train.examples, plan.micro_batch_limits())?;
    let mut opt = match plan.optimizer {
        OptimizerKind::AdamW { eps } => Optimizer::AdamW(FusedAdamW::new(plan.weight_decay, eps)),
        OptimizerKind::Sgd { momentum } => Optimizer::Sgd(SgdMomentum::new(momentum, plan.weight_decay)),
    };
    let (mut sampler, noise, mut ledger, mut metrics, start, prior_seconds, mut examples_seen) = match resumed {
        None => (
            PoissonSampler::new(q, streams.sampling.clone()),
            GaussianNoise::new(streams.noise.clone()),
            Ledger::default(),
            Vec::with_capacity(steps as usize),
            0,
            0.0,
            0usize,
        ),
        Some(c) => {
            let bad = |message: String| CheckpointError::Corrupt { path: plan.output_dir.clone(), message };
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

    let bar = if opts.progress { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    bar.set_position(start);
    let mut stopped_early = None;
    // ε of the planned steps by the run's accountant, before any step: an accountant failure
    // (e.g. a σ too small for the PLD grid) stops the run here, not after training. Every step is
    // the same PoissonSampled(q, Gaussian(σ)), so ε grows with the step count: with a target, the
    // stop rule is the largest step count within it (the planned one when σ was calibrated).
    let eps_of = |k: u64| {
        crate::accounting::epsilon(plan.accountant, &crate::accounting::DpEvent::dp_sgd(q, sigma, k), plan.delta)
    };
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
    let limit = max_steps.unwrap_or(steps);
    if opts.resume.is_some() && start >= limit {
        eprintln!(
            "no steps left: the checkpoint is at step {start}, the last one {} (ε target {:?}); writing the outputs from it",
            if max_steps.is_some() { "within the privacy budget" } else { "planned" },
            target
        );
    }
    let seeded = streams.seeded;
    let save = |step: u64,
                opt: &Optimizer,
                sampler: &PoissonSampler,
                ledger: &Ledger,
                metrics: &[StepMetrics],
                examples_seen: usize,
                params: &candle_core::Tensor|
     -> Result<std::path::PathBuf, RunError> {
        let mut vectors = std::collections::HashMap::new();
        let optimizer = match opt {
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
        let mut c = Checkpoint {
            state: State {
                format: 1,
                engine: report::ENGINE.into(),
                step,
                planned_steps: steps,
                max_steps,
                noise_multiplier: sigma,
                sample_rate: q,
                target_epsilon: target,
                sampler: RngState::of(sampler.rng()),
                noise_key: *noise.key().bytes(),
                seeded,
                optimizer,
                ledger: ledger.clone(),
                metrics: metrics.to_vec(),
                examples_seen,
                train_seconds: prior_seconds + started.elapsed().as_secs_f64(),
                fingerprint: fingerprint.clone(),
                tensors_sha256: String::new(),
            },
            params: params.to_vec1::<f32>()?,
            optimizer_vectors: vectors,
        };
        Ok(c.write(&plan.output_dir, plan.keep_checkpoints)?)
    };
    for t in start..steps {
        if let (Some(limit), Some(target)) = (max_steps, target) {
            // Stop rule: never take the step that would exceed the target.
            if t >= limit {
                stopped_early = Some(format!("step {} would spend more than the target ε = {target}", t + 1));
                break;
            }
        }
        let indices = sampler.sample(n);
        let (grad, rep) = private_gradient(
            model.as_ref(),
            &train.examples,
            cache.as_ref(),
            &indices,
            plan.micro_batch_limits(),
            layout.len(),
            &mech,
            &noise,
            t,
        )?;
        let lr = learning_rate(plan.learning_rate, t, plan.warmup_steps, steps, plan.lr_schedule);
        opt.step(&params, &grad, lr)?;
        model.set_trainable(&layout.split(&params)?)?;
        if !opts.non_private {
            ledger.record_step(q, sigma);
        }
        examples_seen += rep.batch_size;
        let eps = if opts.non_private {
            f64::INFINITY
        } else {
            rdp_accountant.epsilon(&ledger.as_event(), plan.delta)?.epsilon
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
            "ε(rdp) {eps:.3}  loss {:.4}  {:.1} ex/s",
            m.mean_loss,
            examples_seen as f64 / started.elapsed().as_secs_f64()
        );
        if !opts.progress && opts.log_lines && ((t + 1) % (steps / 10).max(1) == 0 || t + 1 == steps) {
            eprintln!("step {}/{steps}  {msg}", t + 1);
        }
        bar.set_message(msg);
        bar.inc(1);
        metrics.push(m);
        let done = t + 1;
        let signalled = super::interrupt::requested();
        if (signalled || opts.stop_after == Some(done)) && done < limit {
            bar.abandon();
            let path = save(done, &opt, &sampler, &ledger, &metrics, examples_seen, &params)?;
            return Err(RunError::Interrupted {
                why: if signalled { "by a signal" } else { "as asked (--stop-after-step)" },
                step: done,
                planned: limit,
                checkpoint: path.display().to_string(),
                run_dir: plan.output_dir.display().to_string(),
            });
        }
        if plan.checkpoint_every > 0 && done.is_multiple_of(plan.checkpoint_every) && done < limit {
            save(done, &opt, &sampler, &ledger, &metrics, examples_seen, &params)?;
        }
    }
    bar.finish();
    // The final state (also what a crash while writing the outputs would resume from).
    save(metrics.len() as u64, &opt, &sampler, &ledger, &metrics, examples_seen, &params)?;
    if let Some(why) = &stopped_early {
        eprintln!("stopped before the privacy budget was exceeded: {why}");
    }
    let train_seconds = prior_seconds + started.elapsed().as_secs_f64();
    let eval_started = Instant::now();
    let scores = model.score_examples(&test.examples, eval_batch)?;
    let test_metric = crate::model::EvalResult::aggregate(scores.iter().copied());
    let test_groups = super::eval::per_group(&scores, &test.groups);
    if std::env::var_os("DPTRAIN_TIMING").is_some() {
        eprintln!("timing: train {train_seconds:.1}s, eval {:.1}s", eval_started.elapsed().as_secs_f64());
    }
    let rdp = if opts.non_private { None } else { Some(rdp_accountant.epsilon(&ledger.as_event(), plan.delta)?) };
    let pld =
        if opts.non_private { None } else { Some(PldAccountant::default().epsilon(&ledger.as_event(), plan.delta)?) };
    if let Some(r) = &rdp {
        if r.order_at_grid_edge {
            eprintln!(
                "warning: the RDP optimal order {} is at the edge of the order grid; ε may be loose",
                r.optimal_order
            );
        }
    }
    let epsilon_curve = if opts.non_private { Vec::new() } else { epsilon_curve(&ledger, plan.delta)? };
    let summary = RunSummary {
        non_private: opts.non_private,
        epsilon: match plan.accountant {
            AccountantKind::Pld => pld.as_ref().map(|p| p.epsilon),
            AccountantKind::Rdp => rdp.as_ref().map(|r| r.epsilon),
        },
        epsilon_pld: pld.as_ref().map(|p| p.epsilon),
        epsilon_rdp: rdp.as_ref().map(|r| r.epsilon),
        rdp_optimal_order: rdp.as_ref().map(|r| r.optimal_order),
        target_epsilon: target,
        delta: plan.delta,
        noise_multiplier: sigma,
        sample_rate: q,
        expected_batch_size: l,
        steps: metrics.len() as u64,
        planned_steps: steps,
        clip_norm: mech.clip,
        seeded,
        dataset_size: n,
        dataset_hash: train.content_hash.clone(),
        test_dataset_hash: test.content_hash.clone(),
        test_size: test.len(),
        labels: train.labels.clone(),
        task: model.task(),
        target_modules,
        test_metric,
        base_test_metric,
        test_groups,
        reference,
        model_hash,
        epsilon_curve,
        train_seconds,
        examples_per_second: examples_seen as f64 / train_seconds,
        stopped_early,
        ledger,
    };
    report::write_outputs(plan, model.as_ref(), &summary, &metrics)?;
    Ok(RunOutcome { summary })
}

/// ε after each of up to `EPSILON_CURVE_POINTS` evenly spaced steps (always including the last),
/// by both accountants, from the ledger's prefixes.
fn epsilon_curve(ledger: &Ledger, delta: f64) -> Result<Vec<report::EpsilonPoint>, RunError> {
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
            Ok(report::EpsilonPoint {
                step: k,
                pld: pld.epsilon(&event, delta)?.epsilon,
                rdp: rdp.epsilon(&event, delta)?.epsilon,
            })
        })
        .collect()
}

/// The held-out metrics of a non-private run in `dir`, refused unless it is non-private and used
/// the same base model, training data and held-out data.
fn read_reference(
    dir: &std::path::Path,
    model_hash: &str,
    train: &Dataset,
    test: &Dataset,
) -> Result<report::Reference, RunError> {
    let path = dir.join("privacy_report.json");
    let bad = |why: String| RunError::Plan(format!("--reference {}: {why}", dir.display()));
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let r: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("{} is not JSON: {e}", path.display())))?;
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
    same("training data", &r["dataset"]["sha256"], &train.content_hash)?;
    same("held-out data", &r["test_dataset"]["sha256"], &test.content_hash)?;
    let test_metric = serde_json::from_value(r["metrics"]["test"].clone())
        .map_err(|e| bad(format!("no held-out metric in {}: {e}", path.display())))?;
    let test_groups = serde_json::from_value(r["metrics"]["test_groups"].clone())
        .map_err(|e| bad(format!("bad per-group metrics in {}: {e}", path.display())))?;
    Ok(report::Reference { dir: dir.display().to_string(), test_metric, test_groups })
}

/// Training and held-out data in the format of the model's task.
pub fn load_data(plan: &Plan, arch: Architecture) -> Result<(Dataset, Dataset), RunError> {
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
