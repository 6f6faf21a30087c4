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
//! Every variant builds its batch (host → device) inside the timed step, as training does.
//!
//! Each step ends with a device synchronisation before the clock is read. Reported: the median
//! step time over `steps` timed steps (after `warmup` untimed ones), examples/s, and on CUDA the
//! peak memory of the default memory pool during the variant (high-water mark, reset per variant).

use crate::data::{Batch, Example};
use crate::kernels::FusedAdamW;
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
pub const SHAPES: [&str; 5] = ["tiny", "minilm-l6", "bert-base", "llama-tiny", "smollm2-135m"];

/// The Llama config of a built-in decoder shape (`None` for the BERT shapes).
pub fn llama_shape_config(name: &str) -> Result<Option<LlamaConfig>> {
    let (vocab, h, layers, heads, kv, ffn) = match name {
        "llama-tiny" => (256, 64, 2, 4, 2, 128),
        // SmolLM2-135M: the published config.
        "smollm2-135m" => (49152, 576, 30, 9, 3, 1536),
        _ => return Ok(None),
    };
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "hidden_act": "silu"
    }))
    .map(Some)
    .map_err(|e| candle_core::Error::Msg(e.to_string()))
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
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub lora_rank: usize,
    pub targets: Vec<String>,
    pub variants: Vec<String>,
}

pub const VARIANTS: [&str; 3] = ["non-private", "dp", "dp-candle-ops"];

#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub median_step_ms: f64,
    pub min_step_ms: f64,
    pub max_step_ms: f64,
    pub examples_per_s: f64,
    /// Peak bytes in the CUDA memory pool during this variant (None on the CPU).
    pub peak_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub model: String,
    pub base_dtype: String,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub lora_rank: usize,
    pub targets: Vec<String>,
    pub trainable_params: usize,
    pub results: Vec<VariantResult>,
}

/// The model under test, its name, vocabulary size, position limit and LoRA targets.
type Built = (Box<dyn DpModel>, String, usize, usize, Vec<String>);

fn build_model(opts: &BenchOptions, device: &Device) -> Result<Built> {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let err = |e: crate::model::ModelError| candle_core::Error::Msg(e.to_string());
    let arch = match (&opts.model_dir, llama_shape_config(&opts.shape)?) {
        (Some(dir), _) => Architecture::detect(dir).map_err(err)?,
        (None, Some(_)) => Architecture::Llama,
        (None, None) => Architecture::Bert,
    };
    let targets = if opts.targets.is_empty() { arch.default_lora_targets() } else { opts.targets.clone() };
    let spec =
        LoraSpec { rank: opts.lora_rank, alpha: 2.0 * opts.lora_rank as f64, targets: targets.clone(), layers: None };
    let name = match &opts.model_dir {
        Some(dir) => dir.display().to_string(),
        None => format!("{} (random weights)", opts.shape),
    };
    let (mut model, vocab, positions): (Box<dyn DpModel>, usize, usize) = match (arch, &opts.model_dir) {
        (Architecture::Bert, dir) => {
            let m = match dir {
                Some(dir) => BertClassifier::load(dir, Some(&spec), 2, &mut rng, device).map_err(err)?,
                None => {
                    let cfg = shape_config(&opts.shape)?;
                    let w = random_weights(&cfg, &mut rng, device)?;
                    BertClassifier::new(VarBuilder::from_tensors(w, DType::F32, device), cfg, Some(&spec), 2, &mut rng)?
                }
            }
            .with_base_dtype(opts.base_dtype)?;
            let (v, p) = (m.config.vocab_size, m.config.max_position_embeddings);
            (Box::new(m), v, p)
        }
        (Architecture::Llama, Some(dir)) => {
            let m = LlamaLm::load(dir, Some(&spec), &mut rng, device, opts.base_dtype).map_err(err)?;
            let v = m.config.vocab_size;
            (Box::new(m), v, usize::MAX)
        }
        (Architecture::Llama, None) => {
            let cfg = llama_shape_config(&opts.shape)?.expect("a llama shape");
            let w = crate::model::llama::random_weights(&cfg, &mut rng, device)?;
            let m = LlamaLm::new(VarBuilder::from_tensors(w, opts.base_dtype, device), cfg, Some(&spec), &mut rng)?;
            let v = m.config.vocab_size;
            (Box::new(m), v, usize::MAX)
        }
    };
    // Non-zero LoRA B and head, as after some training (B = 0 would make A's gradient zero).
    let init = model
        .trainable()
        .iter()
        .map(|(_, t)| crate::model::bert::uniform_tensor(&mut rng, t.dims(), 0.05, device))
        .collect::<Result<Vec<_>>>()?;
    model.set_trainable(&init)?;
    Ok((model, name, vocab, positions, targets))
}

fn time_steps(
    device: &Device,
    warmup: usize,
    steps: usize,
    mut step: impl FnMut(u64) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        device.synchronize()?;
        let t0 = Instant::now();
        step(i as u64)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
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
    let (mut model, model_name, vocab, positions, targets) = build_model(opts, device)?;
    if opts.seq_len > positions {
        candle_core::bail!("bench: seq-len {} exceeds the model's {positions} positions", opts.seq_len);
    }
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let lm = model.task() == Task::CausalLm;
    let examples: Vec<Example> = (0..opts.batch)
        .map(|i| {
            let ids = (0..opts.seq_len).map(|_| rng.random_range(1..vocab as u32)).collect();
            // Language modelling: every token after the first is a target.
            Example { ids, label: i % 2, target_start: lm.then_some(1) }
        })
        .collect();

    let all: Vec<usize> = (0..opts.batch).collect();
    let layout = FlatParams::from_named(&model.trainable())?;
    let initial = model.trainable().into_iter().map(|(_, t)| t).collect::<Vec<_>>();
    let mech = Mechanism { clip: Some(1.0), noise_multiplier: 1.0, expected_batch_size: opts.batch };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(3));
    let lr = 1e-4;
    let mut results = Vec::new();
    for variant in &opts.variants {
        model.set_trainable(&initial)?;
        let params = layout.to_tensor(device)?;
        let mut opt = FusedAdamW::new(0.0, 1e-8);
        memory::reset_peak(device)?;
        let times = match variant.as_str() {
            "non-private" => {
                let vars = initial.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
                model.set_trainable(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
                let t = time_steps(device, opts.warmup, opts.steps, |_| {
                    // Built per step, as the DP variants (and training) do.
                    let batch = Batch::gather(&examples, &all, None, device)?;
                    let loss = (model.example_losses(&batch, None)?.sum_all()? / opts.batch as f64)?;
                    let grads = loss.backward()?;
                    let flat = vars
                        .iter()
                        .map(|v| {
                            grads
                                .get(v.as_tensor())
                                .ok_or_else(|| candle_core::Error::Msg("missing LoRA gradient".into()))?
                                .flatten_all()
                        })
                        .collect::<Result<Vec<_>>>()?;
                    opt.step(&params, &Tensor::cat(&flat, 0)?, lr)?;
                    for (v, new) in vars.iter().zip(layout.split(&params)?) {
                        v.set(&new)?;
                    }
                    Ok(())
                })?;
                model.set_trainable(&initial)?;
                t
            }
            dp => {
                let how = if dp == "dp" { ClipImpl::Fused } else { ClipImpl::CandleOps };
                time_steps(device, opts.warmup, opts.steps, |s| {
                    let n = layout.len();
                    let (g, _) = private_gradient_with(
                        model.as_ref(),
                        &examples,
                        None,
                        &all,
                        opts.batch,
                        n,
                        &mech,
                        &noise,
                        s,
                        how,
                    )?;
                    opt.step(&params, &g, lr)?;
                    model.set_trainable(&layout.split(&params)?)
                })?
            }
        };
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        results.push(VariantResult {
            variant: variant.clone(),
            median_step_ms: median * 1e3,
            min_step_ms: sorted[0] * 1e3,
            max_step_ms: sorted[sorted.len() - 1] * 1e3,
            examples_per_s: opts.batch as f64 / median,
            peak_memory_bytes: memory::peak(device)?,
        });
    }
    Ok(BenchReport {
        device: device_name.into(),
        model: model_name,
        base_dtype: format!("{:?}", opts.base_dtype).to_lowercase(),
        batch: opts.batch,
        seq_len: opts.seq_len,
        steps: opts.steps,
        warmup: opts.warmup,
        lora_rank: opts.lora_rank,
        targets,
        trainable_params: layout.len(),
        results,
    })
}

/// Peak GPU memory: the high-water mark of the device's default stream-ordered memory pool,
/// which candle's CUDA allocations come from. (cuBLAS workspaces are outside it, the same for
/// every variant.)
mod memory {
    use candle_core::{Device, Result};

    #[cfg(feature = "cuda")]
    fn pool(device: &Device) -> Result<Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Device::Cuda(d) = device else { return Ok(None) };
        device.synchronize()?;
        let ordinal = d.cuda_stream().context().ordinal() as i32;
        let mut dev = 0;
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver queries with out-pointers to live locals.
        unsafe {
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            check(sys::cuDeviceGetDefaultMemPool(&mut pool, dev), "cuDeviceGetDefaultMemPool")?;
        }
        Ok(Some(pool))
    }

    #[cfg(feature = "cuda")]
    fn check(r: candle_core::cuda_backend::cudarc::driver::sys::CUresult, what: &str) -> Result<()> {
        if r == candle_core::cuda_backend::cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            candle_core::bail!("{what} failed: {r:?}")
        }
    }

    #[cfg(feature = "cuda")]
    pub fn reset_peak(device: &Device) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        if let Some(pool) = pool(device)? {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH takes a u64; resetting it to 0 restarts the high-water mark.
            unsafe {
                check(
                    sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut std::ffi::c_void,
                    ),
                    "cuMemPoolSetAttribute",
                )?;
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    pub fn peak(device: &Device) -> Result<Option<u64>> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Some(pool) = pool(device)? else { return Ok(None) };
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a u64 attribute.
        unsafe {
            check(
                sys::cuMemPoolGetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                ),
                "cuMemPoolGetAttribute",
            )?;
        }
        Ok(Some(v))
    }

    #[cfg(not(feature = "cuda"))]
    pub fn reset_peak(_device: &Device) -> Result<()> {
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    pub fn peak(_device: &Device) -> Result<Option<u64>> {
        Ok(None)
    }
}
