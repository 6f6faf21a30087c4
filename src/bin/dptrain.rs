//! The `dptrain` command line. `anyhow` lives only here; errors print their whole chain and the
//! process exits non-zero.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dptrain::accounting::{AccountantKind, DpEvent, PldAccountant, RdpAccountant};
use dptrain::config::DeviceSpec;
use dptrain::train::{run, RunOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dptrain", version, about = "Differentially private LoRA fine-tuning (DP-SGD)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Run config (TOML); see configs/quickstart.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Train without clipping or noise: a utility reference that certifies nothing.
    #[arg(long)]
    non_private: bool,
    /// Replace the outputs of an earlier run in the output folder.
    #[arg(long)]
    overwrite: bool,
    /// Write the outputs here instead of the config's output.dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute on this device instead of the config's training.device: cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Continue an interrupted run: its output folder (newest checkpoint) or a checkpoint folder.
    /// The config, base model and data must be the ones the checkpoint was made with.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop as if interrupted after N steps, writing a checkpoint (to try out --resume).
    #[arg(long)]
    stop_after_step: Option<u64>,
    /// Report the held-out metrics of this non-private run (`--non-private --out DIR` with the
    /// same config, model and data) beside this run's, labelled as not private.
    #[arg(long)]
    reference: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DP LoRA adapter (same as `dptrain --config FILE`).
    Train(TrainArgs),
    /// Write a documented run config from public quantities only (N, ε, δ, the model, the device,
    /// the sequence length): the training recipe of docs/recipe.md, not tuned on your data.
    Init {
        /// Model folder (Hugging Face layout).
        #[arg(long)]
        model: PathBuf,
        /// Training JSONL (only its records are counted).
        #[arg(long)]
        train: PathBuf,
        /// Held-out JSONL (not read).
        #[arg(long)]
        test: PathBuf,
        #[arg(long)]
        target_epsilon: f64,
        /// δ (default: the largest power of ten at or below min(1e-5, 0.1/N)).
        #[arg(long)]
        delta: Option<f64>,
        /// Classification labels, comma-separated, stated publicly (default: read from the training
        /// file at run time; the report then says so).
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Inputs are truncated to this many tokens.
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
        /// cpu, cuda or cuda:N: the device the config will train on.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The run folder the config names.
        #[arg(long, default_value = "runs/init")]
        run_dir: PathBuf,
        /// Where to write the config.
        #[arg(long, default_value = "dptrain.toml")]
        out: PathBuf,
        /// Replace an existing config file.
        #[arg(long)]
        overwrite: bool,
    },
    /// Private hyper-parameter search (the config's [tune] table): a random number of DP training
    /// trials, each scored by a noisy validation accuracy, the best released with one certificate
    /// whose ε covers the whole search (Papernot & Steinke 2022).
    Tune {
        /// Run config with a [tune] table.
        #[arg(long)]
        config: PathBuf,
        /// Write the outputs here instead of the config's output.dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an earlier search's outputs in the folder.
        #[arg(long)]
        overwrite: bool,
        /// Print the calibrated search (candidates, σ of each, ε) and stop before any trial.
        #[arg(long)]
        dry_run: bool,
        /// Continue the interrupted search in the output folder: the same number of trials and
        /// draws (fixed when it started), finished trials kept, an interrupted trial continued
        /// from its checkpoint.
        #[arg(long, conflicts_with_all = ["overwrite", "dry_run"])]
        resume: bool,
        /// Stop as if interrupted once N trials have finished (to try out --resume).
        #[arg(long, value_name = "N")]
        stop_after_trial: Option<u64>,
        /// With --stop-after-trial N: stop inside trial N + 1 after this step instead (checkpoint written).
        #[arg(long, value_name = "S", requires = "stop_after_trial")]
        stop_after_step: Option<u64>,
    },
    /// ε of DP-SGD for a sampling rate, noise multiplier, step count and δ.
    Epsilon {
        #[arg(long)]
        sample_rate: f64,
        #[arg(long)]
        noise_multiplier: f64,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        delta: f64,
        /// pld (default: tight upper bound) or rdp.
        #[arg(long, default_value = "pld")]
        accountant: String,
        #[arg(long)]
        json: bool,
    },
    /// Check every DP kernel on a device against its CPU twin, then a few seeded DP-SGD steps on
    /// the device against the CPU. Exits non-zero if any check fails.
    Selftest {
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also write the checks as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Time DP-LoRA against non-private LoRA steps on one device, model and batch.
    Bench {
        /// A run config: bench its model, LoRA settings, dtype and device on its first training
        /// records (batch default: its training.max-physical-batch).
        #[arg(long)]
        config: Option<PathBuf>,
        /// cpu, cuda or cuda:N (default: the config's training.device, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// A model folder with real weights; otherwise --shape with random weights.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Built-in model shape: tiny, minilm-l6, bert-base, llama-tiny, smollm2-135m, llama-3.2-1b,
        /// llama-3.1-8b, gemma-3-1b, gemma-2-2b.
        #[arg(long, default_value = "minilm-l6")]
        shape: String,
        /// dtype of the frozen base weights: f32, bf16, f16 (default: the config's, else f32 on
        /// cpu, bf16 on cuda).
        #[arg(long)]
        dtype: Option<String>,
        /// Llama family: frozen linear weights kept quantized, q8_0 or q4_k (default: the
        /// config's model.quantize, else none).
        #[arg(long)]
        quantize: Option<String>,
        /// Llama family: embedding and LM head kept quantized, q8_0 or q4_k (default: the
        /// config's model.quantize-vocab, else none).
        #[arg(long)]
        quantize_vocab: Option<String>,
        /// Examples per step (default 32, or the config's training.max-physical-batch).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per random record (ignored with --config, whose records are real).
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Extra steps per variant, with phase marks, for the time split (0: no split).
        #[arg(long, default_value_t = 3)]
        profile_steps: usize,
        #[arg(long, default_value_t = 8)]
        lora_rank: usize,
        /// Comma-separated LoRA target modules (default: query,value for BERT, q_proj,v_proj for Llama).
        #[arg(long, default_value = "")]
        targets: String,
        /// Comma-separated variants: non-private, dp, dp-candle-ops.
        #[arg(long, default_value = "non-private,dp,dp-candle-ops")]
        variants: String,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Convert a Llama-architecture GGUF file into a Hugging Face folder (f32 model.safetensors,
    /// config.json, tokenizer.json).
    Convert {
        /// The GGUF file (general.architecture = llama, byte-level BPE tokenizer).
        #[arg(long)]
        gguf: PathBuf,
        /// The output folder; refused when it exists and is not empty, unless --overwrite.
        #[arg(long)]
        out: PathBuf,
        /// Replace a non-empty output folder.
        #[arg(long)]
        overwrite: bool,
        /// Keep the decoder layers' quantized linear weights as the GGUF's own blocks (in
        /// model.quantized.gguf) instead of dequantizing them to f32: training then runs on exactly
        /// those blocks (model.quantize must stay unset).
        #[arg(long)]
        keep_quantized: bool,
    },
    /// Held-out accuracy (classification) or perplexity (language model) of a base model or base +
    /// adapter on a JSONL file, with a few greedy continuations for a language model.
    Eval {
        /// The base model folder.
        #[arg(long)]
        model: PathBuf,
        /// A run folder written by dptrain, or its release/ folder (required for classification).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL in the training format of the model's task.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// A prompt to continue (repeatable); default: the first tokens of the first records.
        #[arg(long)]
        prompt: Vec<String>,
        /// Continuations to show when no --prompt is given.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        #[arg(long, default_value_t = 24)]
        max_new_tokens: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// dtype of the frozen base weights: f32, bf16, f16 (default: f32 on cpu, bf16 on cuda).
        #[arg(long)]
        dtype: Option<String>,
        /// Llama family: the frozen linear weights quantized as in training (`model.quantize`):
        /// q8_0 or q4_k. An adapter trained on a quantized base is evaluated on the same one.
        #[arg(long)]
        quantize: Option<String>,
        /// Llama family: the embedding and LM head quantized as in training
        /// (`model.quantize-vocab`): q8_0 or q4_k.
        #[arg(long)]
        quantize_vocab: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a run's outputs: the adapter's hash, the certificate against the report, every headline
    /// claim re-derived, ε recomputed from the ledger, and (with the private part) the data identity.
    Verify {
        /// The run folder (or its release/ folder).
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// The run's private part, to check the data identity (default: private/ beside release/).
        #[arg(long)]
        private: Option<PathBuf>,
        /// The training file to check against the commitment (default: the path in the private part).
        #[arg(long)]
        train: Option<PathBuf>,
        /// The held-out file to check against the commitment (default: the path in the private part).
        #[arg(long)]
        test: Option<PathBuf>,
        /// Accept a seeded run with a warning instead of failing (experiments only).
        #[arg(long)]
        allow_seeded: bool,
    },
    /// Empirical privacy audit: an ε lower bound (one-run method of Steinke, Nasr and Jagielski)
    /// beside the certified ε. `--mode white-box` (default) trains the config with gradient
    /// canaries in its steps, `black-box` with canary records in its data; `mechanism` audits
    /// its DP-SGD mechanism alone (sampler, clipping, noise; no model, seconds).
    Audit {
        #[arg(long)]
        config: PathBuf,
        /// Number of canaries, each inserted with probability ½.
        #[arg(long, default_value_t = 4000)]
        canaries: usize,
        /// white-box, black-box or mechanism.
        #[arg(long, default_value = "white-box")]
        mode: String,
        /// Audit the same config without clipping or noise, as a non-private run would be.
        #[arg(long)]
        non_private: bool,
        /// Confidence of the lower bound.
        #[arg(long, default_value_t = 0.95)]
        confidence: f64,
        #[arg(long)]
        json: bool,
        /// Write audit_report.json and audit_report.md into this folder (and, for the training
        /// modes, the audited run and the canaries); without it the audited run is removed.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an audit report already in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// The smallest noise multiplier whose ε stays within a target.
    Calibrate {
        #[arg(long)]
        target_epsilon: f64,
        #[arg(long)]
        delta: f64,
        #[arg(long)]
        sample_rate: f64,
        #[arg(long)]
        steps: u64,
        /// pld (default: tight upper bound) or rdp.
        #[arg(long, default_value = "pld")]
        accountant: String,
        #[arg(long)]
        json: bool,
    },
}

fn accountant(name: &str) -> Result<AccountantKind> {
    AccountantKind::parse(name).map_err(anyhow::Error::msg).context("--accountant")
}

fn epsilon_command(q: f64, sigma: f64, steps: u64, delta: f64, kind: AccountantKind, json: bool) -> Result<()> {
    let event = DpEvent::dp_sgd(q, sigma, steps);
    let rdp = RdpAccountant::default().epsilon(&event, delta)?;
    if rdp.order_at_grid_edge && kind == AccountantKind::Rdp {
        eprintln!("warning: the optimal RDP order {} is at the edge of the grid; ε may be loose", rdp.optimal_order);
    }
    let mut out = serde_json::json!({"accountant": kind.name(), "delta": delta, "sample_rate": q,
        "noise_multiplier": sigma, "steps": steps, "epsilon_kind": "upper bound"});
    match kind {
        AccountantKind::Pld => {
            let p = PldAccountant::default().epsilon(&event, delta)?;
            out["epsilon"] = json_f64(p.epsilon);
            out["epsilon_remove"] = json_f64(p.epsilon_remove);
            out["epsilon_add"] = json_f64(p.epsilon_add);
            out["discretization"] = json_f64(p.discretization);
            out["epsilon_rdp"] = json_f64(rdp.epsilon);
        }
        AccountantKind::Rdp => {
            out["epsilon"] = json_f64(rdp.epsilon);
            out["rdp_optimal_order"] = json_f64(rdp.optimal_order);
        }
    }
    if json {
        println!("{out}");
    } else {
        println!("ε = {} ({}, δ = {delta}; upper bound)", out["epsilon"], kind.name());
    }
    Ok(())
}

/// JSON number, or the string "inf" for ε = ∞ (no privacy), which JSON cannot hold.
fn json_f64(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or_else(|| serde_json::Value::String(format!("{x}")), serde_json::Value::Number)
}

fn train(args: &TrainArgs) -> Result<()> {
    let Some(path) = &args.config else {
        bail!("no config given: use `dptrain --config FILE` (see configs/quickstart.toml)")
    };
    let mut plan = dptrain::config::load(path)?;
    if let Some(out) = &args.out {
        plan.output_dir = out.clone();
    }
    if let Some(d) = &args.device {
        plan.device = DeviceSpec::parse(d).map_err(anyhow::Error::msg).context("--device")?;
    }
    let progress = std::io::stderr().is_terminal();
    let opts = RunOptions {
        non_private: args.non_private,
        overwrite: args.overwrite,
        progress,
        log_lines: !progress,
        resume: args.resume.clone(),
        stop_after: args.stop_after_step,
        reference: args.reference.clone(),
        gradient_canaries: None,
        streams_key: None,
    };
    // Ctrl-C / SIGTERM: finish the step, checkpoint, exit non-zero with how to resume.
    dptrain::train::interrupt::install();
    let outcome = run(&plan, &opts).with_context(|| format!("run of {}", path.display()))?;
    let s = &outcome.summary;
    let metric = metric_text(&s.test_metric);
    let before = s.base_test_metric.map(|m| format!(" (base model: {})", metric_text(&m))).unwrap_or_default();
    match s.epsilon {
        Some(e) => println!(
            "trained {} steps: ε ≤ {} (δ = {:e}, {} accountant), σ = {:.4}, {metric}{before}; outputs in {}",
            s.steps,
            dptrain::report::round_up(e, 4),
            s.delta,
            plan.accountant.name(),
            s.noise_multiplier,
            plan.output_dir.display()
        ),
        None => println!(
            "trained {} steps WITHOUT privacy (non-private reference), {metric}{before}; outputs in {}",
            s.steps,
            plan.output_dir.display()
        ),
    }
    if let Some(r) = &s.reference {
        println!("non-private reference (NO privacy, {}): {}", r.dir, metric_text(&r.test_metric));
    }
    let release = plan.output_dir.join(dptrain::report::rundir::RELEASE);
    println!("release (publishable as a whole): {}", release.display());
    println!("report for auditors: {}", release.join("privacy_report.md").display());
    println!(
        "private part (never publish; seed, keys, per-step metrics): {}",
        plan.output_dir.join(dptrain::report::rundir::PRIVATE).display()
    );
    if s.seeded {
        println!("note: this run was SEEDED: it certifies nothing (its guarantee and certificate say so)");
    }
    Ok(())
}

fn metric_text(m: &dptrain::model::EvalResult) -> String {
    match m {
        dptrain::model::EvalResult::Accuracy(a) => format!("test accuracy {a:.4}"),
        dptrain::model::EvalResult::Perplexity { perplexity, tokens, .. } => {
            format!("test perplexity {perplexity:.3} over {tokens} tokens")
        }
    }
}

/// A `--quantize`-style flag's format, if given.
fn parse_quant(flag: &Option<String>, name: &str) -> Result<Option<dptrain::model::quant::QuantFormat>> {
    flag.as_deref()
        .map(dptrain::model::quant::QuantFormat::parse)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context(name.to_string())
}

fn eval(cmd: &Command) -> Result<()> {
    let Command::Eval {
        model,
        adapter,
        data,
        max_seq_len,
        batch,
        prompt,
        samples,
        max_new_tokens,
        device,
        dtype,
        quantize,
        quantize_vocab,
        json,
    } = cmd
    else {
        unreachable!("called with the eval command")
    };
    let (spec, dev) = open_device(device)?;
    let quant = parse_quant(quantize, "--quantize")?;
    let quant_vocab = parse_quant(quantize_vocab, "--quantize-vocab")?;
    let stored = dptrain::model::quant::stored_file(model).is_some();
    let base_dtype = match (dtype, quant.or(quant_vocab)) {
        (Some(d), _) => dptrain::config::parse_base_dtype(d).map_err(anyhow::Error::msg).context("--dtype")?,
        (None, Some(_)) => candle_core::DType::F32,
        // Stored GGML blocks are dequantized to f32 for each product.
        (None, None) if stored => candle_core::DType::F32,
        (None, None) => spec.default_base_dtype(),
    };
    let opts = dptrain::train::eval::EvalOptions {
        model_dir: model.clone(),
        adapter: adapter.clone(),
        data: data.clone(),
        max_seq_len: *max_seq_len,
        batch: (*batch).max(1),
        prompts: prompt.clone(),
        samples: *samples,
        max_new_tokens: *max_new_tokens,
        base: dptrain::model::quant::BaseFormat { dtype: base_dtype, quant, quant_vocab },
    };
    let r = dptrain::train::eval::eval_command(&opts, &dev).context("eval")?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} on {} ({} records): {}",
        match &r.adapter {
            Some(a) => format!("{} + adapter {a}", r.model),
            None => format!("{} (base)", r.model),
        },
        r.data,
        r.records,
        metric_text(&r.metric)
    );
    for g in &r.groups {
        println!("  group {:?} ({} records): {}", g.group, g.size, metric_text(&g.metric));
    }
    for s in &r.samples {
        println!("--- {:?} → {:?}", s.prompt, s.continuation);
    }
    Ok(())
}

fn open_device(name: &str) -> Result<(DeviceSpec, candle_core::Device)> {
    let spec = DeviceSpec::parse(name).map_err(anyhow::Error::msg).context("--device")?;
    Ok((spec, spec.open()?))
}

fn selftest(device: &str, json: Option<&PathBuf>) -> Result<()> {
    let (spec, dev) = open_device(device)?;
    let checks = dptrain::selftest::run(&dev)?;
    println!(
        "{:<34} {:<58} {:>8} {:>10} {:>10} {:>7}  result",
        "check", "case", "values", "max |err|", "tolerance", "exact"
    );
    for c in &checks {
        println!(
            "{:<34} {:<58} {:>8} {:>10.2e} {:>10} {:>6.1}%  {}",
            c.name,
            c.case,
            c.values,
            c.max_abs_err,
            format!("{:.0e}+{:.0e}", c.atol, c.rtol),
            100.0 * c.exact_fraction,
            if c.pass { "ok" } else { "FAIL" }
        );
    }
    if let Some(path) = json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"device": spec.name(), "checks": checks}))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed on {}", checks.len(), spec.name());
    }
    println!("all {} checks passed on {}", checks.len(), spec.name());
    Ok(())
}

fn bench(cmd: &Command) -> Result<()> {
    let Command::Bench {
        config,
        device,
        model,
        shape,
        dtype,
        quantize,
        quantize_vocab,
        batch,
        seq_len,
        steps,
        warmup,
        profile_steps,
        lora_rank,
        targets,
        variants,
        json,
    } = cmd
    else {
        unreachable!("called with the bench command")
    };
    let split = |s: &str| s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect::<Vec<_>>();
    let plan = config
        .as_ref()
        .map(|p| dptrain::config::load(p).with_context(|| format!("--config {}", p.display())))
        .transpose()?;
    let device_name = device.clone().or_else(|| plan.as_ref().map(|p| p.device.name())).unwrap_or_else(|| "cpu".into());
    let (spec, dev) = open_device(&device_name)?;
    let quant = match (quantize, &plan) {
        (Some(_), _) => parse_quant(quantize, "--quantize")?,
        (None, Some(p)) => p.model_quant,
        (None, None) => None,
    };
    let quant_vocab = match (quantize_vocab, &plan) {
        (Some(_), _) => parse_quant(quantize_vocab, "--quantize-vocab")?,
        (None, Some(p)) => p.model_quant_vocab,
        (None, None) => None,
    };
    let stored = model.as_deref().and_then(dptrain::model::quant::stored_file).is_some()
        || plan.as_ref().is_some_and(|p| p.model_stored_quant.is_some());
    let base_dtype = match (dtype, &plan) {
        (Some(d), _) => dptrain::config::parse_base_dtype(d).map_err(anyhow::Error::msg).context("--dtype")?,
        (None, _) if quant.is_some() || quant_vocab.is_some() || stored => candle_core::DType::F32,
        (None, Some(p)) => p.model_dtype.unwrap_or_else(|| spec.default_base_dtype()),
        (None, None) => spec.default_base_dtype(),
    };
    if (quant.is_some() || quant_vocab.is_some()) && base_dtype != candle_core::DType::F32 {
        anyhow::bail!(
            "--quantize, --quantize-vocab: a quantized base is dequantized to f32 for each product; --dtype must be f32"
        );
    }
    let mut opts = dptrain::bench::BenchOptions {
        model_dir: model.clone(),
        shape: shape.clone(),
        base_dtype,
        quant,
        quant_vocab,
        batch: batch.unwrap_or(32),
        seq_len: *seq_len,
        steps: *steps,
        warmup: *warmup,
        lora_rank: *lora_rank,
        lora_alpha: None,
        lora_layers: None,
        targets: split(targets),
        variants: split(variants),
        examples: None,
        profile_steps: *profile_steps,
    };
    if let Some(plan) = &plan {
        if model.is_some() {
            anyhow::bail!("give --config or --model, not both");
        }
        let arch = dptrain::model::Architecture::detect(&plan.model_dir)?;
        let (train, _) = dptrain::train::run::load_data(plan, arch)?;
        opts.model_dir = Some(plan.model_dir.clone());
        opts.batch = batch.unwrap_or(plan.max_physical_batch);
        opts.lora_rank = plan.lora_rank;
        opts.lora_alpha = Some(plan.lora_alpha);
        opts.lora_layers = plan.lora_layers.clone();
        if opts.targets.is_empty() {
            opts.targets = match &plan.target_modules {
                Some(t) => t.clone(),
                None => arch.default_lora_targets_of(&plan.model_dir)?,
            };
        }
        opts.examples = Some(train.examples);
    }
    let r = dptrain::bench::run(&opts, &dev, &spec.name())?;
    println!(
        "{} on {}, base {}, batch {} ({} {} tokens, longest {}), LoRA r = {} on {:?} ({} trainable), median of {} interleaved steps",
        r.model,
        r.device,
        r.base_dtype,
        r.batch,
        r.tokens_per_batch,
        if r.real_data { "real" } else { "random" },
        r.seq_len,
        r.lora_rank,
        r.targets,
        r.trainable_params,
        r.steps
    );
    println!(
        "step: {:.2} GFLOP (analytic: forward + the backward LoRA needs); GEMM peak {:.1} GFLOP/s (candle {} matmul probe; MFU is relative to it)",
        r.step_gflop, r.gemm_peak_gflops, r.peak_dtype
    );
    println!(
        "{:<16} {:>11} {:>11} {:>11} {:>12} {:>7} {:>11} {:>11} {:>11}",
        "variant", "median ms", "examples/s", "tokens/s", "vs non-priv", "MFU", "peak MiB", "extra mem", "RSS MiB"
    );
    let base = r.results.iter().find(|v| v.variant == "non-private");
    let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64));
    for v in &r.results {
        let ratio = base.map_or("-".to_string(), |b| format!("{:.3}×", v.examples_per_s / b.examples_per_s));
        let extra = match (base.and_then(|b| b.peak_memory_bytes), v.peak_memory_bytes) {
            (Some(b), Some(p)) if b > 0 => format!("{:+.1}%", 100.0 * (p as f64 / b as f64 - 1.0)),
            _ => "-".to_string(),
        };
        println!(
            "{:<16} {:>11.2} {:>11.1} {:>11.0} {:>12} {:>6.1}% {:>11} {:>11} {:>11}",
            v.variant,
            v.median_step_ms,
            v.examples_per_s,
            v.tokens_per_s,
            ratio,
            100.0 * v.model_flop_utilisation,
            mib(v.peak_memory_bytes),
            extra,
            mib(v.peak_rss_bytes)
        );
    }
    if let Some(v) = r.results.first() {
        println!("peak memory: {}", v.memory_kind);
    }
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    if let Some(b) = r.frozen_weight_bytes {
        println!("frozen weight matrices: {} as held ({})", mib(b), r.base_dtype);
    }
    if let Some(b) = r.load_peak_bytes {
        println!("peak while the model was built: {}", mib(b));
    }
    if r.results.iter().any(|v| !v.time_split_ms.is_empty()) {
        println!(
            "time split, ms per step ({} profiled steps each; every phase mark synchronises the device):",
            profile_steps
        );
        for v in &r.results {
            let parts: Vec<String> = v.time_split_ms.iter().map(|(p, t)| format!("{p} {t:.1}")).collect();
            println!("  {:<14} {}", v.variant, parts.join(" · "));
        }
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        None => train(&cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Selftest { device, json }) => selftest(device, json.as_ref()),
        Some(cmd @ Command::Bench { .. }) => bench(cmd),
        Some(cmd @ Command::Eval { .. }) => eval(cmd),
        Some(Command::Verify { dir, json, private, train, test, allow_seeded }) => {
            let opts = dptrain::report::verify::VerifyOptions {
                private: private.clone(),
                train: train.clone(),
                test: test.clone(),
                allow_seeded: *allow_seeded,
            };
            let v = dptrain::report::verify::verify(dir, &opts).map_err(anyhow::Error::msg).context("verify")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for c in &v.checks {
                    println!("{:<5} {:<36} {}", if c.pass { "ok" } else { "FAIL" }, c.name, c.detail);
                }
            }
            let failed = v.checks.iter().filter(|c| !c.pass).count();
            if failed > 0 {
                bail!("{}: {failed} of {} checks failed", dir.display(), v.checks.len());
            }
            if !v.private {
                bail!("{}: a non-private run certifies nothing", dir.display());
            }
            if v.seeded {
                eprintln!(
                    "warning: {} is a SEEDED run: it certifies nothing (accepted because of --allow-seeded)",
                    dir.display()
                );
            }
            println!(
                "verified: {} checks passed for {}{}",
                v.checks.len(),
                dir.display(),
                match &v.private_part {
                    Some(p) => format!(" (with the private part {p})"),
                    None => " (release only: data identity not checked)".into(),
                }
            );
            Ok(())
        }
        Some(Command::Convert { gguf, out, overwrite, keep_quantized }) => {
            let opts = dptrain::convert::ConvertOptions { overwrite: *overwrite, keep_quantized: *keep_quantized };
            let s = dptrain::convert::convert_gguf(gguf, out, opts)
                .with_context(|| format!("converting {}", gguf.display()))?;
            let storage = if s.kept_quantized > 0 {
                format!(
                    "{} weights kept as {} blocks in {}, the rest f32",
                    s.kept_quantized,
                    s.kept_formats.join("/"),
                    dptrain::model::quant::STORED_FILE
                )
            } else {
                "f32".into()
            };
            println!(
                "converted {} tensors ({} parameters, {storage}, {} embeddings) from {} into {}",
                s.tensors,
                s.parameters,
                if s.tied_embeddings { "tied" } else { "untied" },
                gguf.display(),
                s.out_dir.display()
            );
            if *keep_quantized && s.kept_quantized == 0 {
                println!("note: the GGUF holds no quantized weights: nothing was kept quantized");
            }
            Ok(())
        }
        Some(Command::Init {
            model,
            train,
            test,
            target_epsilon,
            delta,
            labels,
            max_seq_len,
            device,
            run_dir,
            out,
            overwrite,
        }) => {
            let inputs = dptrain::recipe::RecipeInputs {
                model: model.clone(),
                train: train.clone(),
                test: test.clone(),
                target_epsilon: *target_epsilon,
                delta: *delta,
                labels: labels.clone(),
                max_seq_len: *max_seq_len,
                device: DeviceSpec::parse(device).map_err(anyhow::Error::msg)?,
                run_dir: run_dir.clone(),
            };
            let (r, _) = dptrain::recipe::init(&inputs, out, *overwrite)?;
            println!(
                "wrote {}: N = {}, L = {}, {} probe + {} LoRA epochs, δ = {:e}; train with: dptrain --config {}",
                out.display(),
                r.records,
                r.expected_batch_size,
                r.linear_probe_epochs,
                r.epochs,
                r.delta,
                out.display()
            );
            Ok(())
        }
        Some(Command::Tune { config, out, overwrite, dry_run, resume, stop_after_trial, stop_after_step }) => {
            let plan = dptrain::config::load(config)?;
            let opts = dptrain::tune::TuneOptions {
                out: out.clone(),
                overwrite: *overwrite,
                dry_run: *dry_run,
                resume: *resume,
                stop_after_trials: *stop_after_trial,
                stop_after_step: *stop_after_step,
            };
            // Ctrl-C / SIGTERM: the trial in progress finishes its step and checkpoints.
            dptrain::train::interrupt::install();
            let t = dptrain::tune::tune(&plan, &opts).with_context(|| format!("search of {}", config.display()))?;
            if *dry_run {
                println!("dry run: the search would spend ε ≤ {} (δ = {:e}); no trial run", t.epsilon, plan.delta);
                return Ok(());
            }
            let win = &t.trials[t.best];
            println!(
                "selected candidate {} {:?} (noisy validation score {}): ε ≤ {} for the whole search (δ = {:e}, rdp accountant); release in {}",
                win.candidate,
                t.candidates[win.candidate],
                win.noisy_score,
                dptrain::report::round_up(t.epsilon, 4),
                plan.delta,
                t.release.display()
            );
            Ok(())
        }
        Some(Command::Audit { config, canaries, mode, non_private, confidence, json, out, overwrite }) => {
            let mode = dptrain::audit::command::Mode::parse(mode).map_err(anyhow::Error::msg)?;
            let plan = dptrain::config::load(config)?;
            let opts = dptrain::audit::command::AuditOptions {
                mode,
                canaries: *canaries,
                non_private: *non_private,
                confidence: *confidence,
                out: out.clone(),
                overwrite: *overwrite,
                log_lines: true,
            };
            dptrain::train::interrupt::install();
            let a = dptrain::audit::command::audit(&plan, config, &opts)
                .with_context(|| format!("audit of {}", config.display()))?;
            if *json {
                println!("{}", a.json);
            } else {
                println!("{}", a.text);
            }
            Ok(())
        }
        Some(Command::Epsilon { sample_rate, noise_multiplier, steps, delta, accountant: a, json }) => {
            epsilon_command(*sample_rate, *noise_multiplier, *steps, *delta, accountant(a)?, *json)
        }
        Some(Command::Calibrate { target_epsilon, delta, sample_rate, steps, accountant: a, json }) => {
            let kind = accountant(a)?;
            // PLD evaluations cost milliseconds each: 1e-4 relative precision on σ is plenty.
            let tol = if kind == AccountantKind::Pld { 1e-4 } else { 1e-6 };
            let (sigma, eps) =
                dptrain::accounting::calibrate(kind, *target_epsilon, *delta, *sample_rate, *steps, tol)?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"noise_multiplier": sigma, "epsilon": eps, "accountant": kind.name(), "delta": delta,
                        "sample_rate": sample_rate, "steps": steps, "target_epsilon": target_epsilon,
                        "relative_precision": tol})
                );
            } else {
                println!("σ = {sigma} gives ε = {eps} ≤ {target_epsilon} ({}, δ = {delta})", kind.name());
            }
            Ok(())
        }
    }
}

/// Counts live heap bytes for `dptrain bench`'s CPU peak memory (see `allocator::CountingAlloc`).
#[global_allocator]
static GLOBAL: dptrain::allocator::CountingAlloc = dptrain::allocator::CountingAlloc;

fn main() -> ExitCode {
    dptrain::allocator::tune_for_training();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
