//! Claims about what a run releases (issue 17): the `release/` folder holds nothing outside ε's
//! cover but what the report's not-protected list names — no hash of an input file, no seed, no
//! noise or commitment key, no training record — for a BERT and a Llama run; the private part is
//! owner-only and loses its checkpoints after a finished run; a seeded run certifies nothing and
//! fails `verify`, an unseeded one passes, and a certificate whose ledger disagrees with its q or σ
//! fails; an RDP run whose PLD cross-check cannot be computed still writes its outputs; and PEFT
//! wraps exactly the trained modules.

mod common;

use common::dptrain;
use sha2::Digest;
use std::path::{Path, PathBuf};

struct Fixture {
    dir: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Bert,
    Llama,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("dptrain-release-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        common::write_tiny_model_dir(&dir.join("bert"), 4);
        common::write_tiny_classification_data(&dir);
        common::write_tiny_llama_dir(&dir.join("llama"), 11);
        let words = common::tiny_words();
        let lm: Vec<String> = (0..60)
            .map(|i| {
                let t: Vec<&str> = (0..4 + i % 5).map(|j| words[(i * 5 + j * 3) % words.len()].as_str()).collect();
                serde_json::json!({"text": t.join(" ")}).to_string()
            })
            .collect();
        std::fs::write(dir.join("lm-train.jsonl"), lm[..48].join("\n") + "\n").unwrap();
        std::fs::write(dir.join("lm-test.jsonl"), lm[48..].join("\n") + "\n").unwrap();
        Fixture { dir }
    }

    /// A 4-step DP run of `family` into `out`; `privacy` and `training` are extra lines.
    fn config(&self, family: Family, out: &str, privacy: &str, training: &str) -> String {
        let d = self.dir.display();
        let (model, train, test, len) = match family {
            Family::Bert => ("bert", "train.jsonl", "test.jsonl", 12),
            Family::Llama => ("llama", "lm-train.jsonl", "lm-test.jsonl", 10),
        };
        let privacy = if privacy.contains("noise-multiplier") {
            privacy.to_string()
        } else {
            format!("target-epsilon = 6.0\n{privacy}")
        };
        let text = format!(
            "[model]\npath = \"{d}/{model}\"\nmax-seq-len = {len}\n\n[data]\ntrain = \"{d}/{train}\"\ntest = \"{d}/{test}\"\n\n\
             [lora]\nrank = 2\nalpha = 4\n\n[privacy]\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n{privacy}\n\n\
             [training]\nexpected-batch-size = 8\nmax-physical-batch = 3\nsteps = 4\nlearning-rate = 0.05\n{training}\n\n\
             [output]\ndir = \"{d}/{out}\"\n"
        );
        let path = self.dir.join(format!("{out}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir`, as (path relative to `dir`, bytes).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The secrets and data-derived identifiers a release must never hold, for a run of `config`.
fn forbidden(f: &Fixture, config: &str, family: Family, run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let cfg_text = std::fs::read_to_string(config).unwrap();
    let (model, train, test) = match family {
        Family::Bert => ("bert", "train.jsonl", "test.jsonl"),
        Family::Llama => ("llama", "lm-train.jsonl", "lm-test.jsonl"),
    };
    let mut inputs = vec![PathBuf::from(config), f.path(train), f.path(test)];
    for e in std::fs::read_dir(f.path(model)).unwrap() {
        inputs.push(e.unwrap().path());
    }
    for p in inputs {
        let h = sha256_hex(&std::fs::read(&p).unwrap());
        out.push((format!("sha256 of {}", p.display()), h.clone().into_bytes()));
        out.push((format!("sha256 of {} (upper case)", p.display()), h.to_uppercase().into_bytes()));
    }
    for line in std::fs::read_to_string(f.path(train)).unwrap().lines() {
        let text = json_line(line)["text"].as_str().unwrap().to_string();
        out.push((format!("training record {text:?}"), text.into_bytes()));
    }
    // The final checkpoint (kept for this test) holds the noise key; the run record the
    // commitment key and the seed.
    let ck = std::fs::read_dir(run.join("private/checkpoints")).unwrap().next().unwrap().unwrap().path();
    let state = json(&ck.join("state.json"));
    let key: Vec<u8> = state["noise_key"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    out.push(("noise key (hex)".into(), key_hex.into_bytes()));
    out.push(("noise key (bytes)".into(), key.clone()));
    let key_json = serde_json::to_string(&state["noise_key"]).unwrap();
    out.push(("noise key (JSON)".into(), key_json.as_bytes()[..key_json.len() / 2].to_vec()));
    let record = json(&run.join("private/run.json"));
    out.push(("commitment key".into(), record["commitment_key"].as_str().unwrap().as_bytes().to_vec()));
    out.push(("sampler seed (JSON)".into(), {
        let s = serde_json::to_string(&state["sampler"]["seed"]).unwrap();
        s.as_bytes()[..s.len() / 2].to_vec()
    }));
    if let Some(seed) = cfg_text.lines().find_map(|l| l.strip_prefix("seed = ")) {
        out.push(("the seed".into(), seed.trim().as_bytes().to_vec()));
    }
    out
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

#[test]
fn no_released_file_holds_an_input_hash_the_seed_a_key_or_a_training_record() {
    let f = Fixture::new("scan");
    for family in [Family::Bert, Family::Llama] {
        for (name, training) in [("unseeded", ""), ("seeded", "seed = 8675309123")] {
            let out = format!("{name}-{}", family as u8);
            let cfg = f.config(family, &out, "", &format!("{training}\nkeep-final-checkpoint = true"));
            let (ok, log) = dptrain(&["--config", &cfg]);
            assert!(ok, "{log}");
            let run = f.path(&out);
            let released = files(&run.join("release"));
            assert!(released.iter().any(|(n, _)| n == "adapter_model.safetensors"), "{released:?}");
            // The report lists exactly the files released (no group plot without groups).
            let report = json(&run.join("release/privacy_report.json"));
            let mut listed: Vec<&str> =
                report["release_files"].as_array().unwrap().iter().map(|x| x["file"].as_str().unwrap()).collect();
            listed.sort();
            assert_eq!(listed, released.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
            for (what, needle) in forbidden(&f, &cfg, family, &run) {
                for (file, bytes) in &released {
                    assert!(!contains(bytes, &needle), "{name} {}: release/{file} holds the {what}", family as u8);
                }
            }
            // The same secrets are where they belong: the private part.
            let record = json(&run.join("private/run.json"));
            assert_eq!(record["inputs"]["train"]["sha256"].as_str().unwrap().len(), 64);
            assert_eq!(record["seed"].is_null(), training.is_empty());
        }
    }
}

#[test]
fn every_released_file_is_covered_by_epsilon_or_named_in_the_not_protected_list() {
    let f = Fixture::new("cover");
    // Groups in the held-out file, so the group plot is released too.
    let test = f.path("test.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&test)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v = json_line(l);
            v["group"] = serde_json::json!(if i % 2 == 0 { "x" } else { "y" });
            v.to_string()
        })
        .collect();
    std::fs::write(&test, lines.join("\n") + "\n").unwrap();
    let cfg = f.config(Family::Bert, "run", "", "");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let run = f.path("run");
    let report = json(&run.join("release/privacy_report.json"));
    let listed: Vec<(String, bool)> = report["release_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["file"].as_str().unwrap().to_string(), x["covered_by_epsilon"].as_bool().unwrap()))
        .collect();
    let on_disk: Vec<String> = files(&run.join("release")).into_iter().map(|(n, _)| n).collect();
    let mut names: Vec<String> = listed.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(on_disk, names, "the report lists exactly the files released");
    let not_protected: Vec<&str> =
        report["not_protected"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    for (file, covered) in &listed {
        let named = not_protected.iter().any(|e| e.contains(file.as_str()))
            || ((file == "privacy_report.json" || file == "privacy_report.md") && !not_protected.is_empty());
        assert!(*covered || named, "release/{file} is neither covered by ε nor named as not protected");
    }
    // Each kind of private output is named as kept private, and is in the private part only.
    let private = not_protected.iter().find(|e| e.starts_with("not released")).expect("the private list");
    for (item, file) in [
        ("metrics.jsonl", "metrics.jsonl"),
        ("the loss and clip plots", "plots/loss.svg"),
        ("realised batch sizes", "metrics.jsonl"),
        ("the seed", "run.json"),
        ("the commitment key", "run.json"),
        ("the --reference run's metrics", "run.json"),
        ("training time and examples/s", "run.json"),
    ] {
        assert!(private.contains(item), "`{item}` not named in {private}");
        assert!(run.join("private").join(file).is_file(), "private/{file}");
        assert!(!run.join("release").join(file).exists(), "release/{file}");
    }
    assert!(report["metrics"]["train_seconds"].is_null() && report["metrics"]["examples_per_second"].is_null());
    assert!(not_protected.iter().any(|e| e.contains("side channels") && e.contains("error messages")));
    assert!(!not_protected.iter().any(|e| e.contains("gradient norms")), "no gradient norms are output");
    // The tuning statement is quoted as the config gives it.
    assert!(not_protected.iter().any(|e| e.contains("privacy.hyperparameters-tuned-on-private-data = false")));
}

#[test]
fn private_part_is_owner_only_and_checkpoints_are_gone_after_a_finished_run() {
    let f = Fixture::new("private");
    let cfg = f.config(Family::Bert, "run", "", "checkpoint-every = 1");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let run = f.path("run");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(run.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("private"), 0o700, "private/ is owner-only");
        // Its files too, so a copy of the folder stays owner-only.
        for f in ["private/run.json", "private/metrics.jsonl", "private/plots/loss.svg", "private/lock"] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
    }
    assert!(!run.join("private/checkpoints").exists(), "checkpoints left after a finished run");
    assert!(log.contains("private part (never publish"), "{log}");
    let cfg = f.config(Family::Bert, "kept", "", "checkpoint-every = 1\nkeep-final-checkpoint = true");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let kept: Vec<_> = std::fs::read_dir(f.path("kept/private/checkpoints")).unwrap().collect();
    assert_eq!(kept.len(), 2, "keep-checkpoints = 2 (default) when the config keeps them");
}

/// Rewrites the certificate in the adapter file and the report consistently (hash included), as
/// someone would who edits a release by hand.
fn rewrite_certificate(release: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = release.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    let mut cert: serde_json::Value = serde_json::from_str(&meta["dptrain_certificate"]).unwrap();
    edit(&mut cert);
    meta.insert("dptrain_certificate".into(), cert.to_string());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let new = safetensors::serialize(tensors, Some(meta)).unwrap();
    std::fs::write(&path, &new).unwrap();
    let mut report = json(&release.join("privacy_report.json"));
    report["certificate"] = cert.clone();
    report["ledger"] = cert["ledger"].clone();
    report["adapter_sha256"] = serde_json::json!(sha256_hex(&new));
    std::fs::write(release.join("privacy_report.json"), report.to_string()).unwrap();
    std::fs::write(release.join("privacy_report.md"), dptrain::report::markdown::render(&report)).unwrap();
}

#[test]
fn an_unseeded_run_verifies_a_seeded_one_does_not_and_a_ledger_with_another_q_or_sigma_fails() {
    let f = Fixture::new("verify");
    let cfg = f.config(Family::Bert, "run", "", "");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let run = f.path("run").display().to_string();
    let (ok, log) = dptrain(&["verify", &run]);
    assert!(ok && log.contains("with the private part"), "{log}");
    assert!(log.contains("ok    train file matches its commitment"), "{log}");
    // The release alone (what an auditor receives) verifies without the private part.
    let copy = f.path("published");
    std::fs::create_dir_all(&copy).unwrap();
    for (name, bytes) in files(&f.path("run/release")) {
        let p = copy.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let (ok, log) = dptrain(&["verify", copy.to_str().unwrap()]);
    assert!(ok && log.contains("release only: data identity not checked"), "{log}");
    // A ledger whose steps have another q or σ than the certificate states, rewritten everywhere.
    for (what, edit) in [
        (
            "q",
            Box::new(|c: &mut serde_json::Value| {
                let q = c["ledger"]["entries"][0]["event"]["q"].as_f64().unwrap();
                c["ledger"]["entries"][0]["event"]["q"] = serde_json::json!(q / 2.0);
            }) as Box<dyn Fn(&mut serde_json::Value)>,
        ),
        (
            "σ",
            Box::new(|c: &mut serde_json::Value| {
                let s = c["ledger"]["entries"][0]["event"]["event"]["sigma"].as_f64().unwrap();
                c["ledger"]["entries"][0]["event"]["event"]["sigma"] = serde_json::json!(s * 2.0);
            }),
        ),
        ("q = L/N", Box::new(|c: &mut serde_json::Value| c["expected_batch_size"] = serde_json::json!(4))),
    ] {
        let tampered = f.path(&format!("tampered-{}", what.len()));
        let _ = std::fs::remove_dir_all(&tampered);
        std::fs::create_dir_all(&tampered).unwrap();
        for (name, bytes) in files(&copy) {
            let p = tampered.join(&name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        rewrite_certificate(&tampered, edit);
        let (ok, log) = dptrain(&["verify", tampered.to_str().unwrap()]);
        assert!(!ok, "{what}: {log}");
        assert!(log.contains("ok    adapter file hash"), "{what}: the rewrite is self-consistent: {log}");
        assert!(
            log.contains("FAIL  every ledger step has the certificate's q and σ") || log.contains("FAIL  q = L / N"),
            "{what}: {log}"
        );
    }
    // A seeded run certifies nothing: its guarantee says so and verify fails.
    let cfg = f.config(Family::Bert, "seeded", "", "seed = 3");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok && log.contains("SEEDED"), "{log}");
    let report = json(&f.path("seeded/release/privacy_report.json"));
    assert!(report["guarantee"].as_str().unwrap().starts_with("NONE: a seeded run"));
    assert_eq!(report["certified"], false);
    let md = std::fs::read_to_string(f.path("seeded/release/privacy_report.md")).unwrap();
    assert!(md.contains("**NO PRIVACY GUARANTEE.**"), "{md}");
    let (ok, log) = dptrain(&["verify", f.path("seeded").to_str().unwrap()]);
    assert!(!ok && log.contains("FAIL  not seeded"), "{log}");
}

#[test]
fn an_rdp_run_at_a_tiny_sigma_writes_its_outputs_and_says_the_pld_cross_check_is_unavailable() {
    let f = Fixture::new("rdp");
    // q = 1 (expected batch = N = 48), σ = 0.01: RDP gives a (huge) finite ε, the PLD grid cannot.
    let cfg = f.config(Family::Bert, "run", "noise-multiplier = 0.01\naccountant = \"rdp\"", "");
    common::replace_in(&cfg, "expected-batch-size = 8", "expected-batch-size = 48");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let report = json(&f.path("run/release/privacy_report.json"));
    assert_eq!(report["sample_rate"], 1.0);
    assert!(report["epsilon"].as_f64().unwrap().is_finite());
    let pld = &report["epsilon_by_accountant"]["pld"];
    assert!(pld["unavailable"].as_str().is_some_and(|r| !r.is_empty()), "{pld}");
    let md = std::fs::read_to_string(f.path("run/release/privacy_report.md")).unwrap();
    assert!(md.contains("| ε by PLD (upper bound) | unavailable ("), "{md}");
    let (ok, log) = dptrain(&["verify", f.path("run").to_str().unwrap()]);
    assert!(ok && log.contains("ok    cross-check ε (pld)"), "{log}");
}

#[test]
fn peft_target_names_select_exactly_the_trained_modules() {
    let f = Fixture::new("peft");
    let cfg = f.config(Family::Bert, "run", "", "");
    common::replace_in(&cfg, "alpha = 4\n", "alpha = 4\ntarget-modules = [\"output.dense\"]\nlayers = [1]\n");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(ok, "{log}");
    let adapter_cfg = json(&f.path("run/release/adapter_config.json"));
    let targets: Vec<String> =
        adapter_cfg["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    // PEFT's rule for a list: a module is wrapped when its name equals a target or ends with
    // "." + target. Apply it to every linear module of the base model.
    let weights = candle_core::safetensors::load(f.path("bert/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let modules: Vec<String> = weights
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .filter(|m| m.contains("dense") || m.ends_with("query") || m.ends_with("key") || m.ends_with("value"))
        .map(String::from)
        .collect();
    assert!(modules.iter().any(|m| m.ends_with("attention.output.dense")), "{modules:?}");
    let mut wrapped: Vec<&String> =
        modules.iter().filter(|m| targets.iter().any(|t| *m == t || m.ends_with(&format!(".{t}")))).collect();
    wrapped.sort();
    let bytes = std::fs::read(f.path("run/release/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut trained: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight").map(String::from))
        .collect();
    trained.sort();
    assert_eq!(trained, ["encoder.layer.1.output.dense"]);
    assert_eq!(wrapped, trained.iter().collect::<Vec<_>>(), "PEFT would wrap {wrapped:?}");
    // The short name would have wrapped attention.output.dense as well.
    assert!(modules.iter().filter(|m| m.ends_with(".output.dense")).count() > 2);
}
