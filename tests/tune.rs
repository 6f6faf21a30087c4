//! Claims about `dptrain tune` (private hyper-parameter selection): it runs the drawn number of DP
//! trials, releases exactly the best-scoring trial's tensors under one certificate whose ε covers
//! the whole search (recomputable from its ledger, within the target), keeps the number of trials
//! and the other trials out of the release, passes `dptrain verify`, and a certificate that
//! understates the search fails verification.

mod common;

use dptrain::accounting::event::Ledger;
use dptrain::accounting::RdpAccountant;
use std::path::Path;

const TRAINING: &str =
    "expected-batch-size = 8\nmax-physical-batch = 8\nepochs = 2\nlearning-rate = 0.01\nseed = 3\ncheckpoint-every = 0";

fn tune_table(dir: &Path) -> String {
    format!(
        "\n[tune]\nvalidation = \"{}/validation.jsonl\"\nmean-trials = 3\ntrials-shape = 1\nscore-noise = 4\nlearning-rate = [0.001, 0.05]\nexpected-batch-size = [8, 16]\n",
        dir.display()
    )
}

fn json(path: impl AsRef<Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The tensors of a safetensors file, by name (its metadata left out).
fn tensors(path: impl AsRef<Path>) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

fn certificate(path: impl AsRef<Path>) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["dptrain_certificate"]).unwrap()
}

#[test]
fn a_search_releases_the_best_trial_under_one_certificate_covering_the_whole_search() {
    let f = common::TinyRunDir::new("tune", "search");
    std::fs::copy(f.out("test.jsonl"), f.out("validation.jsonl")).unwrap();
    let cfg = f.config("search", 6.0, TRAINING);
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap() + &tune_table(&f.dir)).unwrap();

    // A plain run refuses a config with a [tune] table, naming the command to use.
    let (ok, out) = common::dptrain(&["--config", &cfg]);
    assert!(!ok && out.contains("[tune]") && out.contains("dptrain tune"), "{out}");

    let (ok, out) = common::dptrain(&["tune", "--config", &cfg]);
    assert!(ok, "{out}");
    let root = f.out("search");
    let record = json(root.join("private/run.json"));
    let trials = record["trials"].as_array().unwrap();
    let k = record["number_of_trials"].as_u64().unwrap();
    assert!(k >= 1 && trials.len() as u64 == k);
    for t in 1..=k + 1 {
        let dir = root.join(format!("private/trials/trial-{t:03}"));
        assert_eq!(dir.join("release/adapter_model.safetensors").is_file(), t <= k, "{}", dir.display());
    }
    // The winner is the first trial with the highest noisy score.
    let scores: Vec<f64> = trials.iter().map(|t| t["noisy_score"].as_f64().unwrap()).collect();
    let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let win = scores.iter().position(|&s| s == top).unwrap();
    assert_eq!(record["selected_trial"].as_u64().unwrap(), win as u64 + 1);

    // Released: exactly the winner's tensors, under the search's certificate (not the trial's).
    let trial_adapter = Path::new(trials[win]["dir"].as_str().unwrap()).join("release/adapter_model.safetensors");
    let release = root.join("release");
    assert_eq!(tensors(release.join("adapter_model.safetensors")), tensors(&trial_adapter));
    let cert = certificate(release.join("adapter_model.safetensors"));
    let trial_cert = certificate(&trial_adapter);
    let report = json(release.join("privacy_report.json"));
    assert_eq!(cert, report["certificate"]);
    let eps = cert["epsilon"].as_f64().unwrap();
    assert!(eps <= 6.0 && eps > 5.9, "the search's ε {eps} (target 6)");
    assert!(trial_cert["epsilon"].as_f64().unwrap() < eps, "one trial alone spends less than the search");
    let ledger: Ledger = serde_json::from_value(cert["ledger"].clone()).unwrap();
    let again = RdpAccountant::default().epsilon(&ledger.as_event(), 1e-3).unwrap().epsilon;
    assert_eq!(again, eps);
    let candidate = trials[win]["candidate"].as_u64().unwrap();
    assert_eq!(cert["selection"]["selected"]["candidate"].as_u64().unwrap(), candidate);
    assert_eq!(cert["noise_multiplier"], trials[win]["noise_multiplier"]);
    assert_eq!(cert["selection"]["candidates"].as_array().unwrap().len(), 4);
    assert_eq!(report["hyperparameters"], "selected privately, included in ε");

    // Nothing of the other trials, nor their number, nor a plain hash of an input file or the
    // commitment key, is in the release.
    let secrets: Vec<String> = ["train", "test", "validation", "config"]
        .iter()
        .map(|w| record["inputs"][*w]["sha256"].as_str().unwrap().to_string())
        .chain([record["commitment_key"].as_str().unwrap().to_string()])
        .collect();
    for entry in std::fs::read_dir(&release).unwrap() {
        let p = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(!text.contains("trial-00") && !text.contains("number_of_trials\": 1"), "{}", p.display());
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{} holds {secret}", p.display());
        }
    }
    assert!(cert["selection"]["number_of_trials"].is_string());
    let md = std::fs::read_to_string(release.join("privacy_report.md")).unwrap();
    assert!(md.contains("selected privately, included in ε") && md.contains(&format!("{eps}")), "{md}");

    let (ok, out) = common::dptrain(&["verify", root.to_str().unwrap(), "--allow-seeded"]);
    assert!(ok, "{out}");

    // A forged certificate that claims a smaller mean number of trials (everything else made
    // consistent: adapter metadata, report, hash, markdown) fails on the ledger check.
    let mut forged = cert.clone();
    forged["selection"]["trials_distribution"]["mean"] = serde_json::json!(1.5);
    let bytes = std::fs::read(release.join("adapter_model.safetensors")).unwrap();
    let bytes = dptrain::tune::with_certificate(&bytes, &forged.to_string()).unwrap();
    std::fs::write(release.join("adapter_model.safetensors"), &bytes).unwrap();
    let mut r = report.clone();
    r["certificate"] = forged.clone();
    r["selection"] = forged["selection"].clone();
    r["adapter_sha256"] = serde_json::json!(dptrain::config::hex_sha256(&bytes));
    std::fs::write(release.join("privacy_report.json"), serde_json::to_string_pretty(&r).unwrap()).unwrap();
    std::fs::write(release.join("privacy_report.md"), dptrain::report::markdown::render_search(&r)).unwrap();
    let (ok, out) = common::dptrain(&["verify", root.to_str().unwrap(), "--allow-seeded"]);
    assert!(!ok, "{out}");
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        failed.iter().any(|l| l.contains("ledger = the search")) && failed.iter().any(|l| l.contains("γ")),
        "{out}"
    );
    assert!(!failed.iter().any(|l| l.contains("hash") || l.contains("report's copy")), "{out}");
}

#[test]
fn a_search_is_refused_before_any_trial_when_it_cannot_be_certified() {
    let f = common::TinyRunDir::new("tune", "refusals");
    std::fs::copy(f.out("test.jsonl"), f.out("validation.jsonl")).unwrap();
    let cfg = f.config("refused", 4.0, TRAINING);
    let base = std::fs::read_to_string(&cfg).unwrap();
    let expect_refusal = |text: String, needle: &str| {
        std::fs::write(&cfg, text).unwrap();
        let (ok, out) = common::dptrain(&["tune", "--config", &cfg]);
        assert!(!ok && out.contains(needle), "expected `{needle}` in: {out}");
        assert!(!f.out("refused/private/trials").exists(), "a trial ran: {out}");
    };
    // No [tune] table.
    expect_refusal(base.clone(), "no [tune] table");
    let with = base.clone() + &tune_table(&f.dir);
    // σ given instead of a target: nothing to calibrate the search to.
    expect_refusal(with.replace("target-epsilon = 4.0", "noise-multiplier = 1.0"), "target-epsilon");
    // The validation file is the training file.
    expect_refusal(with.replace("validation.jsonl", "train.jsonl"), "is the training file");
    // Score noise so small that the selection alone exceeds the target.
    expect_refusal(with.replace("score-noise = 4", "score-noise = 0.05"), "score-noise");
    // An empty search space.
    expect_refusal(
        with.replace("learning-rate = [0.001, 0.05]\n", "").replace("expected-batch-size = [8, 16]\n", ""),
        "lists no setting to search",
    );
}
