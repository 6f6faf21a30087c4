//! The run loop: plan → data → model → steps (each recorded in the ledger, the step that would
//! exceed the target ε never taken) → evaluation → outputs.

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
    #[error("{0}")]
    Plan(String),
}

pub fn run(plan: &Plan, opts: &RunOptions) -> Result<RunOutcome, RunError> {
    report::check_output_dir(&plan.output_dir, opts.overwrite)?;
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
    let layout = FlatParams::from_named(&model.trainable())?;
    let params = layout.to_tensor(model.device())?;
    // Frozen lower layers: computed once per record (a function of that record alone).
    let cache = feature_cache(model.as_ref(), &train.examples, plan.max_physical_batch)?;
    let mut opt = match plan.optimizer {
        OptimizerKind::AdamW { eps } => Optimizer::AdamW(FusedAdamW::new(plan.weight_decay, eps)),
        OptimizerKind::Sgd { momentum } => Optimizer::Sgd(SgdMomentum::new(momentum, plan.weight_decay)),
    };
    let mut sampler = PoissonSampler::new(q, streams.sampling.clone());
    let noise = GaussianNoise::new(streams.noise.clone());
    let mut ledger = Ledger::default();
    let mut metrics: Vec<StepMetrics> = Vec::with_capacity(steps as usize);

    let bar = if opts.progress { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut examples_seen = 0usize;
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
    for t in 0..steps {
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
            plan.max_physical_batch,
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
    }
    bar.finish();
    if let Some(why) = &stopped_early {
        eprintln!("stopped before the privacy budget was exceeded: {why}");
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let eval_started = Instant::now();
    let test_metric = model.evaluate(&test.examples, eval_batch)?;
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
        seeded: streams.seeded,
        dataset_size: n,
        dataset_hash: train.content_hash.clone(),
        test_dataset_hash: test.content_hash.clone(),
        test_size: test.len(),
        labels: train.labels.clone(),
        task: model.task(),
        target_modules,
        test_metric,
        base_test_metric,
        train_seconds,
        examples_per_second: examples_seen as f64 / train_seconds,
        stopped_early,
        ledger,
    };
    report::write_outputs(plan, model.as_ref(), &summary, &metrics)?;
    Ok(RunOutcome { summary })
}

/// Training and held-out data in the format of the model's task.
pub(crate) fn load_data(plan: &Plan, arch: Architecture) -> Result<(Dataset, Dataset), RunError> {
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
