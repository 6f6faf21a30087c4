//! `dptrain tune`: private hyper-parameter selection whose cost is in the certificate (Papernot &
//! Steinke, "Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022).
//!
//! One trial is the mechanism Q: draw a candidate uniformly from the search space (independently
//! of the data), train it with DP-SGD at that candidate's σ, count its correct predictions on the
//! private validation file and add N(0, s²) to the count (sensitivity 1). At every Rényi order Q
//! is at most as private as its least private candidate (`DpEvent::Mixture`). The search runs Q
//! K times, K drawn from a truncated negative binomial distribution independently of the data, and
//! releases only the trial with the highest noisy score: its adapter, its settings and its noisy
//! score. Theorem 2 bounds the whole search (`DpEvent::RepeatAndSelect`), and every candidate's σ
//! is calibrated so that this bound meets the target ε. K, the other trials and their scores stay
//! in the private part: the bound covers the winner's output only, not K.

use crate::accounting::event::Ledger;
use crate::accounting::selection::TruncatedNegativeBinomial;
use crate::accounting::{self, AccountantKind, AccountingError, DpEvent, RdpAccountant};
use crate::config::{hex_sha256, NoiseSpec, Plan, TuneSpec};
use crate::privacy::CommitmentKey;
use crate::privacy::StreamsKey;
use crate::report::rundir::{self, RunDir};
use crate::report::{self, ReportError};
use crate::train::checkpoint;
use crate::train::eval::{eval_command, EvalOptions};
use crate::train::run::{load_data, RunError};
use crate::train::{run, RunOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The settings a trial may change; every other setting is the config's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub learning_rate: f64,
    pub clip_norm: f64,
    /// `None`: the config's `training.steps`.
    pub epochs: Option<f64>,
    pub expected_batch_size: usize,
    pub linear_probe_epochs: f64,
    pub linear_probe_learning_rate: f64,
}

impl Candidate {
    /// `plan` with this candidate's settings.
    pub fn apply(&self, plan: &mut Plan) {
        plan.learning_rate = self.learning_rate;
        plan.clip_norm = self.clip_norm;
        if let Some(e) = self.epochs {
            plan.epochs = Some(e);
            plan.steps = None;
        }
        plan.expected_batch_size = self.expected_batch_size;
        plan.linear_probe_epochs = self.linear_probe_epochs;
        plan.linear_probe_learning_rate = self.linear_probe_learning_rate;
    }
}

/// Every combination of the listed values (a setting not listed keeps the config's value), each
/// once, in a fixed order.
pub fn candidates(plan: &Plan, spec: &TuneSpec) -> Vec<Candidate> {
    fn or<T: Clone>(listed: &[T], default: T) -> Vec<T> {
        if listed.is_empty() {
            vec![default]
        } else {
            listed.to_vec()
        }
    }
    let epochs: Vec<Option<f64>> =
        if spec.epochs.is_empty() { vec![plan.epochs] } else { spec.epochs.iter().map(|&e| Some(e)).collect() };
    let mut out: Vec<Candidate> = Vec::new();
    for &learning_rate in &or(&spec.learning_rate, plan.learning_rate) {
        for &clip_norm in &or(&spec.clip_norm, plan.clip_norm) {
            for &epochs in &epochs {
                for &expected_batch_size in &or(&spec.expected_batch_size, plan.expected_batch_size) {
                    for &linear_probe_epochs in &or(&spec.linear_probe_epochs, plan.linear_probe_epochs) {
                        for &linear_probe_learning_rate in
                            &or(&spec.linear_probe_learning_rate, plan.linear_probe_learning_rate)
                        {
                            let c = Candidate {
                                learning_rate,
                                clip_norm,
                                epochs,
                                expected_batch_size,
                                linear_probe_epochs,
                                linear_probe_learning_rate,
                            };
                            if !out.contains(&c) {
                                out.push(c);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// One trial's mechanism for a candidate: its DP-SGD steps, then the Gaussian mechanism on its
/// count of correct validation predictions (sensitivity 1, noise std `score_noise`).
pub fn trial_event(q: f64, sigma: f64, steps: u64, score_noise: f64) -> DpEvent {
    DpEvent::Composed { events: vec![DpEvent::dp_sgd(q, sigma, steps), DpEvent::Gaussian { sigma: score_noise }] }
}

/// The whole search: K ~ D(η, mean) trials of a candidate drawn at random, the best released.
pub fn search_event(trials: &[DpEvent], mean: f64, shape: f64) -> DpEvent {
    let mut distinct: Vec<DpEvent> = Vec::new();
    for t in trials {
        if !distinct.contains(t) {
            distinct.push(t.clone());
        }
    }
    DpEvent::RepeatAndSelect { event: Box::new(DpEvent::Mixture { events: distinct }), mean, shape }
}

/// The calibrated search.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// σ of each run of `calibrate_search`'s `runs`, in order.
    pub sigmas: Vec<f64>,
    /// The ε (RDP, at δ) each candidate's own DP-SGD steps would have alone.
    pub per_trial_epsilon: f64,
    /// ε of the whole search (RDP, at δ): ≤ the target.
    pub epsilon: f64,
    pub event: DpEvent,
}

/// σ for each candidate's (q, steps) such that the whole search spends at most `target`: every
/// candidate's DP-SGD steps are calibrated to the same RDP ε t at δ, and t is the largest (to
/// relative 1e-4) for which the search's bound, over the largest of the candidates' RDP curves,
/// stays within the target.
pub fn calibrate_search(
    target: f64,
    delta: f64,
    runs: &[(f64, u64)],
    score_noise: f64,
    mean: f64,
    shape: f64,
) -> Result<Calibration, AccountingError> {
    if runs.is_empty() {
        return Err(AccountingError::InvalidParameter("a search over no candidates".into()));
    }
    let rdp = RdpAccountant::default();
    let at = |t: f64| -> Result<Calibration, AccountingError> {
        let sigmas: Vec<f64> = runs
            .iter()
            .map(|&(q, k)| accounting::calibrate(AccountantKind::Rdp, t, delta, q, k, 1e-6).map(|(s, _)| s))
            .collect::<Result<_, _>>()?;
        let trials: Vec<DpEvent> =
            runs.iter().zip(&sigmas).map(|(&(q, k), &s)| trial_event(q, s, k, score_noise)).collect();
        let event = search_event(&trials, mean, shape);
        let epsilon = rdp.epsilon(&event, delta)?.epsilon;
        Ok(Calibration { sigmas, per_trial_epsilon: t, epsilon, event })
    };
    let too_costly = |spent: String| {
        AccountingError::InvalidParameter(format!(
            "the search alone (noise on the validation scores, tune.score-noise = {score_noise}, and the selection among a mean of {mean} trials) spends {spent} > target {target} even with almost no training: raise score-noise or lower mean-trials"
        ))
    };
    // A per-trial ε small enough that the search fits (halving from target/8; below 1/64 of the
    // target the training would be all noise, so the search is refused).
    let mut lo = target / 8.0;
    let mut best = loop {
        match at(lo) {
            Ok(c) if c.epsilon <= target => break c,
            Ok(c) if lo > target / 64.0 => {
                let _ = c;
                lo /= 2.0;
            }
            Ok(c) => return Err(too_costly(format!("ε = {}", c.epsilon))),
            Err(AccountingError::Unreachable { .. }) => return Err(too_costly("more".into())),
            Err(e) => return Err(e),
        }
    };
    let mut hi = target;
    let top = at(hi)?;
    if top.epsilon <= target {
        return Ok(top);
    }
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        let c = at(mid)?;
        if c.epsilon <= target {
            lo = mid;
            best = c;
        } else {
            hi = mid;
        }
    }
    Ok(best)
}

/// A standard normal draw (Box–Muller on two 53-bit uniforms, the first in (0, 1]).
fn standard_normal(rng: &mut impl RngCore) -> f64 {
    let scale = 1.0 / (1u64 << 53) as f64;
    let u1 = ((rng.next_u64() >> 11) + 1) as f64 * scale;
    let u2 = (rng.next_u64() >> 11) as f64 * scale;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// What `dptrain tune` is given besides the config.
#[derive(Debug, Clone, Default)]
pub struct TuneOptions {
    /// Write here instead of the config's output.dir.
    pub out: Option<PathBuf>,
    /// Replace an earlier search's outputs in the folder.
    pub overwrite: bool,
    /// Print the calibrated search (candidates, σ of each, ε) and stop before any trial.
    pub dry_run: bool,
    /// Continue the interrupted search in the output folder (its private search state).
    pub resume: bool,
    /// Stop as if interrupted once this many trials have finished (how tests and users can try
    /// out `resume`); with `stop_after_step`, inside the next trial after that step instead.
    pub stop_after_trials: Option<u64>,
    pub stop_after_step: Option<u64>,
}

/// The private record of a search in progress (`private/search-state.json`): what a resumed
/// search needs to continue the same search, never a new one. The number of trials K and the key
/// of every random draw are fixed when the search starts, so resuming cannot draw K, a candidate,
/// a trial's sampling and noise, or a score's noise again; finished trials are kept as scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SearchState {
    warning: String,
    /// Hex of the 32-byte key of the search's draws (unseeded searches; a seeded search's draws
    /// come from its config's seed).
    key: Option<String>,
    config_sha256: String,
    model_sha256: String,
    train_sha256: String,
    validation_sha256: String,
    number_of_trials: u64,
    finished: Vec<Trial>,
}

/// The file of the search state in the private part.
pub const SEARCH_STATE: &str = "search-state.json";

fn write_state(path: &Path, state: &SearchState) -> Result<(), RunError> {
    Ok(report::write_private(path, serde_json::to_string_pretty(state).expect("json").as_bytes())?)
}

/// The search's own draws (K, each trial's candidate, each score's noise): from the config's seed
/// when seeded, else from the search key's stream 0 (each trial's streams are the key's stream t).
fn search_rng(seed: Option<u64>, key: Option<&StreamsKey>) -> ChaCha20Rng {
    match (seed, key) {
        (Some(s), _) => ChaCha20Rng::seed_from_u64(s ^ 0x7475_6e65),
        (None, Some(k)) => ChaCha20Rng::from_seed(k.0),
        (None, None) => unreachable!("an unseeded search has a key"),
    }
}

/// One trial, as the private record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub trial: u64,
    pub candidate: usize,
    pub noise_multiplier: f64,
    pub dir: String,
    pub validation_correct: u64,
    pub noisy_score: f64,
}

/// What the search did.
#[derive(Debug, Clone)]
pub struct TuneOutcome {
    pub epsilon: f64,
    pub trials: Vec<Trial>,
    pub best: usize,
    pub candidates: Vec<Candidate>,
    pub release: PathBuf,
}

fn plan_err(e: impl std::fmt::Display) -> RunError {
    RunError::Plan(e.to_string())
}

/// Runs the search of `plan`'s `[tune]` table and writes its outputs.
pub fn tune(plan: &Plan, opts: &TuneOptions) -> Result<TuneOutcome, RunError> {
    let Some(spec) = &plan.tune else {
        return Err(RunError::Plan(format!(
            "{} has no [tune] table: list the settings to search there (README \"Private hyper-parameter search\")",
            plan.config_path.display()
        )));
    };
    let NoiseSpec::TargetEpsilon(target) = plan.noise else {
        return Err(RunError::Plan(
            "dptrain tune calibrates every trial's σ so that the whole search meets privacy.target-epsilon: give target-epsilon, not noise-multiplier".into(),
        ));
    };
    let root = opts.out.clone().unwrap_or_else(|| plan.output_dir.clone());
    if opts.resume && rundir::holds_outputs(&root) {
        return Err(plan_err(format!("the search in {} has finished: there is nothing to resume", root.display())));
    }
    if rundir::holds_outputs(&root) && !opts.overwrite && !opts.dry_run {
        return Err(ReportError::OutputExists(root.clone()).into());
    }
    let arch = crate::model::Architecture::detect(&plan.model_dir)?;
    if arch != crate::model::Architecture::Bert {
        return Err(RunError::Plan(
            "dptrain tune scores trials by validation accuracy and supports classification (BERT-family) configs only; for a language model, choose settings with `dptrain init` or state privacy.hyperparameters-tuned-on-private-data".into(),
        ));
    }
    // N (public, as in every run), the label set, and the validation file's size (public too).
    let (train, test) = load_data(plan, arch)?;
    let n = train.len();
    let tokenizer = crate::model::load_tokenizer(&plan.model_dir, Some(plan.max_seq_len))?;
    let validation = crate::data::load_classification(&spec.validation, &tokenizer, Some(&train.labels))?;
    if validation.content_hash == train.content_hash {
        return Err(RunError::Plan(format!(
            "tune.validation {} is the training file: score the trials on held-out records",
            spec.validation.display()
        )));
    }
    if validation.is_empty() {
        return Err(RunError::Plan(format!("tune.validation {} has no records", spec.validation.display())));
    }
    let cands = candidates(plan, spec);
    let mut runs = Vec::with_capacity(cands.len());
    for c in &cands {
        let mut p = plan.clone();
        c.apply(&mut p);
        if c.expected_batch_size > n {
            return Err(RunError::Plan(format!(
                "tune.expected-batch-size {} exceeds the {n} training records",
                c.expected_batch_size
            )));
        }
        runs.push((c.expected_batch_size as f64 / n as f64, p.planned_steps(n)));
    }
    let cal = calibrate_search(target, plan.delta, &runs, spec.score_noise, spec.mean_trials, spec.trials_shape)?;
    let dist = TruncatedNegativeBinomial::with_mean(spec.trials_shape, spec.mean_trials)?;
    eprintln!(
        "search: {} candidates, trials ~ truncated negative binomial (η = {}, mean {}); each candidate's σ calibrated to ε = {:.4} alone (RDP), the whole search ε = {:.4} ≤ {target} (δ = {})",
        cands.len(),
        spec.trials_shape,
        spec.mean_trials,
        cal.per_trial_epsilon,
        cal.epsilon,
        plan.delta
    );
    for (i, (c, (&(q, steps), s))) in cands.iter().zip(runs.iter().zip(&cal.sigmas)).enumerate() {
        eprintln!("candidate {i}: {c:?}: q = {q:.5}, {steps} steps, σ = {s:.4}");
    }
    if opts.dry_run {
        return Ok(TuneOutcome { epsilon: cal.epsilon, trials: Vec::new(), best: 0, candidates: cands, release: root });
    }
    let dir = RunDir::open(&root)?;
    if dir.holds_outputs() && !opts.overwrite {
        return Err(ReportError::OutputExists(dir.root.clone()).into());
    }
    let seeded = plan.seed.is_some();
    let state_path = dir.private.join(SEARCH_STATE);
    let model_sha256 = checkpoint::model_hash(&plan.model_dir)?;
    let (key, k, finished, mut rng) = if opts.resume {
        let text = std::fs::read_to_string(&state_path).map_err(|_| {
            plan_err(format!(
                "{} holds no interrupted search to resume (no {}): start one without --resume",
                dir.root.display(),
                state_path.display()
            ))
        })?;
        let corrupt = |m: &str| plan_err(format!("{}: {m}; the search cannot be resumed", state_path.display()));
        let st: SearchState = serde_json::from_str(&text).map_err(|e| corrupt(&e.to_string()))?;
        for (what, was, now) in [
            ("the config", &st.config_sha256, &plan.config_hash),
            ("the base model", &st.model_sha256, &model_sha256),
            ("the training file", &st.train_sha256, &train.content_hash),
            ("the validation file", &st.validation_sha256, &validation.content_hash),
        ] {
            if was != now {
                return Err(plan_err(format!(
                    "{what} differs from the one the interrupted search in {} started with: resume it with the same config, model and data, or pass --overwrite to start a new search",
                    dir.root.display()
                )));
            }
        }
        let key = match (&st.key, seeded) {
            (Some(h), false) => {
                Some(StreamsKey::from_hex(h).ok_or_else(|| corrupt("its key is not 64 hexadecimal digits"))?)
            }
            (None, true) => None,
            _ => return Err(corrupt("its key does not match the config's seed setting")),
        };
        let mut rng = search_rng(plan.seed, key.as_ref());
        let k = dist.sample(rng.random::<f64>());
        if k != st.number_of_trials || st.finished.len() as u64 > k {
            return Err(corrupt("its number of trials does not follow from its key"));
        }
        eprintln!("resuming the search in {}: {} of its {k} trials finished", dir.root.display(), st.finished.len());
        (key, k, st.finished, rng)
    } else {
        if !opts.overwrite && !state_path.exists() && dir.private.join("trials").exists() {
            return Err(plan_err(format!(
                "output folder {} holds trials of an earlier search without its state (it cannot be resumed): pass --overwrite to discard them",
                dir.root.display()
            )));
        }
        if state_path.exists() && !opts.overwrite {
            return Err(plan_err(format!(
                "output folder {0} holds an interrupted search: continue it with dptrain tune --config {1} --resume{2}, or pass --overwrite to discard it",
                dir.root.display(),
                plan.config_path.display(),
                opts.out.as_ref().map(|o| format!(" --out {}", o.display())).unwrap_or_default()
            )));
        }
        if opts.overwrite {
            dir.clear_previous(false)?;
        }
        let key = (!seeded).then(StreamsKey::fresh);
        let mut rng = search_rng(plan.seed, key.as_ref());
        let k = dist.sample(rng.random::<f64>());
        eprintln!("{k} trials (drawn independently of the data; kept in the private part, never released)");
        (key, k, Vec::new(), rng)
    };
    let mut state = SearchState {
        warning: "PRIVATE: never publish (the number of trials, the key of the search's noise, every finished trial)"
            .into(),
        key: key.as_ref().map(StreamsKey::to_hex),
        config_sha256: plan.config_hash.clone(),
        model_sha256,
        train_sha256: train.content_hash.clone(),
        validation_sha256: validation.content_hash.clone(),
        number_of_trials: k,
        finished: finished.clone(),
    };
    write_state(&state_path, &state)?;
    let device = plan.device.open()?;
    let trials_dir = dir.private.join("trials");
    let mut trials = Vec::new();
    let resume_hint = || {
        format!(
            "resume the search with: dptrain tune --config {} --resume{}",
            plan.config_path.display(),
            opts.out.as_ref().map(|o| format!(" --out {}", o.display())).unwrap_or_default()
        )
    };
    for t in 1..=k {
        let ci = rng.random_range(0..cands.len());
        if let Some(done) = finished.get(t as usize - 1) {
            // A finished trial: its draws are replayed (to reach the next trial's), not redone.
            let adapter = Path::new(&done.dir).join(rundir::RELEASE).join("adapter_model.safetensors");
            if done.trial != t || done.candidate != ci || !adapter.is_file() {
                return Err(plan_err(format!(
                    "{}: finished trial {t} does not match the search's draws or its adapter {} is missing; the search cannot be resumed",
                    state_path.display(),
                    adapter.display()
                )));
            }
            standard_normal(&mut rng);
            trials.push(done.clone());
            continue;
        }
        let stop_here = opts.stop_after_trials == Some(t - 1);
        if stop_here && opts.stop_after_step.is_none() {
            return Err(plan_err(format!(
                "stopped as asked (--stop-after-trial) after {} finished trials; {}",
                t - 1,
                resume_hint()
            )));
        }
        let mut p = plan.clone();
        p.tune = None;
        cands[ci].apply(&mut p);
        p.noise = NoiseSpec::NoiseMultiplier(cal.sigmas[ci]);
        p.output_dir = trials_dir.join(format!("trial-{t:03}"));
        p.seed = plan.seed.map(|s| s.wrapping_add(t));
        // A trial interrupted after a checkpoint continues from it; one interrupted before any
        // checkpoint starts again with the same key, so it repeats the same sampling and noise.
        // Only within --resume: a fresh search's trial folders are new (checked above).
        let resume_trial =
            opts.resume && checkpoint::has_checkpoints(&p.output_dir.join(rundir::PRIVATE).join(rundir::CHECKPOINTS));
        eprintln!(
            "trial {t}/{k}: candidate {ci} {:?}, σ = {:.4}{}",
            cands[ci],
            cal.sigmas[ci],
            if resume_trial { " (resumed from its checkpoint)" } else { "" }
        );
        let ropts = RunOptions {
            log_lines: true,
            overwrite: true,
            resume: resume_trial.then(|| p.output_dir.clone()),
            stop_after: if stop_here { opts.stop_after_step } else { None },
            streams_key: key.map(|k| k.derive(t)),
            ..Default::default()
        };
        match run(&p, &ropts) {
            Err(RunError::Interrupted { why, step, planned, .. }) => {
                return Err(plan_err(format!(
                    "search interrupted {why} in trial {t} after step {step} of {planned} (checkpoint written); {}",
                    resume_hint()
                )))
            }
            r => r?,
        };
        let eval = eval_command(
            &EvalOptions {
                model_dir: plan.model_dir.clone(),
                adapter: Some(p.output_dir.clone()),
                data: spec.validation.clone(),
                max_seq_len: plan.max_seq_len,
                batch: plan.max_physical_batch.max(1),
                prompts: Vec::new(),
                samples: 0,
                max_new_tokens: 0,
                base: plan.base_format(),
            },
            &device,
        )?;
        let crate::model::EvalResult::Accuracy(acc) = eval.metric else {
            return Err(plan_err("validation scoring returned no accuracy"));
        };
        let correct = (acc * eval.records as f64).round() as u64;
        // The released value is rounded to 1/100 of a record (post-processing): its low-order
        // bits then carry nothing of the floating-point noise draw.
        let noisy = ((correct as f64 + spec.score_noise * standard_normal(&mut rng)) * 100.0).round() / 100.0;
        eprintln!("trial {t}/{k}: noisy validation score {noisy} of {} records", validation.len());
        trials.push(Trial {
            trial: t,
            candidate: ci,
            noise_multiplier: cal.sigmas[ci],
            dir: p.output_dir.display().to_string(),
            validation_correct: correct,
            noisy_score: noisy,
        });
        state.finished = trials.clone();
        write_state(&state_path, &state)?;
    }
    // The first trial with the highest noisy score.
    let best = (0..trials.len()).fold(0, |b, i| if trials[i].noisy_score > trials[b].noisy_score { i } else { b });
    let out =
        write_outputs(plan, spec, &dir, &cands, &runs, &cal, &trials, best, seeded, n, &train, &test, &validation)?;
    // Finished: the search's record (private/run.json) now holds what the state held.
    std::fs::remove_file(&state_path).map_err(|e| plan_err(format!("{}: {e}", state_path.display())))?;
    Ok(TuneOutcome { epsilon: cal.epsilon, trials, best, candidates: cands, release: out })
}

/// The search's statement of what it did, for the certificate (public: the space, the
/// distribution of the number of trials, the score, every candidate's privacy parameters, and
/// the winner; never K or the other trials).
fn selection_json(
    spec: &TuneSpec,
    dist: &TruncatedNegativeBinomial,
    cands: &[Candidate],
    runs: &[(f64, u64)],
    cal: &Calibration,
    best: &Trial,
    n_validation: usize,
) -> serde_json::Value {
    serde_json::json!({
        "method": "private selection with a random number of trials (Papernot & Steinke, ICLR 2022, Theorem 2): K trials, K drawn from a truncated negative binomial distribution independently of the data, each trial a candidate drawn uniformly from the search space and trained with DP-SGD, scored by its noisy count of correct validation predictions; only the best trial is released",
        "statement": "hyper-parameters selected privately, included in ε",
        "trials_distribution": { "kind": "truncated negative binomial", "shape": spec.trials_shape, "mean": spec.mean_trials, "gamma": dist.gamma },
        "number_of_trials": "kept private (releasing it is not covered by the bound)",
        "score": "count of correct predictions on the validation file plus N(0, s²) noise (sensitivity 1), rounded to 0.01",
        "score_noise": spec.score_noise,
        "validation_size": n_validation,
        "search_space": {
            "learning_rate": spec.learning_rate,
            "clip_norm": spec.clip_norm,
            "epochs": spec.epochs,
            "expected_batch_size": spec.expected_batch_size,
            "linear_probe_epochs": spec.linear_probe_epochs,
            "linear_probe_learning_rate": spec.linear_probe_learning_rate,
        },
        "candidates": cands.iter().zip(runs).zip(&cal.sigmas).map(|((c, &(q, steps)), &sigma)| serde_json::json!({
            "settings": c, "sample_rate": q, "steps": steps, "noise_multiplier": sigma,
        })).collect::<Vec<_>>(),
        "per_candidate_epsilon_rdp": cal.per_trial_epsilon,
        "selected": { "candidate": best.candidate, "settings": cands[best.candidate], "noisy_validation_score": best.noisy_score },
    })
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    plan: &Plan,
    spec: &TuneSpec,
    dir: &RunDir,
    cands: &[Candidate],
    runs: &[(f64, u64)],
    cal: &Calibration,
    trials: &[Trial],
    best: usize,
    seeded: bool,
    n: usize,
    train: &crate::data::Dataset,
    test: &crate::data::Dataset,
    validation: &crate::data::Dataset,
) -> Result<PathBuf, RunError> {
    let NoiseSpec::TargetEpsilon(target) = plan.noise else { unreachable!("checked by tune") };
    let win = &trials[best];
    let c = &cands[win.candidate];
    let (q, steps) = runs[win.candidate];
    let trial_release = Path::new(&win.dir).join(rundir::RELEASE);
    let read = |name: &str| -> Result<Vec<u8>, RunError> {
        let p = trial_release.join(name);
        std::fs::read(&p).map_err(|e| plan_err(format!("{}: {e}", p.display())))
    };
    let trial_report: serde_json::Value =
        serde_json::from_slice(&read("privacy_report.json")?).map_err(|e| plan_err(format!("trial report: {e}")))?;
    let dist = TruncatedNegativeBinomial::with_mean(spec.trials_shape, spec.mean_trials)?;
    let key = match plan.seed {
        Some(s) => CommitmentKey::from_rng(&mut ChaCha20Rng::seed_from_u64(s ^ 0x636f_6d6d)),
        None => CommitmentKey::fresh(),
    };
    let commit = |path: &Path, sha256: &str| -> Result<report::InputFile, RunError> {
        Ok(report::InputFile {
            path: path.display().to_string(),
            sha256: sha256.to_string(),
            commitment: key.commit_file(path).map_err(|e| plan_err(format!("{}: {e}", path.display())))?,
        })
    };
    let inputs = serde_json::json!({
        "train": commit(&plan.train_path, &train.content_hash)?,
        "test": commit(&plan.test_path, &test.content_hash)?,
        "validation": commit(&spec.validation, &validation.content_hash)?,
        "config": commit(&plan.config_path, &plan.config_hash)?,
    });
    let ledger = Ledger { entries: vec![cal.event.clone()] };
    let epsilon = RdpAccountant::default().epsilon(&cal.event, plan.delta)?.epsilon;
    let pld_unavailable = accounting::PldAccountant::default()
        .epsilon(&cal.event, plan.delta)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| "not used for a search".into());
    let certified = !seeded;
    let guarantee = report::guarantee_sentence(true, seeded, Some(epsilon), plan.delta);
    let selection = selection_json(spec, &dist, cands, runs, cal, win, validation.len());
    let mut trial_plan = plan.clone();
    c.apply(&mut trial_plan);
    let cert = serde_json::json!({
        "engine": report::ENGINE,
        "private": true,
        "seeded": seeded,
        "certified": certified,
        "guarantee": guarantee,
        "epsilon": epsilon,
        "epsilon_kind": "upper bound",
        "delta": plan.delta,
        "target_epsilon": target,
        "accountant": "rdp",
        "accountant_detail": "Rényi DP, orders 1.1-10.9 and 12-63; private selection by Papernot & Steinke's Theorem 2 over the largest of the candidates' RDP curves, conversion of Balle et al. 2020",
        "epsilon_cross_check": { "pld": { "unavailable": pld_unavailable }, "rdp": epsilon },
        "selection": selection,
        "noise_multiplier": win.noise_multiplier,
        "sample_rate": q,
        "expected_batch_size": c.expected_batch_size,
        "steps": steps,
        "clip_norm": c.clip_norm,
        "clipping": report::clipping_statement(plan.clip_kind),
        "gradient_dtype": report::gradient_dtype_statement(plan.base_dtype()),
        "neighbouring_relation": report::NEIGHBOURING,
        "sampler": report::SAMPLER,
        "noise_generator": report::NOISE_GENERATOR,
        "dataset_size": n,
        "commitments": {
            "scheme": report::COMMITMENT,
            "train": inputs["train"]["commitment"],
            "test": inputs["test"]["commitment"],
            "validation": inputs["validation"]["commitment"],
            "config": inputs["config"]["commitment"],
        },
        "ledger": ledger,
    });
    // The winner's tensors with the search's certificate in place of its own trial's.
    let adapter_path = dir.release.join("adapter_model.safetensors");
    let bytes = with_certificate(&read("adapter_model.safetensors")?, &cert.to_string())
        .map_err(|message| ReportError::Format { path: adapter_path.clone(), message })?;
    let adapter_hash = hex_sha256(&bytes);
    let mut not_protected = vec![
        "held-out metrics are computed on the test file without noise: the test records are not protected".to_string(),
        "the search space, the distribution of the number of trials and the score noise are stated in the config (public); the selected settings and the winner's noisy validation score are part of the released output, covered by ε".to_string(),
        "the dataset size N and the validation file's size are treated as public (as N is in every run)".to_string(),
    ];
    not_protected.push(format!(
        "settings outside the search space are the config's: it states privacy.hyperparameters-tuned-on-private-data = {} for them",
        plan.tuned_on_private_data
    ));
    not_protected.push(if seeded {
        "the config text is kept in the private part (it holds the seed)".to_string()
    } else {
        "the config (hyper-parameters, search space and file paths) is published as given in this report".to_string()
    });
    not_protected.push("not released, kept in the private part (never publish it): the number of trials actually run, every trial's run folder (adapters, reports, per-step metrics) and score, the commitment key and the plain hashes of the inputs".to_string());
    not_protected.push("side channels of running the job: whoever observes it (in particular the total running time, which grows with the number of trials) learns things ε does not cover".to_string());
    let release_files =
        ["adapter_model.safetensors", "adapter_config.json", "privacy_report.json", "privacy_report.md"];
    let release_report = serde_json::json!({
        "kind": "private hyper-parameter search",
        "epsilon": cert["epsilon"],
        "delta": plan.delta,
        "noise_multiplier": cert["noise_multiplier"],
        "sample_rate": q,
        "steps": steps,
        "clip_norm": c.clip_norm,
        "accountant": "rdp",
        "seeded": seeded,
        "private": true,
        "certified": certified,
        "target_epsilon": cert["target_epsilon"],
        "expected_batch_size": c.expected_batch_size,
        "guarantee": guarantee,
        "epsilon_by_accountant": cert["epsilon_cross_check"],
        "hyperparameters": "selected privately, included in ε",
        "selection": cert["selection"],
        "neighbouring_relation": report::NEIGHBOURING,
        "clipping": cert["clipping"],
        "base_model": trial_report["base_model"],
        "task": trial_report["task"],
        "target_modules": trial_report["target_modules"],
        "adapted_modules": trial_report["adapted_modules"],
        "dataset": { "size": n, "commitment": inputs["train"]["commitment"], "labels": train.labels },
        "test_dataset": { "size": test.len(), "commitment": inputs["test"]["commitment"] },
        "validation_dataset": { "size": validation.len(), "commitment": inputs["validation"]["commitment"] },
        "not_protected": not_protected,
        "release_files": release_files.iter().map(|f| serde_json::json!({
            "file": f, "covered_by_epsilon": !f.starts_with("privacy_report"),
        })).collect::<Vec<_>>(),
        "metrics": { "test": trial_report["metrics"]["test"], "test_accuracy": trial_report["metrics"]["test_accuracy"] },
        "adapter_sha256": adapter_hash,
        "certificate": cert,
        "ledger": cert["ledger"],
        "config": if seeded { serde_json::Value::Null } else { serde_json::Value::String(plan.config_text.clone()) },
    });
    let record = serde_json::json!({
        "engine": report::ENGINE,
        "warning": "PRIVATE: never publish this folder (the number of trials, every trial, the seed, the commitment key, plain hashes of the data)",
        "seed": plan.seed,
        "seeded": seeded,
        "commitment_key": key.to_hex(),
        "inputs": inputs,
        "config_text": plan.config_text,
        "number_of_trials": trials.len(),
        "trials": trials,
        "selected_trial": win.trial,
        "adapter_sha256": adapter_hash,
    });
    report::write_private(
        &dir.private.join(rundir::RUN_RECORD),
        serde_json::to_string_pretty(&record).expect("json").as_bytes(),
    )?;
    report::write_atomic(&adapter_path, &bytes)?;
    report::write_atomic(&dir.release.join("adapter_config.json"), &read("adapter_config.json")?)?;
    report::write_atomic(
        &dir.release.join("privacy_report.md"),
        report::markdown::render_search(&release_report).as_bytes(),
    )?;
    report::write_atomic(
        &dir.release.join("privacy_report.json"),
        serde_json::to_string_pretty(&release_report).expect("json").as_bytes(),
    )?;
    Ok(dir.release.clone())
}

/// `bytes` (a safetensors file) with its `dptrain_certificate` metadata replaced, canonical.
pub fn with_certificate(bytes: &[u8], certificate: &str) -> Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(bytes.get(..8).ok_or("no header")?.try_into().map_err(|_| "no header")?) as usize;
    let header = bytes.get(8..8 + n).ok_or("truncated header")?;
    let mut v: serde_json::Value = serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    v["__metadata__"]["dptrain_certificate"] = serde_json::Value::String(certificate.to_string());
    let h = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    report::canonical_safetensors(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calibrated_search_meets_the_target_tightly_over_the_largest_candidate_curve() {
        let delta = 1e-6;
        for (runs, mean, shape, target) in [
            (vec![(0.04, 200u64)], 3.0, 0.0, 3.0),
            (vec![(0.04, 200), (0.08, 100), (0.02, 400)], 4.0, 1.0, 3.0),
            (vec![(0.01, 1000), (0.05, 60)], 2.0, 0.5, 8.0),
        ] {
            let cal = calibrate_search(target, delta, &runs, 10.0, mean, shape).unwrap();
            assert!(cal.epsilon <= target, "{runs:?}: {} > {target}", cal.epsilon);
            assert!(cal.epsilon >= 0.995 * target, "{runs:?}: {} is loose against {target}", cal.epsilon);
            // The event is what the certificate will hold: recomputing gives the same ε, and
            // every candidate's own steps alone spend the common per-trial ε.
            let again = RdpAccountant::default().epsilon(&cal.event, delta).unwrap().epsilon;
            assert_eq!(again.to_bits(), cal.epsilon.to_bits());
            for (&(q, k), &s) in runs.iter().zip(&cal.sigmas) {
                let alone = RdpAccountant::default().epsilon(&DpEvent::dp_sgd(q, s, k), delta).unwrap().epsilon;
                assert!(alone <= cal.per_trial_epsilon && alone > 0.999 * cal.per_trial_epsilon, "{alone}");
            }
            // The search costs more than one trial of any candidate.
            assert!(cal.per_trial_epsilon < target);
        }
        // A score noise that alone exceeds the budget is refused by name.
        let e = calibrate_search(0.5, delta, &[(0.04, 200)], 0.5, 4.0, 1.0).unwrap_err().to_string();
        assert!(e.contains("score-noise"), "{e}");
    }

    #[test]
    fn the_search_event_is_the_selection_of_the_distinct_trial_mechanisms() {
        let a = trial_event(0.04, 1.0, 100, 10.0);
        let b = trial_event(0.08, 1.5, 50, 10.0);
        let e = search_event(&[a.clone(), b.clone(), a.clone()], 3.0, 1.0);
        assert_eq!(
            e,
            DpEvent::RepeatAndSelect {
                event: Box::new(DpEvent::Mixture { events: vec![a, b] }),
                mean: 3.0,
                shape: 1.0
            }
        );
    }

    #[test]
    fn a_standard_normal_draw_has_mean_zero_and_variance_one() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 1/√n ≈ 0.0022 for the mean, √(2/n) ≈ 0.0032 for the variance.
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.015, "mean {mean}, variance {var}");
        let within_one = xs.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!((within_one - 0.6827).abs() < 0.005, "{within_one}");
    }
}
