//! The `dptrain` command line. `anyhow` lives only here; errors print their whole chain and the
//! process exits non-zero.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dptrain::accounting::{calibrate_noise_multiplier, DpEvent, RdpAccountant};
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
}

#[derive(Subcommand)]
enum Command {
    /// Train a DP LoRA adapter (same as `dptrain --config FILE`).
    Train(TrainArgs),
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
        #[arg(long, default_value = "rdp")]
        accountant: String,
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value = "rdp")]
        accountant: String,
        #[arg(long)]
        json: bool,
    },
}

fn check_accountant(name: &str) -> Result<()> {
    match name {
        "rdp" => Ok(()),
        other => bail!("unknown or unavailable accountant `{other}` (this version has: rdp)"),
    }
}

fn train(args: &TrainArgs) -> Result<()> {
    let Some(path) = &args.config else {
        bail!("no config given: use `dptrain --config FILE` (see configs/quickstart.toml)")
    };
    let mut plan = dptrain::config::load(path)?;
    if let Some(out) = &args.out {
        plan.output_dir = out.clone();
    }
    let progress = std::io::stderr().is_terminal();
    let opts = RunOptions { non_private: args.non_private, overwrite: args.overwrite, progress, log_lines: !progress };
    let outcome = run(&plan, &opts).with_context(|| format!("run of {}", path.display()))?;
    let s = &outcome.summary;
    match s.epsilon {
        Some(e) => println!(
            "trained {} steps: ε = {e:.4} (δ = {:e}, {} accountant), σ = {:.4}, test accuracy {:.4}; outputs in {}",
            s.steps,
            s.delta,
            plan.accountant.name(),
            s.noise_multiplier,
            s.test_accuracy,
            plan.output_dir.display()
        ),
        None => println!(
            "trained {} steps WITHOUT privacy (non-private reference), test accuracy {:.4}; outputs in {}",
            s.steps,
            s.test_accuracy,
            plan.output_dir.display()
        ),
    }
    if s.seeded {
        println!("note: this run was seeded: its certificate says \"not for release\"");
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        None => train(&cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Epsilon { sample_rate, noise_multiplier, steps, delta, accountant, json }) => {
            check_accountant(accountant)?;
            let r =
                RdpAccountant::default().epsilon(&DpEvent::dp_sgd(*sample_rate, *noise_multiplier, *steps), *delta)?;
            if r.order_at_grid_edge {
                eprintln!("warning: the optimal RDP order {} is at the edge of the grid", r.optimal_order);
            }
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"epsilon": r.epsilon, "accountant": "rdp", "delta": delta, "sample_rate": sample_rate,
                        "noise_multiplier": noise_multiplier, "steps": steps, "rdp_optimal_order": r.optimal_order})
                );
            } else {
                println!("ε = {} (rdp, δ = {delta}, optimal order {})", r.epsilon, r.optimal_order);
            }
            Ok(())
        }
        Some(Command::Calibrate { target_epsilon, delta, sample_rate, steps, accountant, json }) => {
            check_accountant(accountant)?;
            let acc = RdpAccountant::default();
            let (sigma, eps) = calibrate_noise_multiplier(*target_epsilon, 1e-6, |s| {
                Ok(acc.epsilon(&DpEvent::dp_sgd(*sample_rate, s, *steps), *delta)?.epsilon)
            })?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"noise_multiplier": sigma, "epsilon": eps, "accountant": "rdp", "delta": delta,
                        "sample_rate": sample_rate, "steps": steps, "target_epsilon": target_epsilon})
                );
            } else {
                println!("σ = {sigma} gives ε = {eps} ≤ {target_epsilon} (rdp, δ = {delta})");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
