//! Claims about `dptrain tune` (private hyper-parameter selection): it runs the drawn number of DP
//! trials, releases exactly the best-scoring trial's tensors under one certificate whose ε covers
//! the whole search (recomputable from its ledger, within the target), keeps the number of trials
//! and the other trials out of the release, passes `dptrain verify`, and a certificate that
//! understates the search fails verification. An interrupted search resumes the same search (the
//! same number of trials and draws, finished trials kept, the interrupted trial continued) and
//! releases what the uninterrupted search releases; a trial keyed by the same secret key repeats
//! its sampling and noise.

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

/// The search's private state while it runs.
fn state(root: &Path) -> serde_json::Value {
    json(root.join("private/search-state.json"))
}

#[test]
fn an_interrupted_search_resumes_the_same_search_and_releases_what_the_uninterrupted_one_does() {
    let f = common::TinyRunDir::new("tune", "resume");
    std::fs::copy(f.out("test.jsonl"), f.out("validation.jsonl")).unwrap();
    let whole = f.config("whole", 6.0, TRAINING);
    std::fs::write(&whole, std::fs::read_to_string(&whole).unwrap() + &tune_table(&f.dir)).unwrap();
    let (ok, out) = common::dptrain(&["tune", "--config", &whole]);
    assert!(ok, "{out}");
    let whole_record = json(f.out("whole/private/run.json"));
    let k = whole_record["number_of_trials"].as_u64().unwrap();
    assert!(!f.out("whole/private/search-state.json").exists(), "a finished search keeps no state");

    // The same seeded search, interrupted after step 1 of its last trial (checkpoint written).
    let cut = f.out("cut");
    let cut_cfg = whole.replace("whole", "cut");
    std::fs::write(&cut_cfg, std::fs::read_to_string(&whole).unwrap().replace("/whole\"", "/cut\"")).unwrap();
    let stop = format!("{}", k - 1);
    let (ok, out) =
        common::dptrain(&["tune", "--config", &cut_cfg, "--stop-after-trial", &stop, "--stop-after-step", "1"]);
    assert!(!ok && out.contains(&format!("in trial {k} after step 1")) && out.contains("--resume"), "{out}");
    let st = state(&cut);
    assert_eq!(st["number_of_trials"].as_u64(), Some(k));
    assert_eq!(st["finished"].as_array().unwrap().len() as u64, k - 1);
    // Started again without --resume, the folder is refused (not silently a new search).
    let (ok, out) = common::dptrain(&["tune", "--config", &cut_cfg]);
    assert!(!ok && out.contains("holds an interrupted search") && out.contains("--resume"), "{out}");
    // Trials of a search whose state is gone are not taken over by a new search.
    let orphan = f.out("orphan");
    std::fs::create_dir_all(orphan.join("private/trials")).unwrap();
    std::fs::write(orphan.join("private/trials/left-over"), "").unwrap();
    let (ok, out) = common::dptrain(&["tune", "--config", &cut_cfg, "--out", orphan.to_str().unwrap()]);
    assert!(!ok && out.contains("without its state") && out.contains("--overwrite"), "{out}");
    // A changed config cannot resume it.
    let text = std::fs::read_to_string(&cut_cfg).unwrap();
    std::fs::write(&cut_cfg, text.clone() + "# changed\n").unwrap();
    let (ok, out) = common::dptrain(&["tune", "--config", &cut_cfg, "--resume"]);
    assert!(!ok && out.contains("the config differs"), "{out}");
    std::fs::write(&cut_cfg, &text).unwrap();

    let (ok, out) = common::dptrain(&["tune", "--config", &cut_cfg, "--resume"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} of its {k} trials finished", k - 1)) && out.contains("resumed from its checkpoint"),
        "{out}"
    );
    let cut_record = json(cut.join("private/run.json"));
    assert_eq!(cut_record["number_of_trials"].as_u64(), Some(k));
    for (a, b) in whole_record["trials"].as_array().unwrap().iter().zip(cut_record["trials"].as_array().unwrap()) {
        assert_eq!((&a["candidate"], &a["noisy_score"]), (&b["candidate"], &b["noisy_score"]));
    }
    assert_eq!(
        tensors(cut.join("release/adapter_model.safetensors")),
        tensors(f.out("whole/release/adapter_model.safetensors"))
    );
    let (ok, out) = common::dptrain(&["tune", "--config", &cut_cfg, "--resume"]);
    assert!(!ok && out.contains("has finished"), "{out}");

    // Unseeded: the number of trials and the key are fixed when the search starts and kept.
    let free_cfg = whole.replace("whole", "free");
    std::fs::write(
        &free_cfg,
        std::fs::read_to_string(&whole).unwrap().replace("/whole\"", "/free\"").replace("seed = 3\n", ""),
    )
    .unwrap();
    let (ok, out) =
        common::dptrain(&["tune", "--config", &free_cfg, "--stop-after-trial", "0", "--stop-after-step", "1"]);
    assert!(!ok && out.contains("in trial 1 after step 1"), "{out}");
    let st = state(&f.out("free"));
    let k = st["number_of_trials"].as_u64().unwrap();
    assert_eq!(st["key"].as_str().map(str::len), Some(64), "{st}");
    // The interrupted trial loses its checkpoint (as if killed before writing one): it starts
    // again under the same key.
    std::fs::remove_dir_all(f.out("free/private/trials/trial-001/private/checkpoints")).unwrap();
    let (ok, out) = common::dptrain(&["tune", "--config", &free_cfg, "--resume"]);
    assert!(ok, "{out}");
    assert!(!out.contains("resumed from its checkpoint"), "{out}");
    let record = json(f.out("free/private/run.json"));
    assert_eq!(record["number_of_trials"].as_u64(), Some(k));
    let (ok, out) = common::dptrain(&["verify", f.out("free").to_str().unwrap()]);
    assert!(ok, "{out}");
}

/// A trial's run under a secret streams key: the same key, the same adapter; another key, another.
#[test]
fn a_run_keyed_by_the_same_secret_key_repeats_its_sampling_and_noise() {
    use dptrain::privacy::StreamsKey;
    let f = common::TinyRunDir::new("tune", "keyed");
    let cfg = f.config("keyed", 6.0, &TRAINING.replace("seed = 3\n", ""));
    let mut plan = dptrain::config::load(Path::new(&cfg)).unwrap();
    let key = StreamsKey::fresh();
    let mut adapter = |k: StreamsKey, name: &str| {
        plan.output_dir = f.out(name);
        let opts = dptrain::train::RunOptions { streams_key: Some(k), ..Default::default() };
        dptrain::train::run(&plan, &opts).unwrap();
        tensors(f.out(name).join("release/adapter_model.safetensors"))
    };
    let a = adapter(key, "a");
    let b = adapter(key, "b");
    let c = adapter(key.derive(1), "c");
    assert_eq!(a, b, "the same key repeats the run");
    assert_ne!(a, c, "another key draws other noise");
    // A seeded config cannot also take a key.
    let seeded = dptrain::config::load(Path::new(&f.config("seeded", 6.0, TRAINING))).unwrap();
    let opts = dptrain::train::RunOptions { streams_key: Some(key), ..Default::default() };
    assert!(dptrain::train::run(&seeded, &opts).is_err());
}
