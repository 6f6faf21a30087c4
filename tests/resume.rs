//! Claims about checkpoints, resume and verify, on a tiny model folder written by the test: a
//! seeded run interrupted at random steps (cleanly, or killed) and resumed gives the adapter of an
//! uninterrupted run bit for bit; a corrupted checkpoint, a changed config key, changed data and a
//! fresh run into a folder with checkpoints are refused with messages naming what is wrong;
//! resuming a finished run trains nothing; `dptrain verify` accepts a run and catches a tampered
//! adapter, report or ledger.

mod common;

use common::dptrain;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("dptrain-resume-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        common::write_tiny_model_dir(&dir.join("model"), 4);
        common::write_tiny_classification_data(&dir);
        Fixture { dir }
    }

    /// A seeded 9-step DP run (checkpoint every `every` steps) writing to `out`.
    fn config(&self, out: &str, every: u64, lr: &str) -> String {
        self.config_with(out, every, lr, "")
    }

    /// The same with extra `[training]` lines.
    fn config_with(&self, out: &str, every: u64, lr: &str, extra: &str) -> String {
        let d = self.dir.display();
        let text = format!(
            "[model]\npath = \"{d}/model\"\nmax-seq-len = 12\n\n[data]\ntrain = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"\n\n\
             [lora]\nrank = 2\nalpha = 4\n\n[privacy]\ntarget-epsilon = 6.0\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n\
             [training]\nexpected-batch-size = 8\nmax-physical-batch = 3\nsteps = 9\nlearning-rate = {lr}\nseed = 7\n\
             checkpoint-every = {every}\nkeep-checkpoints = 2\n{extra}\n[output]\ndir = \"{d}/{out}\"\n"
        );
        let path = self.dir.join(format!("{out}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The adapter's tensors, by name, as raw bytes.
fn tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("release/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

/// sha256 of the adapter file: equal runs must give byte-identical files, not only equal tensors.
fn adapter_sha(dir: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(dir.join("release/adapter_model.safetensors")).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces a checkpoint's state.json and its checksum, as a deliberate edit would.
fn rewrite_state(ck: &Path, state: &serde_json::Value) {
    use sha2::Digest;
    let text = serde_json::to_vec_pretty(state).unwrap();
    std::fs::write(ck.join("state.json"), &text).unwrap();
    let d = sha2::Sha256::digest(&text);
    std::fs::write(ck.join("state.sha256"), d.iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("release/privacy_report.json")).unwrap()).unwrap()
}

#[test]
fn seeded_run_interrupted_at_random_steps_and_resumed_equals_the_uninterrupted_run() {
    let f = Fixture::new("random");
    // One config for both runs (the certificate commits to the config file): only --out differs.
    let cfg = f.config("parts", 2, "0.05");
    let (ok, log) = dptrain(&["--config", &cfg, "--out", &f.out("full").display().to_string()]);
    assert!(ok, "{log}");
    let want = tensors(&f.out("full"));
    // Two interruptions at random steps (the seed is printed so a failure can be replayed).
    let seed: u64 = rand::rng().random();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let first = rng.random_range(1..8u64);
    let second = rng.random_range(first + 1..9u64);
    let out = f.out("parts").display().to_string();
    let (ok, log) = dptrain(&["--config", &cfg, "--stop-after-step", &first.to_string()]);
    assert!(!ok && log.contains(&format!("after step {first} of 9")) && log.contains("--resume"), "{log}");
    assert!(!f.out("parts").join("release/adapter_model.safetensors").exists(), "no outputs before the run ends");
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &out, "--stop-after-step", &second.to_string()]);
    assert!(!ok && log.contains(&format!("after step {second} of 9")), "seed {seed}: {log}");
    // Only the newest two checkpoints are kept.
    let kept = std::fs::read_dir(f.out("parts").join("private/checkpoints")).unwrap().count();
    assert_eq!(kept, 2, "seed {seed}");
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &out]);
    assert!(ok, "seed {seed}: {log}");
    assert_eq!(tensors(&f.out("parts")), want, "seed {seed}: stops at {first} and {second}");
    assert_eq!(adapter_sha(&f.out("parts")), adapter_sha(&f.out("full")), "the adapter file, byte for byte");
    let (a, b) = (report(&f.out("full")), report(&f.out("parts")));
    for key in ["epsilon", "steps", "noise_multiplier", "ledger"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("private/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["mean_loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&f.out("full")), losses(&f.out("parts")));
    // A finished run's checkpoints (noise key, sampler state) are gone by default.
    assert!(!f.out("parts").join("private/checkpoints").exists());
    assert!(!f.out("full").join("private/checkpoints").exists());
}

#[test]
fn killed_run_resumed_from_its_last_checkpoint_equals_the_uninterrupted_run() {
    let f = Fixture::new("kill");
    let cfg = f.config_with("killed", 1, "0.05", "steps = 40");
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 9\n", "");
    std::fs::write(&cfg, cfg_text).unwrap();
    let (ok, log) = dptrain(&["--config", &cfg, "--out", &f.out("full").display().to_string()]);
    assert!(ok, "{log}");
    let out = f.out("killed");
    let ckpts = out.join("private/checkpoints");
    let newest = || -> Option<u64> {
        std::fs::read_dir(&ckpts)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
            .max()
    };
    // Kill it (SIGKILL: no chance to clean up) at a random moment after its first checkpoint; a
    // kill that lands after the last step proves nothing, so it is retried with a shorter delay.
    let mut delay = rand::rng().random_range(0..40u64);
    let killed_at = loop {
        let _ = std::fs::remove_dir_all(&out);
        let mut child = common::spawn_quiet(&["--config", &cfg]);
        let t0 = std::time::Instant::now();
        while newest().is_none() {
            assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        match newest() {
            Some(k) if k < 40 && !out.join("release/adapter_model.safetensors").exists() => break k,
            _ => {
                assert!(delay > 0, "the run finished before any kill could land");
                delay /= 2;
            }
        }
    };
    assert!((1..40).contains(&killed_at), "killed after step {killed_at} of 40");
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &out.display().to_string()]);
    assert!(ok, "{log}");
    assert!(log.contains(&format!("(step {killed_at} of 40)")), "resumed from the kill step: {log}");
    assert_eq!(tensors(&out), tensors(&f.out("full")));
    assert_eq!(adapter_sha(&out), adapter_sha(&f.out("full")), "the adapter file, byte for byte");
}

#[test]
fn corrupted_changed_or_mismatched_checkpoints_are_refused_with_the_reason() {
    let f = Fixture::new("refuse");
    let cfg = f.config("run", 2, "0.05");
    let out = f.out("run").display().to_string();
    let (ok, log) = dptrain(&["--config", &cfg, "--stop-after-step", "4"]);
    assert!(!ok, "{log}");
    // A fresh run into the folder is refused (it would lose the interrupted run).
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(!ok && log.contains("holds checkpoints") && log.contains("--resume"), "{log}");
    // A changed key is named.
    // (A copy under another name: `cfg` itself stays the run's config for the checks below.)
    let changed = f.dir.join("changed.toml").display().to_string();
    std::fs::write(
        &changed,
        std::fs::read_to_string(&cfg).unwrap().replace("learning-rate = 0.05", "learning-rate = 0.07"),
    )
    .unwrap();
    let (ok, log) = dptrain(&["--config", &changed, "--resume", &out]);
    assert!(!ok && log.contains("training.learning-rate") && log.contains("does not belong to this run"), "{log}");
    // Changed training data.
    let train = f.dir.join("train.jsonl");
    let original = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, original.replacen("\"a\"", "\"b\"", 1)).unwrap();
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &out]);
    assert!(!ok && log.contains("the training data differs"), "{log}");
    std::fs::write(&train, &original).unwrap();
    // A ledger edited to drop a step (it would under-state ε) is refused.
    let ck0 = std::fs::read_dir(f.out("run").join("private/checkpoints")).unwrap().next().unwrap().unwrap().path();
    let state_path = ck0.join("state.json");
    let state_text = std::fs::read_to_string(&state_path).unwrap();
    let sum_text = std::fs::read_to_string(ck0.join("state.sha256")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&state_text).unwrap();
    let ck0s = ck0.display().to_string();
    let edited = |edit: &dyn Fn(&mut serde_json::Value), with_checksum: bool, want: &str| {
        let mut state = original.clone();
        edit(&mut state);
        if with_checksum {
            rewrite_state(&ck0, &state);
        } else {
            std::fs::write(&state_path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
        }
        let (ok, log) = dptrain(&["--config", &cfg, "--resume", &ck0s]);
        assert!(!ok && log.contains(want), "expected `{want}`: {log}");
        std::fs::write(&state_path, &state_text).unwrap();
        std::fs::write(ck0.join("state.sha256"), &sum_text).unwrap();
    };
    // Any edit of state.json without its checksum: the noise key, the sampler seed or position,
    // the optimiser's step count.
    edited(
        &|s| s["noise_key"][0] = serde_json::json!((s["noise_key"][0].as_u64().unwrap() + 1) % 256),
        false,
        "does not match the checksum",
    );
    edited(
        &|s| s["sampler"]["seed"][3] = serde_json::json!((s["sampler"]["seed"][3].as_u64().unwrap() + 1) % 256),
        false,
        "does not match the checksum",
    );
    edited(&|s| s["sampler"]["word_pos"] = serde_json::json!("0"), false, "does not match the checksum");
    // With the checksum recomputed too (a deliberate edit): the steps must still agree.
    edited(&|s| s["sampler"]["word_pos"] = serde_json::json!("0"), true, "the sampler stream is at word 0");
    edited(&|s| s["optimizer"]["AdamW"]["steps"] = serde_json::json!(1), true, "the optimiser has taken 1 steps");
    // A ledger edited to drop a step (it would under-state ε).
    edited(
        &|s| {
            let count = &mut s["ledger"]["entries"][0]["count"];
            *count = serde_json::json!(count.as_u64().unwrap() - 1);
        },
        true,
        "do not account for its",
    );
    // A flipped byte in the tensor file.
    let ck = std::fs::read_dir(f.out("run").join("private/checkpoints")).unwrap().next().unwrap().unwrap().path();
    let tf = ck.join("tensors.safetensors");
    let mut bytes = std::fs::read(&tf).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&tf, bytes).unwrap();
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &ck.display().to_string()]);
    assert!(!ok && log.contains("does not match the sha256"), "{log}");
}

#[test]
fn resuming_a_finished_run_trains_nothing_and_verify_catches_tampering() {
    let f = Fixture::new("verify");
    let cfg = f.config_with("run", 0, "0.05", "keep-final-checkpoint = true");
    let run = f.out("run");
    let out = run.display().to_string();
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let before = tensors(&run);
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &out]);
    assert!(ok && log.contains("no steps left"), "{log}");
    assert_eq!(tensors(&run), before);
    // A seeded run certifies nothing: verify fails, unless told to accept it (experiments).
    let (ok, log) = dptrain(&["verify", &out]);
    assert!(!ok && log.contains("FAIL  not seeded"), "{log}");
    let verify = |extra: &[&str]| {
        let mut a = vec!["verify", out.as_str(), "--allow-seeded"];
        a.extend_from_slice(extra);
        dptrain(&a)
    };
    let (ok, log) = verify(&[]);
    assert!(ok && log.contains("verified") && log.contains("with the private part"), "{log}");

    // A changed adapter tensor.
    let adapter = run.join("release/adapter_model.safetensors");
    let good = std::fs::read(&adapter).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    std::fs::write(&adapter, &bad).unwrap();
    let (ok, log) = verify(&[]);
    assert!(!ok && log.contains("FAIL  adapter file hash"), "{log}");
    std::fs::write(&adapter, &good).unwrap();

    // A report claiming a smaller ε, and a ledger with a step removed.
    let path = run.join("release/privacy_report.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut r: serde_json::Value = serde_json::from_str(&original).unwrap();
    r["epsilon"] = serde_json::json!(r["epsilon"].as_f64().unwrap() / 2.0);
    std::fs::write(&path, r.to_string()).unwrap();
    let (ok, log) = verify(&[]);
    assert!(!ok && log.contains("FAIL  report `epsilon`"), "{log}");
    // Headline claims changed in the JSON and, consistently, in the markdown: each is re-derived
    // from the certificate and fails.
    let md_path = run.join("release/privacy_report.md");
    let md_good = std::fs::read_to_string(&md_path).unwrap();
    let tamper = |key: &str, edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut r: serde_json::Value = serde_json::from_str(&original).unwrap();
        edit(&mut r);
        std::fs::write(&path, r.to_string()).unwrap();
        std::fs::write(&md_path, dptrain::report::markdown::render(&r)).unwrap();
        let (ok, log) = verify(&[]);
        assert!(!ok && log.contains(want), "{key}: expected `{want}` in {log}");
    };
    tamper(
        "guarantee",
        &|r| r["guarantee"] = serde_json::json!("(0.5, 1e-5)-DP at the level of one record"),
        "FAIL  report `guarantee`",
    );
    tamper("seeded", &|r| r["seeded"] = serde_json::json!(false), "FAIL  report `seeded`");
    tamper("rdp", &|r| r["epsilon_by_accountant"]["rdp"] = serde_json::json!(0.1), "FAIL  report ε by accountant");
    tamper("target", &|r| r["target_epsilon"] = serde_json::json!(0.5), "FAIL  report `target_epsilon`");
    // The certificate's own ledger with another σ than it states.
    tamper(
        "σ",
        &|r| r["certificate"]["ledger"]["entries"][0]["event"]["event"]["sigma"] = serde_json::json!(9.0),
        "FAIL  certificate = report's copy",
    );
    std::fs::write(&md_path, &md_good).unwrap();
    let mut r: serde_json::Value = serde_json::from_str(&original).unwrap();
    let count = &mut r["ledger"]["entries"][0]["count"];
    *count = serde_json::json!(count.as_u64().unwrap() - 1);
    std::fs::write(&path, r.to_string()).unwrap();
    let (ok, log) = verify(&[]);
    assert!(!ok && log.contains("FAIL  ledger = report's"), "{log}");
    std::fs::write(&path, &original).unwrap();
    let (ok, log) = verify(&[]);
    assert!(ok, "{log}");
    // Data identity with the private part: another training file does not match its commitment.
    let other = f.dir.join("other.jsonl");
    let train = std::fs::read_to_string(f.dir.join("train.jsonl")).unwrap();
    std::fs::write(&other, train.replacen("\"a\"", "\"b\"", 1)).unwrap();
    let (ok, log) = verify(&["--train", other.to_str().unwrap()]);
    assert!(!ok && log.contains("FAIL  train file matches its commitment"), "{log}");

    // A markdown report edited by hand (a smaller ε) no longer matches the JSON.
    let md = std::fs::read_to_string(&md_path).unwrap();
    let eps = serde_json::from_str::<serde_json::Value>(&original).unwrap()["epsilon"].to_string();
    assert!(md.contains(&eps), "{md}");
    std::fs::write(&md_path, md.replace(&eps, "0.5")).unwrap();
    let (ok, log) = verify(&[]);
    assert!(!ok && log.contains("FAIL  privacy_report.md is the rendering"), "{log}");
    std::fs::write(&md_path, &md).unwrap();

    // A non-private run verifies as consistent but certifies nothing: exit non-zero.
    let np = f.config("np", 0, "0.05");
    let (ok, log) = dptrain(&["--config", &np, "--non-private"]);
    assert!(ok, "{log}");
    let (ok, log) = dptrain(&["verify", &f.out("np").display().to_string()]);
    assert!(!ok && log.contains("NOT private"), "{log}");
}

#[cfg(unix)]
#[test]
fn sigint_stops_after_the_current_step_with_a_checkpoint_and_resume_completes_the_run() {
    use std::io::BufRead;
    let f = Fixture::new("sigint");
    let long = |out: &str| {
        let cfg = f.config(out, 0, "0.05");
        std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("steps = 9", "steps = 300")).unwrap();
        cfg
    };
    let full = long("full");
    let (ok, log) = dptrain(&["--config", &full]);
    assert!(ok, "{log}");
    let cfg = long("sig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args(["--config", &cfg])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // Status lines come every 10% of the steps: signal once the first one is out.
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("step ") {
            break;
        }
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let log = seen + &rest.join("\n");
    assert!(!status.success(), "{log}");
    assert!(log.contains("interrupted by a signal") && log.contains("--resume"), "{log}");
    assert!(!f.out("sig").join("release/adapter_model.safetensors").exists());
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", &f.out("sig").display().to_string()]);
    assert!(ok, "{log}");
    assert_eq!(tensors(&f.out("sig")), tensors(&f.out("full")));
}

/// The named f64 vectors and the f32 parameters of one checkpoint folder's tensors file.
fn checkpoint_vectors(ck: &Path) -> (Vec<f32>, std::collections::HashMap<String, Vec<f64>>) {
    let bytes = std::fs::read(ck.join("tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut params = Vec::new();
    let mut vectors = std::collections::HashMap::new();
    for (name, t) in st.tensors() {
        if name == "params" {
            params = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        } else {
            vectors.insert(name, t.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect());
        }
    }
    (params, vectors)
}

#[test]
fn an_averaged_run_releases_the_moving_average_of_its_lora_iterates_and_resumes_to_it_bit_for_bit() {
    let f = Fixture::new("ema");
    // 3 probe steps (0.5 epoch of 48 records at L = 8), then 9 LoRA steps; every checkpoint kept.
    let probe = "linear-probe-epochs = 0.5\nlinear-probe-learning-rate = 0.1\nkeep-final-checkpoint = true\n";
    let config = |out: &str, extra: &str| {
        let path = f.config_with(out, 1, "0.05", &format!("{probe}{extra}"));
        let text = std::fs::read_to_string(&path).unwrap().replace("keep-checkpoints = 2", "keep-checkpoints = 20");
        std::fs::write(&path, text).unwrap();
        path
    };
    let plain = config("plain", "");
    let (ok, log) = dptrain(&["--config", &plain]);
    assert!(ok, "{log}");
    let decay = 0.8;
    let averaged = config("avg", &format!("ema-decay = {decay}\n"));
    let (ok, log) = dptrain(&["--config", &averaged]);
    assert!(ok, "{log}");

    // The plain run's iterates, from its checkpoints after the probe (step 3) to the last (12).
    let ck = |run: &str, step: u64| f.out(run).join(format!("private/checkpoints/step-{step:08}"));
    let iterates: Vec<Vec<f32>> = (3..=12).map(|s| checkpoint_vectors(&ck("plain", s)).0).collect();
    // Averaging changes nothing about training: the averaged run's last iterate is the plain one's.
    let (last, vectors) = checkpoint_vectors(&ck("avg", 12));
    assert_eq!(&last, iterates.last().unwrap());
    // Slow twin: the recurrence over the iterates, from the parameters the LoRA phase starts with.
    let mut want: Vec<f64> = iterates[0].iter().map(|&x| x as f64).collect();
    for (k, it) in iterates[1..].iter().enumerate() {
        let b = f64::min(decay, (1 + k) as f64 / (10 + k) as f64);
        for (w, &x) in want.iter_mut().zip(it) {
            *w = b * *w + (1.0 - b) * x as f64;
        }
    }
    let got = &vectors["ema"];
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-9 * w.abs().max(1e-3), "{g} vs {w}");
    }
    // The adapter holds the average (as f32), not the last iterate: compared as sorted values,
    // since the adapter file orders and names tensors its own way.
    let sorted_adapter = |run: &str| {
        let mut v: Vec<f32> = tensors(&f.out(run))
            .iter()
            .flat_map(|(_, b)| b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>())
            .collect();
        v.sort_by(f32::total_cmp);
        v
    };
    let sorted = |v: Vec<f32>| {
        let mut v = v;
        v.sort_by(f32::total_cmp);
        v
    };
    assert!(
        sorted_adapter("avg") == sorted(want.iter().map(|&w| w as f32).collect()),
        "the adapter is not the average"
    );
    assert!(
        sorted_adapter("plain") == sorted(iterates.last().unwrap().clone()),
        "the plain adapter is not the last iterate"
    );
    assert!(sorted_adapter("avg") != sorted_adapter("plain"), "averaging changed nothing");
    let (a, p) = (report(&f.out("avg")), report(&f.out("plain")));
    assert!(
        a["released_parameters"]
            .as_str()
            .unwrap()
            .contains("moving average of the parameters over the 9 LoRA-phase steps"),
        "{a}"
    );
    assert_eq!(p["released_parameters"], "the parameters after the last step");
    assert_eq!(a["epsilon"], p["epsilon"], "averaging is post-processing: the same ε");
    // The private record keeps the last iterate's test metric: the plain run's released one.
    let record = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(f.out(run).join("private/run.json")).unwrap()).unwrap()
    };
    let (ra, rp) = (record("avg"), record("plain"));
    assert_eq!(ra["metrics"]["test_last_iterate"], rp["metrics"]["test"], "{ra}");
    assert!(rp["metrics"]["test_last_iterate"].is_null());
    // The average is checkpointed from the first LoRA step on, and a run stopped at the end of
    // the probe (no average yet) and again inside the LoRA phase resumes to the same adapter.
    assert!(!checkpoint_vectors(&ck("avg", 3)).1.contains_key("ema"));
    assert!(checkpoint_vectors(&ck("avg", 4)).1.contains_key("ema"));
    let out = f.out("avg-parts").display().to_string();
    let (ok, log) = dptrain(&["--config", &averaged, "--out", &out, "--stop-after-step", "3"]);
    assert!(!ok && log.contains("after step 3 of 12"), "{log}");
    let stop: u64 = rand::rng().random_range(4..12);
    let (ok, log) =
        dptrain(&["--config", &averaged, "--out", &out, "--resume", &out, "--stop-after-step", &stop.to_string()]);
    assert!(!ok && log.contains(&format!("after step {stop} of 12")), "{log}");
    let (ok, log) = dptrain(&["--config", &averaged, "--out", &out, "--resume", &out]);
    assert!(ok, "stop at {stop}: {log}");
    assert_eq!(adapter_sha(&f.out("avg-parts")), adapter_sha(&f.out("avg")), "stops at 3 and {stop}");
}
