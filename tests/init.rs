//! Claims about `dptrain init`: the config it writes follows the recipe's rules from public
//! quantities (N counted, never read; L, δ, epochs, the linear probe), says it was not tuned on the
//! data, trains end to end as written (probe steps then LoRA steps, within the target ε), and an
//! existing config is never overwritten without --overwrite.

mod common;

use std::path::PathBuf;

#[test]
fn init_writes_the_recipe_which_trains_as_written_and_never_overwrites_silently() {
    let f = common::TinyRunDir::new("init", "recipe");
    let dir = f.dir.clone();
    let cfg = dir.join("run.toml");
    let s = |p: PathBuf| p.display().to_string();
    let args = [
        "init",
        "--model",
        &s(dir.join("model")),
        "--train",
        &s(dir.join("train.jsonl")),
        "--test",
        &s(dir.join("test.jsonl")),
        "--target-epsilon",
        "8",
        "--labels",
        "a,b",
        "--max-seq-len",
        "12",
        "--run-dir",
        &s(dir.join("run")),
        "--out",
        &s(cfg.clone()),
    ];
    let (ok, log) = common::dptrain(&args);
    assert!(ok, "{log}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // 48 records: L = max(16, 2^round(log2(2.4))) = 16; δ = 1e-5 (0.1 / 48 is larger).
    for line in [
        "expected-batch-size = 16",
        "delta = 1e-5",
        "target-epsilon = 8.0",
        "linear-probe-epochs = 2.0",
        "epochs = 6.0",
        "labels = [\"a\", \"b\"]",
        "hyperparameters-tuned-on-private-data = false",
        "max-seq-len = 12",
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` missing:\n{text}");
    }
    // A tiny model of two layers: adapters in every layer (nothing to cache).
    assert!(!text.contains("\nlayers ="), "{text}");
    let (ok, log) = common::dptrain(&args);
    assert!(!ok && log.contains("exists") && log.contains("--overwrite"), "{log}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text, "the existing config is untouched");
    // Trained as written: 6 probe steps (2 · 48 / 16) then 18 LoRA steps, within ε = 8.
    let (ok, log) = common::dptrain(&["--config", &s(cfg.clone())]);
    assert!(ok, "{log}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/release/privacy_report.json")).unwrap()).unwrap();
    assert_eq!((r["steps"].as_u64(), r["linear_probe_steps"].as_u64()), (Some(24), Some(6)));
    assert!(r["epsilon"].as_f64().unwrap() <= 8.0);
    assert_eq!(r["hyperparameters_tuned_on_private_data"], false);
    assert_eq!(r["certified"], true);
    // A missing training file is named.
    let (ok, log) = common::dptrain(&[
        "init",
        "--model",
        &s(dir.join("model")),
        "--train",
        &s(dir.join("missing.jsonl")),
        "--test",
        &s(dir.join("test.jsonl")),
        "--target-epsilon",
        "8",
        "--out",
        &s(dir.join("x.toml")),
    ]);
    assert!(!ok && log.contains("missing.jsonl") && log.contains("no such file"), "{log}");
    drop(f);
}
