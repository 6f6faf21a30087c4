//! `dptrain init`: a documented run config whose settings are derived only from public
//! quantities — the number of training records N, the target ε (and δ), the model's architecture
//! and depth, the device and the user's sequence length — never from the records' contents. So
//! a config written by `init` is not tuned on the private data and says so
//! (`hyperparameters-tuned-on-private-data = false`), and the report's ε covers everything done
//! with the data. The rules and the experiments they come from: docs/recipe.md.

use crate::config::DeviceSpec;
use crate::model::Architecture;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `init` is told (all public).
#[derive(Debug, Clone)]
pub struct RecipeInputs {
    pub model: PathBuf,
    pub train: PathBuf,
    pub test: PathBuf,
    pub target_epsilon: f64,
    /// δ; default from N (see `default_delta`).
    pub delta: Option<f64>,
    /// Classification labels as stated by the user; `None`: read from the training file at run
    /// time (the report then says the label set came from the private data).
    pub labels: Option<Vec<String>>,
    pub max_seq_len: usize,
    pub device: DeviceSpec,
    pub run_dir: PathBuf,
}

/// The derived settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub arch: Architecture,
    pub records: usize,
    pub delta: f64,
    pub expected_batch_size: usize,
    pub epochs: f64,
    pub linear_probe_epochs: f64,
    pub learning_rate: f64,
    pub linear_probe_learning_rate: f64,
    pub clip_norm: f64,
    pub lora_layers: Option<Vec<usize>>,
    pub targets: Vec<String>,
}

/// Sampling rate the recipe aims at: L ≈ N / 20, so that 6 epochs are ≈ 120 steps whatever N is
/// (σ then depends on ε and δ only, ≈ 1.1–1.2 at ε = 3, and the noise on the averaged gradient,
/// σC/L, falls as N grows).
pub const TARGET_SAMPLE_RATE: f64 = 0.05;

/// δ from N: the largest power of ten at or below min(1e-5, 0.1 / N) (well below 1/N, as the
/// run requires).
pub fn default_delta(n: usize) -> f64 {
    let cap = (0.1 / n as f64).min(1e-5);
    10f64.powf(cap.log10().floor())
}

/// L: the power of two nearest to q·N (in log scale), within [16, 4096] and at most N.
pub fn expected_batch_size(n: usize) -> usize {
    let ideal = (TARGET_SAMPLE_RATE * n as f64).max(1.0);
    let pow = 2f64.powf(ideal.log2().round()) as usize;
    pow.clamp(16, 4096).min(n)
}

/// Counts the non-blank lines of a JSONL file (its records; their contents are not read).
pub fn count_records(path: &Path) -> std::io::Result<usize> {
    use std::io::BufRead;
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    for line in f.lines() {
        if !line?.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

/// The recipe for `records` training records on the model at `inputs.model` with `layers` layers.
pub fn derive(inputs: &RecipeInputs, arch: Architecture, records: usize, layers: usize) -> Recipe {
    let delta = inputs.delta.unwrap_or_else(|| default_delta(records));
    let on_cpu = inputs.device == DeviceSpec::Cpu;
    match arch {
        Architecture::Bert => Recipe {
            arch,
            records,
            delta,
            expected_batch_size: expected_batch_size(records),
            epochs: 6.0,
            linear_probe_epochs: 2.0,
            learning_rate: 0.02,
            linear_probe_learning_rate: 0.05,
            clip_norm: 2.0,
            // On a CPU the last two layers (the rest is computed once per record); on a GPU all.
            lora_layers: (on_cpu && layers > 2).then(|| vec![layers - 2, layers - 1]),
            targets: vec!["query".into(), "value".into()],
        },
        // configs/smollm2-lm.toml (GPU) and configs/smollm2-lm-cpu.toml (CPU: the last four layers
        // adapted, the rest computed once per record, 3 epochs; docs/recipe.md).
        Architecture::Llama => Recipe {
            arch,
            records,
            delta,
            expected_batch_size: expected_batch_size(records),
            epochs: if on_cpu { 3.0 } else { 5.0 },
            linear_probe_epochs: 0.0,
            learning_rate: 0.005,
            linear_probe_learning_rate: 0.0,
            clip_norm: 1.0,
            lora_layers: (on_cpu && layers > 4).then(|| (layers - 4..layers).collect()),
            targets: vec!["q_proj".into(), "v_proj".into()],
        },
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// The config file text: every derived value with the rule that gave it.
pub fn render(inputs: &RecipeInputs, r: &Recipe) -> String {
    let n = r.records;
    let l = r.expected_batch_size;
    let q = l as f64 / n as f64;
    let steps = (r.epochs * n as f64 / l as f64).round().max(1.0) as u64;
    let probe_steps = if r.linear_probe_epochs > 0.0 {
        (r.linear_probe_epochs * n as f64 / l as f64).round().max(1.0) as u64
    } else {
        0
    };
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "# Written by `dptrain init` ({}). Every setting below comes from public quantities only:",
        crate::report::ENGINE
    );
    let _ = writeln!(
        w,
        "# N = {n} training records (a count, not their contents), target ε = {}, the model's architecture and",
        inputs.target_epsilon
    );
    let _ =
        writeln!(w, "# depth, the device and max-seq-len; the rules and the experiments behind them: docs/recipe.md.");
    let _ = writeln!(w, "# Edit freely; if you then choose settings by looking at results on this data, set");
    let _ = writeln!(w, "# privacy.hyperparameters-tuned-on-private-data = true (or use `dptrain tune`).\n");
    let _ = writeln!(w, "[model]\npath = {}", toml_path(&inputs.model));
    let _ = writeln!(w, "# Inputs are truncated to this many tokens (as given to init).");
    let _ = writeln!(w, "max-seq-len = {}\n", inputs.max_seq_len);
    let _ = writeln!(w, "[data]\ntrain = {}\ntest = {}", toml_path(&inputs.train), toml_path(&inputs.test));
    match (&inputs.labels, r.arch) {
        (Some(labels), _) => {
            let list: Vec<String> = labels.iter().map(|s| toml_str(s)).collect();
            let _ = writeln!(w, "# The label set, stated publicly.\nlabels = [{}]", list.join(", "));
        }
        (None, Architecture::Bert) => {
            let _ = writeln!(
                w,
                "# No labels given: they are read from the training file at run time, and the report says the\n# label set came from the private data. State them here (labels = [\"a\", \"b\"]) if they are public."
            );
        }
        (None, Architecture::Llama) => {}
    }
    let _ = writeln!(w, "\n[lora]\nrank = 8\nalpha = 16");
    let targets: Vec<String> = r.targets.iter().map(|s| toml_str(s)).collect();
    let _ = writeln!(w, "target-modules = [{}]", targets.join(", "));
    if let Some(layers) = &r.lora_layers {
        let list: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        let _ = writeln!(
            w,
            "# CPU: adapters in the last {} layers; the layers below are computed once per record.\nlayers = [{}]",
            layers.len(),
            list.join(", ")
        );
    }
    let _ = writeln!(w, "\n[privacy]\ntarget-epsilon = {:?}", inputs.target_epsilon);
    match inputs.delta {
        Some(d) => {
            let _ = writeln!(w, "delta = {d:?}");
        }
        None => {
            let _ = writeln!(w, "# The largest power of ten at or below min(1e-5, 0.1 / N).\ndelta = {:?}", r.delta);
        }
    }
    let _ = writeln!(w, "# Per-example clipping norm C.\nclip-norm = {:?}", r.clip_norm);
    let _ = writeln!(w, "accountant = \"pld\"");
    let _ = writeln!(w, "# Derived from public quantities only (see the top of this file).");
    let _ = writeln!(w, "hyperparameters-tuned-on-private-data = false\n");
    let _ = writeln!(w, "[training]");
    let _ = writeln!(
        w,
        "# L = the power of two nearest to N / 20 (within 16..4096): q = {l} / {n} = {q:.4}, so the steps below\n# are about 20 per epoch whatever N is.\nexpected-batch-size = {l}"
    );
    let _ = writeln!(
        w,
        "# Examples per forward/backward pass: not set, so the run's memory plan chooses it (at most 32)\n# from the measured step memory; set max-physical-batch to fix it (bit-identical seeded reruns\n# on other machines)."
    );
    if probe_steps > 0 {
        let _ = writeln!(
            w,
            "# A DP linear probe first ({probe_steps} steps): the head alone on the frozen model's pooled features.\nlinear-probe-epochs = {:?}\nlinear-probe-learning-rate = {:?}",
            r.linear_probe_epochs, r.linear_probe_learning_rate
        );
    }
    let _ = writeln!(w, "# {steps} LoRA steps.\nepochs = {:?}", r.epochs);
    let _ = writeln!(
        w,
        "optimizer = \"adamw\"\nlearning-rate = {:?}\nwarmup-steps = 3\nlr-schedule = \"linear\"",
        r.learning_rate
    );
    let _ = writeln!(w, "device = {}\n", toml_str(&inputs.device.name()));
    let _ = writeln!(w, "[output]\ndir = {}", toml_path(&inputs.run_dir));
    o
}

/// Errors of `init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{0} exists: pass --overwrite to replace it")]
    Exists(PathBuf),
}

/// Derives the recipe for `inputs` and writes it to `out` (refused if it exists and not
/// `overwrite`). Returns the recipe and the text written.
pub fn init(inputs: &RecipeInputs, out: &Path, overwrite: bool) -> Result<(Recipe, String), InitError> {
    let arch = Architecture::detect(&inputs.model)?;
    let cfg_path = inputs.model.join("config.json");
    let (layers, targets) = match arch {
        Architecture::Bert => (crate::model::BertConfig::from_file(&cfg_path)?.num_hidden_layers, None),
        Architecture::Llama => {
            // Query and value, wherever the model keeps them (Phi-3: its fused qkv_proj).
            let c = crate::model::LlamaConfig::from_file(&cfg_path)?;
            (c.num_hidden_layers, Some(c.default_lora_targets()))
        }
    };
    let bad = |path: &Path, message: String| InitError::Input { path: path.into(), message };
    for p in [&inputs.train, &inputs.test] {
        if !p.is_file() {
            return Err(bad(p, "no such file".into()));
        }
    }
    let records = count_records(&inputs.train).map_err(|e| bad(&inputs.train, e.to_string()))?;
    if records < 16 {
        return Err(bad(&inputs.train, format!("{records} records: DP training needs far more")));
    }
    if !(inputs.target_epsilon > 0.0 && inputs.target_epsilon.is_finite()) {
        return Err(bad(out, format!("--target-epsilon must be a positive number, got {}", inputs.target_epsilon)));
    }
    if arch == Architecture::Llama && inputs.labels.is_some() {
        return Err(bad(
            &inputs.model,
            "--labels: a Llama-family model trains language modelling, which has no labels".into(),
        ));
    }
    let mut recipe = derive(inputs, arch, records, layers);
    if let Some(t) = targets {
        recipe.targets = t;
    }
    let text = render(inputs, &recipe);
    if out.exists() && !overwrite {
        return Err(InitError::Exists(out.into()));
    }
    std::fs::write(out, &text).map_err(|e| bad(out, e.to_string()))?;
    Ok((recipe, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_and_batch_follow_their_rules() {
        assert_eq!(default_delta(4834), 1e-5);
        assert_eq!(default_delta(26_823), 1e-6); // 0.1 / N = 3.7e-6
        assert_eq!(default_delta(2_000_000), 1e-8); // 5e-8
        assert_eq!(expected_batch_size(4834), 256); // 241.7 → 2^7.9
        assert_eq!(expected_batch_size(26_823), 1024); // 1341 → 2^10.4
        assert_eq!(expected_batch_size(13_198), 512); // 660 → 2^9.37
        assert_eq!(expected_batch_size(100), 16);
        assert_eq!(expected_batch_size(20), 16);
        assert_eq!(expected_batch_size(10_000_000), 4096);
        for n in [16usize, 100, 4834, 26_823, 1_000_000] {
            assert!(default_delta(n) <= 0.1 / n as f64 && expected_batch_size(n) <= n);
        }
    }

    fn inputs(device: DeviceSpec) -> RecipeInputs {
        RecipeInputs {
            model: "m".into(),
            train: "t".into(),
            test: "e".into(),
            target_epsilon: 8.0,
            delta: None,
            labels: None,
            max_seq_len: 64,
            device,
            run_dir: "r".into(),
        }
    }

    #[test]
    fn a_language_model_on_the_cpu_adapts_its_last_four_layers_for_three_epochs() {
        let cpu = derive(&inputs(DeviceSpec::Cpu), Architecture::Llama, 2_300, 30);
        assert_eq!((cpu.epochs, cpu.lora_layers.clone()), (3.0, Some(vec![26, 27, 28, 29])));
        assert_eq!(cpu.expected_batch_size, 128);
        assert!(render(&inputs(DeviceSpec::Cpu), &cpu).contains("adapters in the last 4 layers"));
        let gpu = derive(&inputs(DeviceSpec::Cuda(0)), Architecture::Llama, 2_300, 30);
        assert_eq!((gpu.epochs, gpu.lora_layers), (5.0, None));
        // A model of four layers or fewer: every layer adapted.
        assert_eq!(derive(&inputs(DeviceSpec::Cpu), Architecture::Llama, 2_300, 4).lora_layers, None);
    }
}
