//! `dptrain verify DIR`: re-derives what a run's outputs claim and checks they agree — the
//! adapter file's hash, the certificate in its metadata against the report, and ε recomputed
//! from the stored ledger with the stated accountant. Any mismatch fails the verification.

use crate::accounting::event::Ledger;
use crate::accounting::{AccountantKind, PldAccountant, RdpAccountant};
use crate::config::hex_sha256;
use std::path::Path;

/// One verification check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyCheck {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Outcome of `verify`: every check, and whether the run claims a DP guarantee at all.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    pub private: bool,
    pub checks: Vec<VerifyCheck>,
}

impl Verification {
    /// All checks passed and the run is private.
    pub fn ok(&self) -> bool {
        self.private && self.checks.iter().all(|c| c.pass)
    }
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

/// Verifies the outputs in `dir`. Errors only when a file cannot be read at all; every
/// disagreement is a failed check.
pub fn verify(dir: &Path) -> Result<Verification, String> {
    let report = read_json(&dir.join("privacy_report.json"))?;
    let adapter_path = dir.join("adapter_model.safetensors");
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
    for key in ["epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm", "accountant"] {
        check(
            &format!("report `{key}`"),
            report[key] == cert[key],
            format!("report {} vs certificate {}", report[key], cert[key]),
        );
    }
    let private = cert["private"].as_bool().unwrap_or(false);
    if !private {
        check("private run", false, "the certificate says the run is NOT private: it certifies nothing".into());
        return Ok(Verification { private, checks });
    }

    let ledger: Option<Ledger> = serde_json::from_value(cert["ledger"].clone()).ok();
    check("ledger readable", ledger.is_some(), "the certificate's ledger parses as DP events".into());
    check(
        "ledger = report's",
        cert["ledger"] == report["ledger"],
        "certificate and report hold the same ledger".into(),
    );
    let delta = cert["delta"].as_f64().unwrap_or(f64::NAN);
    let claimed = as_f64(&cert["epsilon"]).unwrap_or(f64::NAN);
    if let Some(ledger) = ledger {
        let steps = cert["steps"].as_u64().unwrap_or(u64::MAX);
        check(
            "ledger step count",
            ledger.steps() == steps,
            format!("ledger {} steps, certificate {steps}", ledger.steps()),
        );
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
            let stated = as_f64(&cert["epsilon_cross_check"][name]);
            let ok = matches!((value, stated), (Ok(v), Some(s)) if close(*v, s));
            check(&format!("cross-check ε ({name})"), ok, format!("recomputed {value:?}, stated {stated:?}"));
        }
    }
    if let Some(t) = report["target_epsilon"].as_f64() {
        check("ε within the target", claimed <= t, format!("ε {claimed} ≤ target {t}"));
    }
    check(
        "δ below 1/N",
        cert["dataset_size"].as_u64().is_some_and(|n| delta < 1.0 / n as f64),
        format!("δ {delta}, N {}", cert["dataset_size"]),
    );
    let md = std::fs::read_to_string(dir.join("privacy_report.md")).unwrap_or_default();
    check(
        "privacy_report.md is the rendering of privacy_report.json",
        md == super::markdown::render(&report),
        if md.is_empty() { "missing or empty".into() } else { "re-rendered from the JSON".into() },
    );
    let lines =
        std::fs::read_to_string(dir.join("metrics.jsonl")).map(|t| t.lines().count() as u64).unwrap_or(u64::MAX);
    check("metrics.jsonl has one line per step", Some(lines) == cert["steps"].as_u64(), format!("{lines} lines"));
    Ok(Verification { private, checks })
}
