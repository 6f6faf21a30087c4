//! `dptrain verify DIR`: re-derives what a run's outputs claim and checks they agree — the
//! adapter file's hash, the certificate in its metadata against the report, every headline claim
//! (guarantee sentence, seeded, certified, ε by each accountant, target) derived again from the
//! certificate and its ledger rather than read from the report, the ledger's q and σ against the
//! certificate and q = L/N. With the run's private part it also checks the data identity (the keyed
//! commitments recomputed from the input files) and the per-step metrics. Any mismatch fails.

use super::rundir::{self, RUN_RECORD};
use crate::accounting::event::Ledger;
use crate::accounting::{AccountantKind, PldAccountant, RdpAccountant};
use crate::config::hex_sha256;
use crate::privacy::CommitmentKey;
use std::path::{Path, PathBuf};

/// One verification check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyCheck {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Outcome of `verify`: every check, and whether the run certifies a DP guarantee at all.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    pub private: bool,
    pub seeded: bool,
    /// The private part that was checked, if any.
    pub private_part: Option<String>,
    pub checks: Vec<VerifyCheck>,
}

impl Verification {
    /// All checks passed (a seeded run fails its "not seeded" check unless `allow_seeded` was
    /// given) and the run is private.
    pub fn ok(&self) -> bool {
        self.private && self.checks.iter().all(|c| c.pass)
    }
}

/// What `verify` is given.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The run's private part (default: `private/` beside the release folder, when present).
    pub private: Option<PathBuf>,
    /// The training / held-out data to check against the commitments (default: the paths in the
    /// private run record).
    pub train: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// Downgrade "the run is seeded" from a failure to a warning (experiments only).
    pub allow_seeded: bool,
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

/// Relative agreement of two ε values (both finite), or both infinite.
fn close(a: f64, b: f64) -> bool {
    (a.is_infinite() && b.is_infinite() && a.signum() == b.signum()) || (a - b).abs() <= 1e-9 * a.abs().max(1e-12)
}

fn as_f64(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) if s == "inf" => Some(f64::INFINITY),
        _ => None,
    }
}

/// Verifies the run in `dir` (a run folder or its `release/` folder). Errors only when a file
/// cannot be read at all; every disagreement is a failed check.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<Verification, String> {
    let release = rundir::release_of(dir);
    let report = read_json(&release.join("privacy_report.json"))?;
    let adapter_path = release.join("adapter_model.safetensors");
    let bytes = std::fs::read(&adapter_path).map_err(|e| format!("{}: {e}", adapter_path.display()))?;
    let mut checks = Vec::new();
    let mut check =
        |name: &str, pass: bool, detail: String| checks.push(VerifyCheck { name: name.into(), pass, detail });

    let hash = hex_sha256(&bytes);
    let want = report["adapter_sha256"].as_str().unwrap_or("");
    check("adapter file hash", hash == want, format!("sha256 {hash}, report says {want}"));

    let cert: serde_json::Value = match safetensors::SafeTensors::read_metadata(&bytes) {
        Ok((_, meta)) => meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("dptrain_certificate"))
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or(serde_json::Value::Null),
        Err(e) => {
            check("adapter file", false, format!("not a safetensors file: {e}"));
            serde_json::Value::Null
        }
    };
    check("certificate present", cert.is_object(), "dptrain_certificate in the adapter's __metadata__".into());
    check(
        "certificate = report's copy",
        cert == report["certificate"],
        "the certificate in the adapter equals privacy_report.json's `certificate`".into(),
    );
    // Every headline of the report is the certificate's value (the markdown is checked below to
    // be the rendering of this JSON, so it states the same).
    for key in [
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "accountant",
        "seeded",
        "private",
        "certified",
        "target_epsilon",
        "guarantee",
        "expected_batch_size",
    ] {
        check(
            &format!("report `{key}` = certificate"),
            report[key] == cert[key],
            format!("report {} vs certificate {}", report[key], cert[key]),
        );
    }
    check(
        "report ε by accountant = certificate's cross-check",
        report["epsilon_by_accountant"] == cert["epsilon_cross_check"],
        format!("report {} vs certificate {}", report["epsilon_by_accountant"], cert["epsilon_cross_check"]),
    );
    check(
        "report dataset size = certificate",
        report["dataset"]["size"] == cert["dataset_size"],
        format!("report {} vs certificate {}", report["dataset"]["size"], cert["dataset_size"]),
    );
    check(
        "report data commitments = certificate",
        report["dataset"]["commitment"] == cert["commitments"]["train"]
            && report["test_dataset"]["commitment"] == cert["commitments"]["test"],
        "training and held-out commitments".into(),
    );
    let private = cert["private"].as_bool().unwrap_or(false);
    let seeded = cert["seeded"].as_bool().unwrap_or(true);
    let delta = cert["delta"].as_f64().unwrap_or(f64::NAN);
    let claimed = as_f64(&cert["epsilon"]);
    // The guarantee sentence and the "certified" flag, derived again from the certificate's values.
    let sentence = super::guarantee_sentence(private, seeded, claimed, delta);
    check(
        "guarantee sentence derived from ε, δ, private, seeded",
        cert["guarantee"].as_str() == Some(sentence.as_str()),
        format!("derived {sentence:?}, certificate says {}", cert["guarantee"]),
    );
    check(
        "certified = private and not seeded",
        cert["certified"].as_bool() == Some(private && !seeded),
        format!("private {private}, seeded {seeded}, certified {}", cert["certified"]),
    );
    let private_part = opts.private.clone().or_else(|| rundir::private_beside(&release));
    if !private {
        check("private run", false, "the certificate says the run is NOT private: it certifies nothing".into());
        return Ok(Verification {
            private,
            seeded,
            private_part: private_part.map(|p| p.display().to_string()),
            checks,
        });
    }

    let ledger: Option<Ledger> = serde_json::from_value(cert["ledger"].clone()).ok();
    check("ledger readable", ledger.is_some(), "the certificate's ledger parses as DP events".into());
    check(
        "ledger = report's",
        cert["ledger"] == report["ledger"],
        "certificate and report hold the same ledger".into(),
    );
    let claimed = claimed.unwrap_or(f64::NAN);
    let q = cert["sample_rate"].as_f64().unwrap_or(f64::NAN);
    let sigma = cert["noise_multiplier"].as_f64().unwrap_or(f64::NAN);
    let l = cert["expected_batch_size"].as_u64();
    let n = cert["dataset_size"].as_u64();
    check(
        "q = L / N",
        matches!((l, n), (Some(l), Some(n)) if n > 0 && q == l as f64 / n as f64),
        format!("q {q}, L {l:?}, N {n:?}"),
    );
    if let Some(ledger) = ledger {
        if cert["selection"].is_object() {
            check_selection(&cert, &ledger, &mut check);
        } else {
            let steps = cert["steps"].as_u64().unwrap_or(u64::MAX);
            check(
                "ledger step count",
                ledger.steps() == steps,
                format!("ledger {} steps, certificate {steps}", ledger.steps()),
            );
            check(
                "every ledger step has the certificate's q and σ",
                ledger.all_steps_are(q, sigma),
                format!("q {q}, σ {sigma}"),
            );
        }
        let event = ledger.as_event();
        let pld = PldAccountant::default().epsilon(&event, delta).map(|r| r.epsilon);
        let rdp = RdpAccountant::default().epsilon(&event, delta).map(|r| r.epsilon);
        let kind = cert["accountant"].as_str().and_then(|a| AccountantKind::parse(a).ok());
        let recomputed = match kind {
            Some(AccountantKind::Pld) => pld.as_ref().ok().copied(),
            Some(AccountantKind::Rdp) => rdp.as_ref().ok().copied(),
            None => None,
        };
        match recomputed {
            Some(e) => check(
                "ε recomputed from the ledger",
                close(e, claimed),
                format!("{} accountant gives {e}, certificate says {claimed}", cert["accountant"]),
            ),
            None => check(
                "ε recomputed from the ledger",
                false,
                format!("accountant {} failed or unknown", cert["accountant"]),
            ),
        }
        for (name, value) in [("pld", &pld), ("rdp", &rdp)] {
            let stated = &cert["epsilon_cross_check"][name];
            let ok = match (value, as_f64(stated)) {
                (Ok(v), Some(s)) => close(*v, s),
                // Stated unavailable: only if it really cannot be computed.
                (Err(_), None) => stated["unavailable"].is_string(),
                _ => false,
            };
            check(&format!("cross-check ε ({name})"), ok, format!("recomputed {value:?}, stated {stated}"));
        }
    }
    if let Some(t) = cert["target_epsilon"].as_f64() {
        check("ε within the target", claimed <= t, format!("ε {claimed} ≤ target {t}"));
    }
    check("δ below 1/N", n.is_some_and(|n| delta < 1.0 / n as f64), format!("δ {delta}, N {}", cert["dataset_size"]));
    let md = std::fs::read_to_string(release.join("privacy_report.md")).unwrap_or_default();
    check(
        "privacy_report.md is the rendering of privacy_report.json",
        md == if cert["selection"].is_object() {
            super::markdown::render_search(&report)
        } else {
            super::markdown::render(&report)
        },
        if md.is_empty() { "missing or empty".into() } else { "re-rendered from the JSON".into() },
    );
    check(
        "not seeded",
        !seeded || opts.allow_seeded,
        if seeded {
            format!(
                "{}SEEDED run: its sampling and noise can be reproduced from the config; it certifies nothing",
                if opts.allow_seeded { "WARNING (allowed by --allow-seeded): " } else { "" }
            )
        } else {
            "the noise key came from the operating system's entropy".into()
        },
    );
    // Without the private part the data identity is not checked (no check is recorded for it:
    // a passing line would claim what was not verified); `private_part: None` says so.
    if let Some(p) = &private_part {
        check_private(p, &cert, opts, &mut check);
    }
    Ok(Verification { private, seeded, private_part: private_part.map(|p| p.display().to_string()), checks })
}

/// Checks with the run's private part: the keyed commitments recomputed from the input files, and
/// the per-step metrics file.
fn check_private(
    private: &Path,
    cert: &serde_json::Value,
    opts: &VerifyOptions,
    check: &mut impl FnMut(&str, bool, String),
) {
    let record = match read_json(&private.join(RUN_RECORD)) {
        Ok(r) => r,
        Err(e) => return check("private run record readable", false, e),
    };
    let key = match record["commitment_key"].as_str().map(CommitmentKey::from_hex) {
        Some(Ok(k)) => k,
        _ => return check("commitment key", false, format!("no valid key in {}", private.join(RUN_RECORD).display())),
    };
    let search = cert["selection"].is_object();
    let mut files = vec![("train", &opts.train), ("test", &opts.test), ("config", &None)];
    if search {
        files.push(("validation", &None));
    }
    for (what, given) in files {
        let path = given.clone().or_else(|| record["inputs"][what]["path"].as_str().map(PathBuf::from));
        let stated = cert["commitments"][what].as_str().unwrap_or("");
        let (ok, detail) = match path.as_deref().map(|p| (p, key.commit_file(p))) {
            Some((p, Ok(c))) => (c == stated, format!("{} commits to {c}, certificate {stated}", p.display())),
            Some((p, Err(e))) => (false, format!("cannot read {}: {e}", p.display())),
            None => (false, "no path in the run record".into()),
        };
        check(&format!("{what} file matches its commitment"), ok, detail);
    }
    if search {
        // A search keeps its trials' metrics in their own folders (private/trials/).
        return;
    }
    let steps = cert["steps"].as_u64();
    let metrics = private.join(rundir::METRICS);
    let (ok, detail) = match std::fs::read_to_string(&metrics) {
        Ok(t) => (Some(t.lines().count() as u64) == steps, format!("{} lines", t.lines().count())),
        Err(e) => (false, format!("{}: {e}", metrics.display())),
    };
    check("metrics.jsonl has one line per step", ok, detail);
}

/// Checks of a private search's certificate (`dptrain tune`): the ledger is exactly one
/// repeat-and-select event with the stated distribution of the number of trials, over the
/// mixture of the stated candidates' trial mechanisms (each its DP-SGD steps at q = L/N and the
/// Gaussian score), and the headline q, σ, steps, L and C are the selected candidate's.
fn check_selection(cert: &serde_json::Value, ledger: &Ledger, check: &mut impl FnMut(&str, bool, String)) {
    let sel = &cert["selection"];
    let d = &sel["trials_distribution"];
    let (mean, shape) = (d["mean"].as_f64().unwrap_or(f64::NAN), d["shape"].as_f64().unwrap_or(f64::NAN));
    let score_noise = sel["score_noise"].as_f64().unwrap_or(f64::NAN);
    let n = cert["dataset_size"].as_u64().unwrap_or(0);
    let cands = sel["candidates"].as_array().cloned().unwrap_or_default();
    let mut expected = Vec::new();
    let mut rates_ok = !cands.is_empty();
    for c in &cands {
        let (q, sigma, steps) = (c["sample_rate"].as_f64(), c["noise_multiplier"].as_f64(), c["steps"].as_u64());
        let l = c["settings"]["expected_batch_size"].as_u64();
        match (q, sigma, steps, l) {
            (Some(q), Some(sigma), Some(steps), Some(l)) => {
                rates_ok &= n > 0 && q == l as f64 / n as f64;
                expected.push(crate::tune::trial_event(q, sigma, steps, score_noise));
            }
            _ => rates_ok = false,
        }
    }
    check("every candidate's q = L / N", rates_ok, format!("{} candidates, N {n}", cands.len()));
    let want = crate::tune::search_event(&expected, mean, shape);
    check(
        "ledger = the search over the stated candidates",
        ledger.entries.len() == 1 && ledger.entries[0] == want,
        format!("one repeat-and-select event (mean {mean}, η {shape}) over the {} candidates' trials", cands.len()),
    );
    let gamma_ok = crate::accounting::selection::TruncatedNegativeBinomial::with_mean(shape, mean)
        .is_ok_and(|t| d["gamma"].as_f64() == Some(t.gamma));
    check("γ of the trial distribution from its mean and shape", gamma_ok, format!("γ {}", d["gamma"]));
    let chosen = sel["selected"]["candidate"].as_u64().and_then(|i| cands.get(i as usize));
    let same = chosen.is_some_and(|c| {
        c["sample_rate"] == cert["sample_rate"]
            && c["noise_multiplier"] == cert["noise_multiplier"]
            && c["steps"] == cert["steps"]
            && c["settings"]["expected_batch_size"] == cert["expected_batch_size"]
            && c["settings"]["clip_norm"] == cert["clip_norm"]
            && c["settings"] == sel["selected"]["settings"]
    });
    check(
        "headline q, σ, steps, L, C = the selected candidate's",
        same,
        format!("selected candidate {}", sel["selected"]["candidate"]),
    );
}
