//! Claims about the memory plan (issue 22): without `training.max-physical-batch` a run chooses
//! its micro-batch size from the measured step memory, so that under a tight
//! `training.max-memory-gib` it picks a smaller size whose training steps then stay within the
//! budget; a budget too small for one example is refused before any output is written, naming
//! the numbers; a resumed run keeps its checkpoint's micro-batch size; a configured size is used
//! as given.

mod common;

use common::dptrain;
use std::path::{Path, PathBuf};

/// A tiny run folder; `training` adds lines to the config's [training] table.
fn config(f: &common::TinyRunDir, name: &str, training: &str) -> (String, PathBuf) {
    let cfg = f.config(
        &format!("run-{name}"),
        8.0,
        &format!("expected-batch-size = 16\nsteps = 4\nlearning-rate = 0.05\n{training}"),
    );
    (cfg, f.out(&format!("run-{name}")))
}

fn memory_of(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("private/run.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["memory"].clone()
}

fn bytes(m: &serde_json::Value, key: &str) -> f64 {
    m[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {m}"))
}

#[test]
fn a_tight_memory_budget_gets_a_smaller_micro_batch_whose_steps_stay_within_it() {
    let f = common::TinyRunDir::new("memplan", "tight");
    // Plentiful memory: the default cap.
    let (cfg, run) = config(&f, "free", "");
    let (ok, out) = dptrain(&["--config", &cfg]);
    assert!(ok, "{out}");
    assert!(out.contains("memory plan (cpu)") && out.contains("micro-batch"), "{out}");
    let free = memory_of(&run);
    assert_eq!((free["micro_batch"].as_u64(), free["micro_batch_choice"].as_str()), (Some(32), Some("automatic")));
    let (weights, fixed, per, optimizer) = (
        bytes(&free, "base_model_bytes"),
        bytes(&free, "step_fixed_bytes"),
        bytes(&free, "step_per_example_bytes"),
        bytes(&free, "optimizer_bytes"),
    );
    assert!(per > 0.0 && weights > 0.0, "{free}");
    // A budget that the linear fit says holds about 8 examples.
    let budget = weights + (optimizer + fixed + 8.0 * per) / 0.8;
    let (cfg, run) = config(&f, "tight", &format!("max-memory-gib = {}", budget / (1u64 << 30) as f64));
    let (ok, out) = dptrain(&["--config", &cfg]);
    assert!(ok, "{out}");
    let tight = memory_of(&run);
    let b = tight["micro_batch"].as_u64().unwrap();
    assert!((1..32).contains(&b), "micro-batch {b} under a budget for about 8: {tight}");
    let beyond_model = budget - bytes(&tight, "base_model_bytes");
    assert!(bytes(&tight, "planned_steps_bytes") <= 0.8 * beyond_model + 1.0, "{tight}");
    // What the steps really held stays within the budget. Nothing is allowed for the GEMM's
    // per-thread packing buffers: the plan allocates them on every worker thread before it
    // measures (without that, a step could allocate one after the measurements: seen on a 2-core
    // AMD EPYC, steps at 906 KiB against a 590 KiB budget).
    assert!(bytes(&tight, "steps_peak_bytes") <= beyond_model, "{tight} (budget beyond the model {beyond_model})");
    assert!(run.join("release/adapter_model.safetensors").exists());
    assert_eq!(tight["step_measured_at_one_example_only"].as_bool(), Some(false), "{tight}");
    // A budget for about 3 one-example steps: four examples' step might not fit, so it is never
    // tried (on a GPU it could run out of memory before the plan refuses); the plan counts one
    // example's whole step per example, and the steps stay within the budget.
    let one = fixed + per;
    let budget = weights + (optimizer + 3.0 * one) / 0.8;
    let (cfg, run) = config(&f, "four", &format!("max-memory-gib = {}", budget / (1u64 << 30) as f64));
    let (ok, out) = dptrain(&["--config", &cfg]);
    assert!(ok, "{out}");
    let four = memory_of(&run);
    assert_eq!(four["step_measured_at_one_example_only"].as_bool(), Some(true), "{four}");
    assert_eq!(bytes(&four, "step_fixed_bytes"), 0.0, "{four}");
    let b = four["micro_batch"].as_u64().unwrap();
    assert!((1..=3).contains(&b), "micro-batch {b} under a budget for about 3: {four}");
    let beyond_model = budget - bytes(&four, "base_model_bytes");
    assert!(bytes(&four, "steps_peak_bytes") <= beyond_model, "{four} (budget beyond the model {beyond_model})");
}

#[test]
fn a_budget_below_one_example_is_refused_before_any_output_naming_the_numbers() {
    let f = common::TinyRunDir::new("memplan", "refused");
    let (cfg, run) = config(&f, "tiny", "max-memory-gib = 1e-9");
    let (ok, out) = dptrain(&["--config", &cfg]);
    assert!(!ok);
    assert!(out.contains("not enough memory") && out.contains("one example of 12 tokens"), "{out}");
    let files = |d: &str| std::fs::read_dir(run.join(d)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((files("release"), run.join("private/run.json").exists()), (0, false), "{out}");
    // A configured micro-batch is used as given (with a warning), not refused.
    let (cfg, run) = config(&f, "configured", "max-memory-gib = 1e-9\nmax-physical-batch = 3");
    let (ok, out) = dptrain(&["--config", &cfg]);
    assert!(ok, "{out}");
    assert!(out.contains("warning: micro-batches of 3"), "{out}");
    let m = memory_of(&run);
    assert_eq!((m["micro_batch"].as_u64(), m["micro_batch_choice"].as_str()), (Some(3), Some("configured")));
}

#[test]
fn a_resumed_run_keeps_its_checkpoints_micro_batch() {
    let f = common::TinyRunDir::new("memplan", "resume");
    let (cfg, run) = config(&f, "resume", "checkpoint-every = 2");
    let (ok, out) = dptrain(&["--config", &cfg, "--stop-after-step", "2"]);
    assert!(!ok, "{out}");
    let (ok, out) = dptrain(&["--config", &cfg, "--resume", run.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("kept from the checkpoint being resumed"), "{out}");
    let m = memory_of(&run);
    assert_eq!((m["micro_batch"].as_u64(), m["micro_batch_choice"].as_str()), (Some(32), Some("resumed")));
}
