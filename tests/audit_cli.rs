//! Claims about `dptrain audit` (issue 20, mechanism mode): on a run config it reports the
//! certified ε of the config's mechanism and an audited lower bound that does not exceed it; the
//! same mechanism without noise (`--non-private`) gets a bound far above what the DP one reaches;
//! `--out` writes audit_report.json / .md and never replaces them without --overwrite; the modes
//! not implemented yet are refused by name.

mod common;

/// `dptrain audit --json` on `cfg` (2,000 canaries unless `extra` says otherwise).
fn audit(cfg: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["audit", "--config", cfg, "--json"];
    if !extra.contains(&"--canaries") {
        args.extend(["--canaries", "2000"]);
    }
    args.extend(extra);
    let (ok, out) = common::dptrain(&args);
    assert!(ok, "{out}");
    serde_json::from_str(out.lines().find(|l| l.starts_with("{\"")).unwrap_or_else(|| panic!("{out}"))).unwrap()
}

#[test]
fn the_audited_lower_bound_stays_below_the_certificate_and_a_noiseless_mechanism_is_caught() {
    let f = common::TinyRunDir::new("audit", "mechanism");
    // 48 records, L = 16 (q = 1/3), 12 steps at ε = 2, δ = 1e-6.
    let cfg = f.config("run", 2.0, "expected-batch-size = 16\nsteps = 12\nlearning-rate = 0.05");
    // The bound's δ term is 2·m·δ: δ = 1e-3 with 2,000 canaries could refute nothing.
    common::replace_in(&cfg, "delta = 1e-3", "delta = 1e-6");
    let dp = audit(&cfg, &["--mode", "mechanism"]);
    let (certified, bound) = (dp["certified_epsilon"].as_f64().unwrap(), dp["epsilon_lower_bound"].as_f64().unwrap());
    assert!((certified - 2.0).abs() < 0.01, "{dp}");
    assert!(bound <= certified, "{dp}");
    assert_eq!((dp["steps"].as_u64(), dp["canaries"].as_u64()), (Some(12), Some(2000)));
    let np = audit(&cfg, &["--mode", "mechanism", "--non-private"]);
    assert_eq!(np["certified_epsilon"], "inf");
    let np_bound = np["epsilon_lower_bound"].as_f64().unwrap();
    assert!(np_bound > 4.0 && np_bound > certified + 1.0, "{np}");
    // --out writes the report (JSON and markdown) and never replaces one silently.
    let dir = f.out("audit");
    let dir_s = dir.display().to_string();
    let written = audit(&cfg, &["--mode", "mechanism", "--out", &dir_s]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("audit_report.json")).unwrap()).unwrap();
    assert_eq!(saved, written);
    let md = std::fs::read_to_string(dir.join("audit_report.md")).unwrap();
    assert!(
        md.contains("certified ε ≤")
            && md.contains(&format!("audited ε ≥ {:.4}", written["epsilon_lower_bound"].as_f64().unwrap())),
        "{md}"
    );
    let (ok, out) = common::dptrain(&["audit", "--config", &cfg, "--mode", "mechanism", "--out", &dir_s]);
    assert!(!ok && out.contains("--overwrite"), "{out}");
    assert_eq!(std::fs::read_to_string(dir.join("audit_report.md")).unwrap(), md);
    let (ok, out) = common::dptrain(&["audit", "--config", &cfg, "--mode", "grey-box"]);
    assert!(!ok && out.contains("--mode grey-box: expected white-box, black-box or mechanism"), "{out}");
}

/// 48 records + about 1,000 inserted canaries, L = 512 (q ≈ ½), 12 steps at ε = 2, δ = 1e-6.
fn training_audit_config(f: &common::TinyRunDir) -> String {
    let cfg = f.config("run", 2.0, "expected-batch-size = 512\nsteps = 12\nlearning-rate = 0.05");
    common::replace_in(&cfg, "delta = 1e-3", "delta = 1e-6");
    cfg
}

#[test]
fn the_white_box_audit_of_a_dp_training_run_stays_below_its_certificate_and_a_non_private_run_is_caught() {
    let f = common::TinyRunDir::new("audit", "white-box");
    let cfg = training_audit_config(&f);
    let dir = f.out("wb");
    let dir_s = dir.display().to_string();
    let dp = audit(&cfg, &["--mode", "white-box", "--out", &dir_s]);
    let (certified, bound) = (dp["certified_epsilon"].as_f64().unwrap(), dp["epsilon_lower_bound"].as_f64().unwrap());
    assert!((certified - 2.0).abs() < 0.01, "{dp}");
    assert!(bound <= certified, "{dp}");
    // The audited run trained on the records and the inserted canaries, and its certificate says so.
    let inserted = dp["inserted"].as_u64().unwrap() as usize;
    assert!((900..1100).contains(&inserted), "{dp}");
    assert_eq!(dp["records_trained_on"].as_u64(), Some(48 + inserted as u64), "{dp}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("audited-run/release/privacy_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["dataset"]["size"].as_u64(), Some(48 + inserted as u64), "{report}");
    assert!((dp["sample_rate"].as_f64().unwrap() - 512.0 / (48 + inserted) as f64).abs() < 1e-12, "{dp}");
    let np = audit(&cfg, &["--mode", "white-box", "--non-private"]);
    assert_eq!(np["certified_epsilon"], "inf");
    let np_bound = np["epsilon_lower_bound"].as_f64().unwrap();
    assert!(np_bound > 4.0 && np_bound > certified + 1.0, "{np}");
}

#[test]
fn the_black_box_audit_of_a_dp_run_stays_below_its_certificate_and_catches_a_memorising_non_private_run() {
    let f = common::TinyRunDir::new("audit", "black-box");
    // 48 records + about 100 canary records (random strings of the vocabulary, random labels);
    // LoRA r 8 on four modules, 100 epochs: enough for the non-private run to memorise them in
    // most runs (about one unseeded run in ten does not: 0.22 seen once against 0.96–1.54), so
    // the config is seeded (training and canaries) to make the test a fixed regression check.
    let cfg = f.config(
        "run",
        2.0,
        "expected-batch-size = 8\nepochs = 100\nlearning-rate = 0.005\noptimizer = \"adamw\"\nseed = 5",
    );
    common::replace_in(&cfg, "delta = 1e-3", "delta = 1e-6");
    common::replace_in(
        &cfg,
        "rank = 2\nalpha = 4",
        "rank = 8\nalpha = 16\ntarget-modules = [\"query\", \"value\", \"intermediate.dense\", \"output.dense\"]",
    );
    let dir = f.out("bb");
    let dir_s = dir.display().to_string();
    let dp = audit(&cfg, &["--mode", "black-box", "--canaries", "200", "--out", &dir_s]);
    let (certified, bound) = (dp["certified_epsilon"].as_f64().unwrap(), dp["epsilon_lower_bound"].as_f64().unwrap());
    assert!((certified - 2.0).abs() < 0.01 && bound <= certified, "{dp}");
    let inserted = dp["inserted"].as_u64().unwrap();
    assert_eq!(dp["records_trained_on"].as_u64(), Some(48 + inserted), "{dp}");
    // The canaries, their membership and scores are kept in the audit's private part; the
    // augmented copy of the training data is not.
    let list = std::fs::read_to_string(dir.join("private/canaries.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = list.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 200);
    assert_eq!(rows.iter().filter(|r| r["inserted"] == true).count() as u64, inserted);
    assert!(rows.iter().all(|r| r["record"]["label"].is_string() && r["score"].is_number()), "{list}");
    assert!(!dir.join("private/audit_train.jsonl").exists());
    let np = audit(&cfg, &["--mode", "black-box", "--canaries", "200", "--non-private"]);
    let np_bound = np["epsilon_lower_bound"].as_f64().unwrap();
    assert!(np_bound > 0.5, "{np}");
}
