//! `dptrain bench`: DP-LoRA against non-private LoRA training steps on the same device, model and
//! batch, in one process (first version; see BENCHMARKS.md for recorded results).
//!
//! Variants, each a full optimiser step on one batch of `batch` examples × `seq_len` tokens:
//! - `non-private`: standard LoRA training: LoRA tensors and head as `Var`s, forward, backward of
//!   the mean loss, AdamW (fused kernel). No per-example work.
//! - `dp`: the DP-SGD step dptrain trains with: forward with a LoRA tape, backward of the summed
//!   loss, per-example gradients, fused norm / clip / weighted-sum kernels, Gaussian noise,
//!   ÷ expected batch size, AdamW.
//! - `dp-candle-ops`: the same step with the clip done by candle ops on the concatenated [b, P]
//!   per-example matrix (the "before" of the fused kernels).
//!
//! Every variant builds its batch (host → device) inside the timed step, as training does. The
//! variants are interleaved step by step (after `warmup` untimed rounds), so machine noise hits
//! them alike; each keeps its own parameters and optimiser state.
//!
//! Each step ends with a device synchronisation before the clock is read. Reported per variant:
//! the median step time over `steps` timed steps, examples/s and tokens/s (real tokens), peak
//! memory while its steps ran (CUDA: the default memory pool's high-water mark; CPU: the most
//! live heap bytes counted by `allocator::CountingAlloc` where the binary installs it, and the
//! process's peak resident set, VmHWM; both reset before each step), and the time split across
//! phases from `profile_steps` further steps with `crate::profile` marks (each mark
//! synchronises the device, so these steps are not the timed ones).
//!
//! Model-FLOP utilisation: the step's analytic FLOPs (`crate::flops`) per second over the peak
//! a short GEMM probe measures on the same device at start-up.
//!
//! The batch is random token ids (`seq_len` each), or with `examples` real records (e.g. the
//! first records of a run config's training file, `dptrain bench --config`).

use crate::data::{Batch, Example};
use crate::flops::FlopShape;
use crate::kernels::FusedAdamW;
use crate::memory;
use crate::model::bert::{random_weights, BertClassifier, BertConfig, LoraSpec};
use crate::model::{Architecture, DpModel, LlamaConfig, LlamaLm, Task};
use crate::privacy::GaussianNoise;
use crate::train::params::FlatParams;
use crate::train::step::{private_gradient_with, ClipImpl, Mechanism};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::path::PathBuf;
use std::time::Instant;

/// Built-in model shapes (random weights: throughput does not depend on the values).
pub const SHAPES: [&str; 9] = [
    "tiny",
    "minilm-l6",
    "bert-base",
    "llama-tiny",
    "smollm2-135m",
    "llama-3.2-1b",
    "llama-3.1-8b",
    "gemma-3-1b",
    "gemma-2-2b",
];

/// The Llama-family config of a built-in decoder shape (`None` for the BERT shapes).
pub fn llama_shape_config(name: &str) -> Result<Option<LlamaConfig>> {
    // Gemma: the published config.json files, soft caps, sliding windows and norms included.
    let hub = match name {
        "gemma-3-1b" => Some(crate::model::llama::GEMMA3_1B_HUB_CONFIG),
        "gemma-2-2b" => Some(crate::model::llama::GEMMA2_2B_HUB_CONFIG),
        _ => None,
    };
    if let Some(text) = hub {
        return LlamaConfig::from_json(text).map(Some).map_err(candle_core::Error::Msg);
    }
    let (vocab, h, layers, heads, kv, ffn, tied) = match name {
        "llama-tiny" => (256, 64, 2, 4, 2, 128, true),
        // SmolLM2-135M: the published config.
        "smollm2-135m" => (49152, 576, 30, 9, 3, 1536, true),
        // Llama-3.2-1B and Llama-3.1-8B: the published shapes and RoPE settings.
        "llama-3.2-1b" => (128256, 2048, 16, 32, 8, 8192, true),
        "llama-3.1-8b" => (128256, 4096, 32, 32, 8, 14336, false),
        _ => return Ok(None),
    };
    let mut cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": tied, "hidden_act": "silu"
    });
    if name.starts_with("llama-3") {
        cfg["rope_theta"] = 500000.0.into();
        cfg["max_position_embeddings"] = 131072.into();
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": if tied { 32.0 } else { 8.0 },
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    }
    serde_json::from_value(cfg).map(Some).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

pub fn shape_config(name: &str) -> Result<BertConfig> {
    let (vocab, h, layers, heads, ffn, pos) = match name {
        "tiny" => (120, 64, 2, 4, 128, 128),
        "minilm-l6" => (30522, 384, 6, 12, 1536, 512),
        "bert-base" => (30522, 768, 12, 12, 3072, 512),
        other => candle_core::bail!("unknown model shape `{other}` (expected one of {SHAPES:?})"),
    };
    serde_json::from_value(serde_json::json!({
        "model_type": "bert", "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": ffn, "max_position_embeddings": pos,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    }))
    .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A model folder (real weights), or else `shape` with random weights.
    pub model_dir: Option<PathBuf>,
    pub shape: String,
    pub base_dtype: DType,
    /// Llama family: frozen linear weights kept quantized (`model.quantize`); needs f32.
    pub quant: Option<crate::model::quant::QuantFormat>,
    /// Llama family: embedding and LM head kept quantized (`model.quantize-vocab`); needs f32.
    pub quant_vocab: Option<crate::model::quant::QuantFormat>,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub lora_rank: usize,
    /// LoRA α (default 2 · rank).
    pub lora_alpha: Option<f64>,
    /// Layers with adapters (default all).
    pub lora_layers: Option<Vec<usize>>,
    pub targets: Vec<String>,
    pub variants: Vec<String>,
    /// Real records to use as the batch (the first `batch` of them) instead of random ids.
    pub examples: Option<Vec<Example>>,
    /// Profiled steps per variant for the time split (0: none).
    pub profile_steps: usize,
}

pub const VARIANTS: [&str; 3] = ["non-private", "dp", "dp-candle-ops"];

#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub median_step_ms: f64,
    pub min_step_ms: f64,
    pub max_step_ms: f64,
    pub examples_per_s: f64,
    /// Real (non-padding) tokens per second.
    pub tokens_per_s: f64,
    /// The step's analytic FLOPs (`flops::step_flops`) per second over the measured
    /// GEMM peak.
    pub model_flop_utilisation: f64,
    /// Peak bytes while this variant's steps ran: the CUDA memory pool's high-water mark, or on
    /// the CPU the most live heap bytes (when the counting allocator is installed, as in the
    /// `dptrain` binary; else the peak resident set).
    pub peak_memory_bytes: Option<u64>,
    /// CPU only: the process's peak resident set (VmHWM, Linux) over the same steps, which also
    /// holds freed memory the allocator kept.
    pub peak_rss_bytes: Option<u64>,
    /// What `peak_memory_bytes` measures.
    pub memory_kind: &'static str,
    /// Milliseconds per step in each phase (forward, backward, per-example, clip, noise,
    /// optimizer, data, other), from the profiled steps.
    pub time_split_ms: Vec<(String, f64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub model: String,
    pub base_dtype: String,
    pub batch: usize,
    /// The longest record (random batches: all records have this length).
    pub seq_len: usize,
    /// Real tokens in the batch.
    pub tokens_per_batch: usize,
    /// Whether the batch is real records (`--config`) rather than random ids.
    pub real_data: bool,
    pub steps: usize,
    pub warmup: usize,
    pub lora_rank: usize,
    pub targets: Vec<String>,
    pub trainable_params: usize,
    /// Analytic FLOPs of one step (forward + the backward LoRA needs), in GFLOP.
    pub step_gflop: f64,
    /// The measured peak of this build's matrix product (candle's matmul, best square GEMM of
    /// 512 … 2048) on the device, GFLOP/s: the peak the engine can reach with its GEMM. Another
    /// GEMM may reach more on the same machine (BENCHMARKS.md: PyTorch's f32 GEMM reaches about
    /// twice candle's on the 2-core AVX-512 CI machine).
    pub gemm_peak_gflops: f64,
    /// The dtype of that probe.
    pub peak_dtype: String,
    /// Llama family: bytes of the frozen weight matrices (decoder linears, embedding, untied
    /// head) as the model holds them (f32/bf16, or GGML blocks with `--quantize`, `--quantize-vocab`).
    pub frozen_weight_bytes: Option<u64>,
    /// Peak bytes (the same kind as the variants' `peak_memory_bytes`) while the model was built
    /// or loaded, before any step.
    pub load_peak_bytes: Option<u64>,
    pub results: Vec<VariantResult>,
}

/// The model under test, its name, vocabulary size, position limit, LoRA targets, FLOP shape and
/// (Llama family) the bytes of its frozen weight matrices as stored.
type Built = (Box<dyn DpModel>, String, usize, usize, Vec<String>, crate::flops::FlopShape, Option<u64>);

fn build_model(opts: &BenchOptions, device: &Device) -> Result<Built> {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let err = |e: crate::model::ModelError| candle_core::Error::Msg(e.to_string());
    let arch = match (&opts.model_dir, llama_shape_config(&opts.shape)?) {
        (Some(dir), _) => Architecture::detect(dir).map_err(err)?,
        (None, Some(_)) => Architecture::Llama,
        (None, None) => Architecture::Bert,
    };
    let targets = match (&opts.model_dir, opts.targets.is_empty()) {
        (_, false) => opts.targets.clone(),
        (Some(dir), true) => arch.default_lora_targets_of(dir).map_err(err)?,
        (None, true) => arch.default_lora_targets(),
    };
    let spec = LoraSpec {
        rank: opts.lora_rank,
        alpha: opts.lora_alpha.unwrap_or(2.0 * opts.lora_rank as f64),
        targets: targets.clone(),
        layers: opts.lora_layers.clone(),
    };
    let name = match &opts.model_dir {
        Some(dir) => dir.display().to_string(),
        None => format!("{} (random weights)", opts.shape),
    };
    let base =
        crate::model::quant::BaseFormat { dtype: opts.base_dtype, quant: opts.quant, quant_vocab: opts.quant_vocab };
    let llama_bytes = |m: &LlamaLm| Some((m.layer_weight_bytes() + m.vocab_weight_bytes()) as u64);
    let (mut model, vocab, positions, shape, frozen_bytes): (Box<dyn DpModel>, usize, usize, FlopShape, Option<u64>) =
        match (arch, &opts.model_dir) {
            (Architecture::Bert, _) if base.is_quantized() => {
                candle_core::bail!(
                    "--quantize, --quantize-vocab: quantized base weights are implemented for the Llama family only"
                )
            }
            (Architecture::Bert, dir) => {
                let m = match dir {
                    Some(dir) => BertClassifier::load(dir, Some(&spec), 2, &mut rng, device).map_err(err)?,
                    None => {
                        let cfg = shape_config(&opts.shape)?;
                        let w = random_weights(&cfg, &mut rng, device)?;
                        BertClassifier::new(
                            VarBuilder::from_tensors(w, DType::F32, device),
                            cfg,
                            Some(&spec),
                            2,
                            &mut rng,
                        )?
                    }
                }
                .with_base_dtype(opts.base_dtype)?;
                let (v, p) = (m.config.vocab_size, m.config.max_position_embeddings);
                let shape = FlopShape::bert(&m.config, 2);
                (Box::new(m), v, p, shape, None)
            }
            (Architecture::Llama, Some(dir)) => {
                let m = LlamaLm::load(dir, Some(&spec), &mut rng, device, base).map_err(err)?;
                let (v, shape, bytes) = (m.config.vocab_size, FlopShape::llama(&m.config), llama_bytes(&m));
                (Box::new(m), v, usize::MAX, shape, bytes)
            }
            (Architecture::Llama, None) => {
                // Each weight is made when the model reads it, and those to be quantized on the
                // CPU: no f32 copy of the whole model exists at any time, on the host or the device.
                let cfg = llama_shape_config(&opts.shape)?.expect("a llama shape");
                let seed = rng.random::<u64>();
                let weights = |dev: &Device| {
                    let lazy = crate::model::llama::LazyRandomWeights::new(&cfg, seed);
                    VarBuilder::from_backend(Box::new(lazy), opts.base_dtype, dev.clone())
                };
                let source = weights(&Device::Cpu);
                let m =
                    LlamaLm::new_with_quant_source(weights(device), &source, cfg.clone(), Some(&spec), &mut rng, base)?;
                let (v, shape, bytes) = (m.config.vocab_size, FlopShape::llama(&m.config), llama_bytes(&m));
                (Box::new(m), v, usize::MAX, shape, bytes)
            }
        };
    // Non-zero LoRA B and head, as after some training (B = 0 would make A's gradient zero).
    let init = model
        .trainable()
        .iter()
        .map(|(_, t)| crate::model::bert::uniform_tensor(&mut rng, t.dims(), 0.05, device))
        .collect::<Result<Vec<_>>>()?;
    model.set_trainable(&init)?;
    Ok((model, name, vocab, positions, targets, shape, frozen_bytes))
}

/// One variant's state across the interleaved rounds.
struct Variant {
    name: String,
    params: Tensor,
    opt: FusedAdamW,
    times: Vec<f64>,
    peak: Option<u64>,
    peak_rss: Option<u64>,
}

/// Everything a step needs besides the variant.
struct StepCtx<'a> {
    examples: &'a [Example],
    all: &'a [usize],
    layout: &'a FlatParams,
    mech: &'a Mechanism,
    noise: &'a GaussianNoise,
    device: &'a Device,
}

const LR: f64 = 1e-4;

/// One optimiser step of `v` (the model already holds `v`'s parameters).
fn step(model: &mut dyn DpModel, v: &mut Variant, cx: &StepCtx, s: u64) -> Result<()> {
    let dev = cx.device;
    match v.name.as_str() {
        "non-private" => {
            let vars = model.trainable().into_iter().map(|(_, t)| Var::from_tensor(&t)).collect::<Result<Vec<_>>>()?;
            model.set_trainable(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
            // Built per step, as the DP variants (and training) do.
            let batch = Batch::gather(cx.examples, cx.all, None, dev)?;
            crate::profile::mark(dev, "data")?;
            let loss = (model.example_losses(&batch, None)?.sum_all()? / cx.all.len() as f64)?;
            crate::profile::mark(dev, "forward")?;
            let grads = loss.backward()?;
            crate::profile::mark(dev, "backward")?;
            let flat = vars
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .ok_or_else(|| candle_core::Error::Msg("missing LoRA gradient".into()))?
                        .flatten_all()
                })
                .collect::<Result<Vec<_>>>()?;
            let g = Tensor::cat(&flat, 0)?;
            crate::profile::mark(dev, "other")?;
            v.opt.step(&v.params, &g, LR)?;
        }
        dp => {
            let how = if dp == "dp" { ClipImpl::Fused } else { ClipImpl::CandleOps };
            let (g, _) = private_gradient_with(
                &*model,
                cx.examples,
                None,
                cx.all,
                cx.all.len(),
                cx.layout.len(),
                cx.mech,
                cx.noise,
                s,
                how,
            )?;
            v.opt.step(&v.params, &g, LR)?;
        }
    }
    crate::profile::mark(dev, "optimizer")
}

pub fn run(opts: &BenchOptions, device: &Device, device_name: &str) -> Result<BenchReport> {
    if opts.batch == 0 || opts.seq_len < 2 || opts.steps == 0 {
        candle_core::bail!("bench: batch ≥ 1, seq-len ≥ 2 and steps ≥ 1 are required");
    }
    for v in &opts.variants {
        if !VARIANTS.contains(&v.as_str()) {
            candle_core::bail!("bench: unknown variant `{v}` (expected some of {VARIANTS:?})");
        }
    }
    memory::reset_peak(device, false)?;
    let (mut model, model_name, vocab, positions, targets, shape, frozen_weight_bytes) = build_model(opts, device)?;
    let load_peak_bytes = memory::peak(device)?;
    let lm = model.task() == Task::CausalLm;
    let examples: Vec<Example> = match &opts.examples {
        Some(real) => {
            if real.len() < opts.batch {
                candle_core::bail!("bench: {} records for a batch of {}", real.len(), opts.batch);
            }
            real[..opts.batch].to_vec()
        }
        None => {
            if opts.seq_len > positions {
                candle_core::bail!("bench: seq-len {} exceeds the model's {positions} positions", opts.seq_len);
            }
            let mut rng = ChaCha20Rng::seed_from_u64(2);
            (0..opts.batch)
                .map(|i| {
                    let ids = (0..opts.seq_len).map(|_| rng.random_range(1..vocab as u32)).collect();
                    // Language modelling: every token after the first is a target.
                    Example { ids, label: i % 2, target_start: lm.then_some(1) }
                })
                .collect()
        }
    };
    let tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let step_flops = crate::flops::step_flops(&shape, &crate::flops::lora_branches(&model.trainable()), &lengths);
    // The measured peak of candle's matrix product in the dtype the frozen weights compute in.
    let peak_dtype = if device.is_cpu() { DType::F32 } else { opts.base_dtype };
    let gemm_peak_flops = crate::flops::gemm_peak(device, peak_dtype)?;
    let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);

    let all: Vec<usize> = (0..opts.batch).collect();
    let layout = FlatParams::from_named(&model.trainable())?;
    let initial = layout.to_tensor(device)?;
    let mech = Mechanism {
        clip_kind: Default::default(),
        clip: Some(1.0),
        noise_multiplier: 1.0,
        expected_batch_size: opts.batch,
    };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(3));
    let cx = StepCtx { examples: &examples, all: &all, layout: &layout, mech: &mech, noise: &noise, device };
    let mut variants = opts
        .variants
        .iter()
        .map(|name| {
            Ok(Variant {
                name: name.clone(),
                params: initial.copy()?,
                opt: FusedAdamW::new(0.0, 1e-8),
                times: Vec::new(),
                peak: None,
                peak_rss: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Interleaved rounds: every variant takes one step per round.
    for round in 0..opts.warmup + opts.steps {
        for v in variants.iter_mut() {
            model.set_trainable(&layout.split(&v.params)?)?;
            device.synchronize()?;
            // Timed as training runs: the allocator keeps the memory it has (no trim).
            memory::reset_peak(device, false)?;
            let t0 = Instant::now();
            step(model.as_mut(), v, &cx, round as u64)?;
            device.synchronize()?;
            let dt = t0.elapsed().as_secs_f64();
            if round >= opts.warmup {
                v.times.push(dt);
                v.peak = v.peak.max(memory::peak(device)?);
            }
        }
    }
    // The CPU's peak resident set, one more step per variant: after free memory is returned to
    // the kernel, so that memory kept from another variant's step does not count (untimed: the
    // step faults its pages back in, which training's steps do not).
    if device.is_cpu() {
        for (i, v) in variants.iter_mut().enumerate() {
            model.set_trainable(&layout.split(&v.params)?)?;
            memory::reset_peak(device, true)?;
            step(model.as_mut(), v, &cx, (opts.warmup + opts.steps + i) as u64)?;
            v.peak_rss = memory::peak_rss(device);
        }
    }
    let mut results = Vec::new();
    for v in variants.iter_mut() {
        let mut split: Vec<(String, f64)> = Vec::new();
        for i in 0..opts.profile_steps {
            model.set_trainable(&layout.split(&v.params)?)?;
            crate::profile::start(device)?;
            let r = step(model.as_mut(), v, &cx, (opts.warmup + opts.steps + i) as u64);
            let phases = crate::profile::stop();
            r?;
            for (p, t) in phases {
                match split.iter_mut().find(|(q, _)| q == p) {
                    Some((_, x)) => *x += t,
                    None => split.push((p.to_string(), t)),
                }
            }
        }
        for (_, t) in split.iter_mut() {
            *t *= 1e3 / opts.profile_steps as f64;
        }
        let mut sorted = v.times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        results.push(VariantResult {
            variant: v.name.clone(),
            median_step_ms: median * 1e3,
            min_step_ms: sorted[0] * 1e3,
            max_step_ms: sorted[sorted.len() - 1] * 1e3,
            examples_per_s: opts.batch as f64 / median,
            tokens_per_s: tokens as f64 / median,
            model_flop_utilisation: step_flops / median / gemm_peak_flops,
            peak_memory_bytes: v.peak,
            peak_rss_bytes: v.peak_rss,
            memory_kind: memory::kind(device),
            time_split_ms: split,
        });
    }
    Ok(BenchReport {
        device: device_name.into(),
        model: model_name,
        base_dtype: match (opts.quant, opts.quant_vocab) {
            (Some(q), None) => q.name().to_string(),
            (Some(q), Some(v)) => format!("{}, vocab {}", q.name(), v.name()),
            (None, Some(v)) => format!("{:?}, vocab {}", opts.base_dtype, v.name()).to_lowercase(),
            (None, None) => format!("{:?}", opts.base_dtype).to_lowercase(),
        },
        batch: opts.batch,
        seq_len,
        tokens_per_batch: tokens,
        real_data: opts.examples.is_some(),
        steps: opts.steps,
        warmup: opts.warmup,
        lora_rank: opts.lora_rank,
        targets,
        trainable_params: layout.len(),
        step_gflop: step_flops / 1e9,
        gemm_peak_gflops: gemm_peak_flops / 1e9,
        peak_dtype: format!("{peak_dtype:?}").to_lowercase(),
        frozen_weight_bytes,
        load_peak_bytes,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decoder_shape_is_a_valid_config_with_its_published_sizes() {
        let published = [
            ("smollm2-135m", 134.5),
            ("llama-3.2-1b", 1235.8),
            ("llama-3.1-8b", 8030.3),
            ("gemma-3-1b", 999.9),
            ("gemma-2-2b", 2614.3),
        ];
        for (name, params_millions) in published {
            let c = llama_shape_config(name).unwrap().unwrap();
            c.validate().unwrap();
            let (h, f, l, v) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size);
            let (q, kv) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
            let norms = if c.is_gemma() { 4 * h } else { 2 * h } + if c.qk_norm() { 2 * c.head_dim() } else { 0 };
            let per_layer = 2 * h * q + 2 * h * kv + 3 * h * f + norms;
            let total = v * h * if c.tied() { 1 } else { 2 } + l * per_layer + h;
            let m = total as f64 / 1e6;
            assert!((m - params_millions).abs() < 0.1, "{name}: {m} M parameters");
            assert_eq!(c.rope().unwrap().llama3.is_some(), name.starts_with("llama-3"), "{name}");
            assert_eq!(c.is_gemma(), name.starts_with("gemma"), "{name}");
        }
    }
}
