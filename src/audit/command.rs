//! `dptrain audit`: the one-run lower bound on a config's mechanism (`mechanism`) or on its own
//! training, with gradient canaries in its steps (`white-box`) or canary records in its data
//! (`black-box`), written beside the certified ε.

use super::{best_bound, default_grid, mechanism_of, CanarySpec};
use crate::config::Plan;
use crate::data::{make_micro_batches, Batch, Example};
use crate::model::{Architecture, DpModel};
use crate::train::{run, RunError, RunOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The config's DP-SGD mechanism alone (no model): sampler, clipping, noise, accounting.
    Mechanism,
    /// The config's training, with gradient canaries in every step's sample.
    WhiteBox,
    /// The config's training, with canary records in its training data.
    BlackBox,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "mechanism" => Ok(Mode::Mechanism),
            "white-box" => Ok(Mode::WhiteBox),
            "black-box" => Ok(Mode::BlackBox),
            other => Err(format!("--mode {other}: expected white-box, black-box or mechanism")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Mechanism => "mechanism",
            Mode::WhiteBox => "white-box",
            Mode::BlackBox => "black-box",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub mode: Mode,
    pub canaries: usize,
    /// Audit the same config trained without clipping or noise.
    pub non_private: bool,
    pub confidence: f64,
    /// Where audit_report.json / .md (and, for the training modes, the audited run and the
    /// canaries) go; without it the audited run is trained in a temporary folder and removed.
    pub out: Option<PathBuf>,
    pub overwrite: bool,
    /// Print a status line every 10% of the audited run's steps.
    pub log_lines: bool,
}

pub struct AuditOutcome {
    pub json: serde_json::Value,
    pub text: String,
    pub markdown: String,
}

/// A white-box canary's gradient norm, in units of C: clipped to C by an honest step, so that a
/// step that skips clipping shows.
pub const CANARY_NORM: f64 = 4.0;

/// The audited run's folder inside `--out`.
pub const AUDITED_RUN: &str = "audited-run";

/// What one audit measured, before the bound.
struct Measured {
    what: String,
    certified: f64,
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    records: Option<usize>,
    scores: Vec<f64>,
    inserted: Vec<bool>,
    run_dir: Option<PathBuf>,
}

/// `dptrain audit` on the run config `plan` (read from `config`).
pub fn audit(plan: &Plan, config: &Path, opts: &AuditOptions) -> Result<AuditOutcome, RunError> {
    if !(opts.confidence > 0.0 && opts.confidence < 1.0) {
        return Err(RunError::Plan(format!("--confidence {}: must be between 0 and 1", opts.confidence)));
    }
    if opts.canaries < 2 {
        return Err(RunError::Plan(format!("--canaries {}: at least 2 are needed", opts.canaries)));
    }
    if let Some(d) = opts.out.as_ref().filter(|d| !opts.overwrite && d.join("audit_report.json").exists()) {
        return Err(RunError::Plan(format!(
            "{} already holds an audit report: pass --overwrite to replace it",
            d.display()
        )));
    }
    let started = Instant::now();
    let m = match opts.mode {
        Mode::Mechanism => {
            let a = mechanism_of(plan, opts.canaries, opts.non_private).map_err(RunError::Plan)?;
            let certified = if opts.non_private { f64::INFINITY } else { a.certified_epsilon(plan.delta)? };
            let (scores, inserted) = a.run(None)?;
            Measured {
                what: format!(
                    "the config's DP-SGD mechanism (Poisson sampling, per-example clipping, Gaussian noise) with gradient canaries of norm {CANARY_NORM}C on coordinates nothing else uses; no model"
                ),
                certified,
                sample_rate: a.sample_rate,
                noise_multiplier: a.noise_multiplier,
                steps: a.steps,
                records: None,
                scores,
                inserted,
                run_dir: None,
            }
        }
        Mode::WhiteBox | Mode::BlackBox => audited_training(plan, opts)?,
    };
    let grid = default_grid(opts.canaries);
    let b = best_bound(&m.scores, &m.inserted, &grid, plan.delta, 1.0 - opts.confidence);
    let delta_term = 2.0 * opts.canaries as f64 * plan.delta;
    if delta_term > 0.01 {
        eprintln!(
            "note: 2·canaries·δ = {delta_term:.3}: the bound's δ term is large at this δ, so it can refute little"
        );
    }
    let inserted = m.inserted.iter().filter(|&&b| b).count();
    let json = serde_json::json!({
        "mode": opts.mode.name(),
        "what": m.what,
        "non_private": opts.non_private,
        "sample_rate": m.sample_rate, "noise_multiplier": m.noise_multiplier, "steps": m.steps,
        "clip_norm": plan.clip_norm, "delta": plan.delta,
        "canaries": opts.canaries, "inserted": inserted,
        "records_trained_on": m.records,
        "certified_epsilon": json_f64(m.certified),
        "epsilon_lower_bound": b.epsilon, "confidence": opts.confidence,
        "guesses": b.guesses, "correct": b.correct, "k_plus": b.k_plus, "k_minus": b.k_minus,
        "guess_counts_searched": b.searched,
        "seconds": started.elapsed().as_secs_f64(),
        "audited_run": m.run_dir.as_ref().map(|d| d.display().to_string()),
    });
    let certified_text =
        if m.certified.is_finite() { format!("{:.4}", m.certified) } else { "∞ (not private)".into() };
    let text = format!(
        "{} audit of {}: q = {:.5}, σ = {:.4}, {} steps, C = {}{}\ncertified ε ≤ {certified_text} (δ = {:e})\naudited ε ≥ {:.4} at {:.0}% confidence ({} of {} guesses correct, {} canaries, {inserted} inserted; one-run method, {} guess counts searched)",
        opts.mode.name(),
        config.display(),
        m.sample_rate,
        m.noise_multiplier,
        m.steps,
        plan.clip_norm,
        m.records.map(|n| format!(", trained on {n} records (the data and the inserted canaries)")).unwrap_or_default(),
        plan.delta,
        b.epsilon,
        opts.confidence * 100.0,
        b.correct,
        b.guesses,
        opts.canaries,
        b.searched
    );
    let markdown = format!(
        "# Privacy audit (`dptrain audit --mode {}`{})\n\n```\n{text}\n```\n\n\
         What was audited: {}. Each of the {} canaries was inserted with probability ½ (a CSPRNG); \
         the auditor guessed \"inserted\" for the {} highest scores and \"absent\" for the {} lowest \
         and was right {} times of {}. The lower bound is the largest ε that this count refutes \
         at {:.0}% confidence by Theorem 5.2 of Steinke, Nasr and Jagielski (NeurIPS 2023), the \
         confidence split over the {} guess counts searched.\n\n\
         A lower bound far below the certified ε is expected (one run, a finite number of canaries, \
         {}); a lower bound *above* it would show that the training does not do what the \
         certificate assumes.{}\n",
        opts.mode.name(),
        if opts.non_private { " --non-private" } else { "" },
        m.what,
        opts.canaries,
        b.k_plus,
        b.k_minus,
        b.correct,
        b.guesses,
        opts.confidence * 100.0,
        b.searched,
        match opts.mode {
            Mode::BlackBox => "and canaries seen only through the final model's losses",
            _ => "scores that see each step's privatised gradient but no more",
        },
        m.run_dir
            .as_ref()
            .map(|d| format!(
                "\n\nThe audited run ({}) is a by-product of the audit: its certificate covers the data it \
                 trained on (the records and the inserted canaries), and it is not the model to release.",
                d.display()
            ))
            .unwrap_or_default()
    );
    if let Some(d) = &opts.out {
        std::fs::create_dir_all(d).map_err(|e| RunError::Plan(format!("cannot create {}: {e}", d.display())))?;
        let pretty = serde_json::to_string_pretty(&json).map_err(|e| RunError::Plan(e.to_string()))? + "\n";
        crate::report::write_atomic(&d.join("audit_report.json"), pretty.as_bytes())?;
        crate::report::write_atomic(&d.join("audit_report.md"), markdown.as_bytes())?;
    }
    Ok(AuditOutcome { json, text, markdown })
}

fn json_f64(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or_else(|| serde_json::Value::String(format!("{x}")), serde_json::Value::Number)
}

/// Removes a temporary folder when dropped (the audited run of an audit without --out).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Trains the config with canaries (white-box: gradient canaries in the steps; black-box:
/// canary records in the data) and scores them.
fn audited_training(plan: &Plan, opts: &AuditOptions) -> Result<Measured, RunError> {
    let (root, _temp) = match &opts.out {
        Some(d) => (d.clone(), None),
        None => {
            let t = std::env::temp_dir().join(format!("dptrain-audit-{}", std::process::id()));
            (t.clone(), Some(TempDir(t)))
        }
    };
    let run_dir = root.join(AUDITED_RUN);
    let mut p = plan.clone();
    p.output_dir = run_dir.clone();
    let mut ro = RunOptions {
        non_private: opts.non_private,
        overwrite: opts.overwrite || _temp.is_some(),
        log_lines: opts.log_lines,
        ..Default::default()
    };
    let (what, scores, inserted, outcome) = match opts.mode {
        Mode::WhiteBox => {
            ro.gradient_canaries = Some(CanarySpec { count: opts.canaries, norm: CANARY_NORM });
            let outcome = run(&p, &ro)?;
            let c =
                outcome.canaries.as_ref().ok_or_else(|| RunError::Plan("the audited run kept no canaries".into()))?;
            let what = format!(
                "the config's own training with gradient canaries: each inserted canary is a record of the training set (N and q count it), sampled by the run's Poisson sampler; when sampled it adds a Dirac gradient of norm {CANARY_NORM}C on a coordinate of its own (appended to the model's), clipped by the step's own clip kernel and noised by the step's own noise call; scored by the log-likelihood ratio of its coordinate over every step's privatised gradient"
            );
            if opts.out.is_some() {
                let private = root.join("private");
                std::fs::create_dir_all(&private)
                    .map_err(|e| RunError::Plan(format!("cannot create {}: {e}", private.display())))?;
                let text: String = c
                    .inserted()
                    .iter()
                    .zip(c.scores())
                    .enumerate()
                    .map(|(k, (i, s))| serde_json::json!({"canary": k, "inserted": i, "score": s}).to_string() + "\n")
                    .collect();
                crate::report::write_atomic(&private.join("canaries.jsonl"), text.as_bytes())?;
            }
            (what, c.scores(), c.inserted().to_vec(), outcome)
        }
        Mode::BlackBox => {
            let arch = Architecture::detect(&plan.model_dir)?;
            let (train, _) = crate::train::run::load_data(plan, arch)?;
            let private = root.join("private");
            std::fs::create_dir_all(&private)
                .map_err(|e| RunError::Plan(format!("cannot create {}: {e}", private.display())))?;
            let canaries = super::input::InputCanaries::new(
                opts.canaries,
                arch,
                &plan.model_dir,
                &train.labels,
                &plan.train_path,
                plan.seed,
            )
            .map_err(RunError::Plan)?;
            let augmented = private.join("audit_train.jsonl");
            canaries.write_training_file(&plan.train_path, &augmented).map_err(RunError::Plan)?;
            p.train_path = augmented.clone();
            let outcome = run(&p, &ro);
            // The augmented file is a copy of the private data: not kept.
            let _ = std::fs::remove_file(&augmented);
            let outcome = outcome?;
            let scores = canaries.scores(plan, outcome.model.as_ref(), &train.labels)?;
            canaries.write_list(&private.join("canaries.jsonl"), &scores).map_err(RunError::Plan)?;
            let what = format!(
                "the config's own training with canary records: {} each inserted into the training data with probability ½ and trained on like any record; after training each is scored by {}",
                canaries.describe(),
                if arch == Architecture::Bert {
                    "the trained model's log-probability of the canary's label, relative to that label's mean probability over all canaries"
                } else {
                    "how much lower the trained model's loss on it is than the base model's"
                }
            );
            (what, scores, canaries.inserted().to_vec(), outcome)
        }
        Mode::Mechanism => unreachable!("not a training audit"),
    };
    let s = &outcome.summary;
    Ok(Measured {
        what,
        certified: s.epsilon.unwrap_or(f64::INFINITY),
        sample_rate: s.sample_rate,
        noise_multiplier: s.noise_multiplier,
        steps: s.steps,
        records: Some(s.dataset_size),
        scores,
        inserted,
        run_dir: _temp.is_none().then_some(run_dir),
    })
}

/// Each example's loss under `model` (no tape), in micro-batches of `batch`.
pub(super) fn example_losses(model: &dyn DpModel, examples: &[Example], batch: usize) -> candle_core::Result<Vec<f64>> {
    let all: Vec<usize> = (0..examples.len()).collect();
    let mut out = vec![0.0; examples.len()];
    for mb in make_micro_batches(examples, &all, batch) {
        let b = Batch::gather(examples, &mb, None, model.device())?;
        let l = model.example_losses(&b, None)?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        for (r, &i) in mb.iter().enumerate() {
            out[i] = l[r];
        }
    }
    Ok(out)
}
