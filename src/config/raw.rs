//! The TOML schema, exactly as a user writes it. Every key's doc comment is its user
//! documentation (README "Configuration" repeats it). Unknown keys are rejected.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawConfig {
    pub model: RawModel,
    pub data: RawData,
    #[serde(default)]
    pub lora: RawLora,
    pub privacy: RawPrivacy,
    pub training: RawTraining,
    pub output: RawOutput,
    /// Private hyper-parameter search for `dptrain tune` (a plain training run refuses a config
    /// that has this table).
    pub tune: Option<RawTune>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawTune {
    /// Private held-out JSONL (same format as data.train) on which every trial is scored: its
    /// count of correct predictions plus Gaussian noise (`score-noise`). Covered by ε.
    pub validation: PathBuf,
    /// Expected number of trials E[K]; K is drawn from a truncated negative binomial distribution
    /// with this mean, independently of the data. Default 4.
    pub mean_trials: Option<f64>,
    /// Shape η ≥ 0 of that distribution: 0 logarithmic (default; the cheapest in ε), 1 geometric.
    pub trials_shape: Option<f64>,
    /// Standard deviation, in records, of the Gaussian noise on each trial's count of correct
    /// validation predictions (the count has sensitivity 1). Default 10.
    pub score_noise: Option<f64>,
    /// The search space: each key lists the values a trial may take (a trial draws one of all the
    /// combinations uniformly at random); a setting not listed keeps the config's value.
    pub learning_rate: Option<Vec<f64>>,
    pub clip_norm: Option<Vec<f64>>,
    pub epochs: Option<Vec<f64>>,
    pub expected_batch_size: Option<Vec<usize>>,
    pub linear_probe_epochs: Option<Vec<f64>>,
    pub linear_probe_learning_rate: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawModel {
    /// Folder of a Hugging Face BERT-family model: config.json, model.safetensors, tokenizer.json.
    pub path: PathBuf,
    /// Inputs are truncated to this many tokens (including [CLS] and [SEP]). Default 128.
    pub max_seq_len: Option<usize>,
    /// dtype of the frozen base weights: "f32", "bf16" or "f16". Default f32 on the CPU, bf16 on
    /// a GPU. LoRA tensors, per-example gradients, clipping and noise are always f32.
    pub dtype: Option<String>,
    /// Llama family: keep the frozen linear weights of the decoder layers quantized, "q8_0"
    /// (8.5 bits a weight) or "q4_k" (4.5 bits), dequantized to f32 for each product; norms,
    /// embedding and head in f32. The adapter is trained for, and deployed on, the quantized
    /// base. Default: not quantized.
    pub quantize: Option<String>,
    /// Llama family: keep the token embedding and the LM head (one tensor when tied) in GGML
    /// blocks too, "q8_0" or "q4_k": the lookup dequantizes only the rows it reads, the loss one
    /// vocabulary slice of the head at a time, so neither exists whole in f32 (for Llama 3's
    /// 128,256-token vocabulary that is most of the memory a quantized 1B model needs). Default:
    /// not quantized.
    pub quantize_vocab: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawData {
    /// Training JSONL: one {"text": ..., "label": ...} per line. Each line is one privacy unit.
    pub train: PathBuf,
    /// Held-out JSONL in the same format, used for test accuracy only (never trained on).
    pub test: PathBuf,
    /// The label set, stated publicly (e.g. ["ham", "spam"]); a record with another label is an
    /// error. Default: the sorted labels found in the training file (which then reveals them).
    pub labels: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawLora {
    /// LoRA rank r. Default 8.
    pub rank: Option<usize>,
    /// LoRA alpha; the adapter output is scaled by alpha / r. Default 16.
    pub alpha: Option<f64>,
    /// Linear layers that get adapters, by module name: any of "query", "key", "value",
    /// "attention.output.dense", "intermediate.dense", "output.dense". Default ["query", "value"].
    pub target_modules: Option<Vec<String>>,
    /// Encoder layers (0-based) that get adapters, as PEFT's `layers_to_transform`. Default: all.
    /// Layers below the lowest adapted one are frozen as a whole, so dptrain computes their output
    /// once per record and trains only the layers above (much faster on CPU).
    pub layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPrivacy {
    /// Target ε: σ is calibrated so that the planned steps spend at most this, and training stops
    /// before any step that would exceed it. Give this or `noise-multiplier`, not both.
    pub target_epsilon: Option<f64>,
    /// Noise multiplier σ (noise std = σ · clip-norm), when not calibrating from a target.
    pub noise_multiplier: Option<f64>,
    /// δ of the (ε, δ) guarantee. Must be well below 1/N (N = training records).
    pub delta: f64,
    /// Per-example clipping norm C (flat L2 norm over all trainable tensors).
    pub clip_norm: f64,
    /// "flat" (default: scale by min(1, C/‖g‖)) or "automatic" (Bu et al.: scale every example by
    /// C/(‖g‖ + γ); no threshold to tune). Both bound every example's norm by C.
    pub clipping: Option<String>,
    /// γ of automatic clipping (default 0.01).
    pub automatic_clipping_stability: Option<f64>,
    /// Accountant used for calibration, the stop rule and the certificate: "pld" (default) or
    /// "rdp". The other one is reported beside it.
    pub accountant: Option<String>,
    /// Required: were hyper-parameters chosen by looking at results on this private data? Quoted
    /// in the report as given (tuning on private data leaks privacy that ε does not cover).
    pub hyperparameters_tuned_on_private_data: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawTraining {
    /// Expected logical batch size L: each record is sampled with probability q = L / N. The
    /// noisy gradient sum is divided by L (a public constant), never by the realised size.
    pub expected_batch_size: usize,
    /// Largest number of examples run through the model at once (memory bound). Default: the
    /// memory plan's choice, at most 32.
    pub max_physical_batch: Option<usize>,
    /// Memory the run may plan to use, in GiB (default: what the device has available). The
    /// memory plan chooses the micro-batch size within it when `max-physical-batch` is not set.
    pub max_memory_gib: Option<f64>,
    /// Largest number of padded tokens (examples × longest length) run through the model at once;
    /// a longer single record still runs alone. Default: no token bound.
    pub max_tokens: Option<usize>,
    /// Number of logical LoRA steps (after the linear probe's, if any). Give this or `epochs`.
    pub steps: Option<u64>,
    /// Epochs of LoRA steps: steps = round(epochs · N / L).
    pub epochs: Option<f64>,
    /// Classification: epochs of a DP linear probe before the LoRA steps: round(epochs · N / L)
    /// steps that train only the head, on the frozen model's pooled features (computed once per
    /// record), with the run's q, C and σ; they are in the ledger like every step and σ is
    /// calibrated for probe and LoRA steps together. Default 0 (no probe).
    pub linear_probe_epochs: Option<f64>,
    /// Learning rate of the linear probe's steps (AdamW with the run's adam-eps, linear decay to 0
    /// over the probe). Default: `learning-rate`.
    pub linear_probe_learning_rate: Option<f64>,
    /// Optimiser: "adamw" (default) or "sgd" (with momentum).
    pub optimizer: Option<String>,
    /// Learning rate. Default 1e-3.
    pub learning_rate: Option<f64>,
    /// Decoupled weight decay. Default 0.
    pub weight_decay: Option<f64>,
    /// Momentum of "sgd" (default 0.9); an error with "adamw".
    pub momentum: Option<f64>,
    /// ε of "adamw"'s denominator √v + ε (default 1e-8). Under DP noise a larger value (around the
    /// per-coordinate noise std σC/L) stops Adam from scaling pure-noise coordinates up to full
    /// steps. An error with "sgd".
    pub adam_eps: Option<f64>,
    /// Linear warm-up of the learning rate over this many steps. Default 0.
    pub warmup_steps: Option<u64>,
    /// Learning-rate schedule after warm-up: "constant" or "linear" (linear decay to 0 at the
    /// last planned step). Default "constant".
    pub lr_schedule: Option<String>,
    /// Release an exponential moving average of the parameters over the LoRA-phase steps instead
    /// of the last step's parameters: after LoRA step k (0-based) the average becomes
    /// β·average + (1 − β)·parameters with β = min(ema-decay, (1 + k)/(10 + k)), starting from
    /// the parameters the LoRA phase starts from (after any linear probe). The average is a
    /// function of the privatised updates only, so it is post-processing and costs no privacy.
    /// The test metric is the averaged model's. A number in (0, 1), e.g. 0.95; default: off.
    pub ema_decay: Option<f64>,
    /// Fixed seed for every random stream (sampling, noise, init). For experiments only: the
    /// certificate then says "seeded: not for release". Default: fresh OS entropy.
    pub seed: Option<u64>,
    /// "cpu" (default), "cuda" or "cuda:N" (a build with `--features cuda`).
    pub device: Option<String>,
    /// Write a checkpoint every this many steps (and always after the last one), under
    /// `<output.dir>/private/checkpoints/`. 0 = only after the last step. Default 50.
    pub checkpoint_every: Option<u64>,
    /// How many of the newest checkpoints to keep. Default 2.
    pub keep_checkpoints: Option<usize>,
    /// Keep the final checkpoint after a finished run (in `<output.dir>/private/checkpoints/`).
    /// Default false: checkpoints hold the noise key, so they are deleted once the outputs are
    /// written.
    pub keep_final_checkpoint: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOutput {
    /// Run folder: `release/` (adapter, certificate, report: what may be published) and
    /// `private/` (owner-only: seed, keys, per-step metrics, checkpoints; never publish it).
    pub dir: PathBuf,
}
