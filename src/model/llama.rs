//! Llama-family decoders (Llama, Mistral, Qwen2, SmolLM: RMSNorm, rotate-half RoPE, grouped-query
//! attention, SwiGLU MLP, optionally tied embeddings) with LoRA adapters, for causal language
//! modelling.
//!
//! Every op of the training forward is differentiable (see `ops`). Padding is on the right, the
//! causal mask keeps every real token from seeing later positions (so it never sees padding), and
//! padded keys are masked as well; the loss reads only the positions listed in the batch's
//! `LmTargets`, so padding and prompt tokens contribute nothing to any example's gradient. No op
//! mixes examples of a batch.

use super::ops::{add_const, log_softmax_last, mul_const, softmax_last};
use super::{DpModel, ModelError, Task};
use crate::data::Batch;
use crate::lora::{LoraAdapter, LoraLinear, Tape};
use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Module names a Llama layer exposes to LoRA (PEFT names).
pub const LLAMA_LORA_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn default_rope_theta() -> f64 {
    10_000.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> std::result::Result<LlamaConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|_| ModelError::MissingFile(path.into()))?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.into(),
            message: format!("not a Llama-family config: {e}"),
        })?;
        cfg.validate().map_err(|message| ModelError::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks what this implementation supports; every unsupported feature is named.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.model_type.as_deref() {
            Some(t) if super::LLAMA_MODEL_TYPES.contains(&t) => {}
            other => {
                return Err(format!(
                    "unsupported architecture {other:?}: this model family is {}",
                    super::LLAMA_MODEL_TYPES.join(", ")
                ))
            }
        }
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!("unsupported hidden_act `{act}` (supported: silu)"));
            }
        }
        if let Some(s) = &self.rope_scaling {
            if !s.is_null() {
                return Err(format!("unsupported rope_scaling {s} (only plain RoPE is implemented)"));
            }
        }
        if self.mlp_bias == Some(true) {
            return Err("unsupported mlp_bias = true".into());
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} is odd (rotate-half RoPE needs an even size)", self.head_dim()));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    /// q/k/v biases: Qwen2 always has them; Llama when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2") || self.attention_bias == Some(true)
    }

    /// Mistral-style sliding-window attention, when it is active.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_deref() {
            Some("qwen2") if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    /// The end-of-sequence token (the first one when config.json lists several).
    pub fn eos_token(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
            _ => None,
        }
    }
}

struct LlamaLayer {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
    input_norm: Tensor,
    post_norm: Tensor,
}

impl LlamaLayer {
    fn linears(&self) -> [&LoraLinear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }
    fn linears_mut(&mut self) -> [&mut LoraLinear; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

/// A Llama-family causal LM with LoRA adapters (no trainable head: the LM head stays frozen).
pub struct LlamaLm {
    pub config: LlamaConfig,
    /// [V, H] f32, for the input lookup.
    embed: Tensor,
    layers: Vec<LlamaLayer>,
    norm: Tensor,
    /// [V, H] frozen (the embedding itself when tied).
    lm_head: LoraLinear,
}

impl LlamaLm {
    /// Build from a weight source. LoRA A is drawn from `init_rng` (Kaiming-uniform, as PEFT);
    /// B starts at zero, so a fresh adapter gives exactly the base model.
    pub fn new(
        vb: VarBuilder,
        config: LlamaConfig,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let (h, f) = (config.hidden_size, config.intermediate_size);
        let (nh, nkv, hd) = (config.num_attention_heads, config.kv_heads(), config.head_dim());
        if let Some(spec) = lora {
            if let Some(bad) = spec.targets.iter().find(|t| !LLAMA_LORA_MODULES.contains(&t.as_str())) {
                candle_core::bail!(
                    "lora.target-modules: `{bad}` matches no linear layer of a Llama-family model (known: {})",
                    LLAMA_LORA_MODULES.join(", ")
                );
            }
            if let Some(bad) = spec.layers.iter().flatten().find(|&&l| l >= config.num_hidden_layers) {
                candle_core::bail!(
                    "lora.layers: layer {bad} does not exist (the model has {} layers)",
                    config.num_hidden_layers
                );
            }
        }
        let f32_get = |vb: &VarBuilder, shape: &[usize], name: &str| -> Result<Tensor> {
            vb.get(shape, name)?.to_dtype(DType::F32)
        };
        let mut lin =
            |vb: &VarBuilder, layer: usize, module: &str, out: usize, inp: usize, bias: bool| -> Result<LoraLinear> {
                let v = vb.pp(module);
                let adapter = match lora {
                    Some(spec)
                        if spec.targets.iter().any(|t| t == module)
                            && spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer)) =>
                    {
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f32> =
                            (0..spec.rank * inp).map(|_| init_rng.random_range(-bound..bound) as f32).collect();
                        Some(LoraAdapter {
                            a: Tensor::from_vec(a, (spec.rank, inp), vb.device())?,
                            b: Tensor::zeros((out, spec.rank), DType::F32, vb.device())?,
                            scale: spec.alpha / spec.rank as f64,
                        })
                    }
                    _ => None,
                };
                Ok(LoraLinear {
                    name: v.prefix().to_string(),
                    weight: v.get((out, inp), "weight")?,
                    bias: if bias { Some(f32_get(&v, &[out], "bias")?) } else { None },
                    adapter,
                })
            };
        let bias = config.qkv_bias();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("model.layers.{i}"));
            let att = l.pp("self_attn");
            let mlp = l.pp("mlp");
            layers.push(LlamaLayer {
                q: lin(&att, i, "q_proj", nh * hd, h, bias)?,
                k: lin(&att, i, "k_proj", nkv * hd, h, bias)?,
                v: lin(&att, i, "v_proj", nkv * hd, h, bias)?,
                o: lin(&att, i, "o_proj", h, nh * hd, false)?,
                gate: lin(&mlp, i, "gate_proj", f, h, false)?,
                up: lin(&mlp, i, "up_proj", f, h, false)?,
                down: lin(&mlp, i, "down_proj", h, f, false)?,
                input_norm: f32_get(&l, &[h], "input_layernorm.weight")?,
                post_norm: f32_get(&l, &[h], "post_attention_layernorm.weight")?,
            });
        }
        let embed_raw = vb.get((config.vocab_size, h), "model.embed_tokens.weight")?;
        let head_weight =
            if config.tied() { embed_raw.clone() } else { vb.get((config.vocab_size, h), "lm_head.weight")? };
        Ok(LlamaLm {
            embed: embed_raw.to_dtype(DType::F32)?,
            layers,
            norm: f32_get(&vb, &[h], "model.norm.weight")?,
            lm_head: LoraLinear { name: "lm_head".into(), weight: head_weight, bias: None, adapter: None },
            config,
        })
    }

    /// Load from a Hugging Face folder: config.json and model.safetensors, or the shards listed
    /// in model.safetensors.index.json. Frozen linear weights are kept in `base_dtype`.
    pub fn load(
        dir: &Path,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
        device: &Device,
        base_dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        if !matches!(base_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::Config {
                path: dir.into(),
                message: format!("base weights must be f32, bf16 or f16, not {base_dtype:?}"),
            });
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        super::check_weight_dtypes(&files)?;
        // SAFETY: the files are memory-mapped read-only; dptrain never writes to a model folder.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, base_dtype, device)? };
        Self::new(vb, config, lora, init_rng).map_err(|e| ModelError::Tensor {
            file: files[0].clone(),
            name: "(see message)".into(),
            message: e.to_string(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn all_linears(&self) -> Vec<&LoraLinear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    /// Input embeddings [b, T, H].
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        self.embed.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))
    }

    /// Hidden states [b, T, H] after running `layers` on `x` (the input of the first of them).
    /// `mask` [b, T] is 1 for real tokens, 0 for padding.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        mask: &Tensor,
        layers: std::ops::Range<usize>,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let cfg = &self.config;
        if let Some(w) = cfg.window() {
            if t > w {
                candle_core::bail!("sequence length {t} exceeds the sliding window {w} (not implemented)");
            }
        }
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let (cos, sin) = rope_tables(t, hd, cfg.rope_theta, x.device())?;
        let bias = attention_bias(mask)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers[layers] {
            let hn = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let heads =
                |y: Tensor, n: usize| -> Result<Tensor> { y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
            let q = rope(&heads(layer.q.forward(&hn, tape.as_deref_mut())?, nh)?, &cos, &sin)?;
            let k = rope(&heads(layer.k.forward(&hn, tape.as_deref_mut())?, nkv)?, &cos, &sin)?;
            let v = heads(layer.v.forward(&hn, tape.as_deref_mut())?, nkv)?;
            let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
            let scores = add_const(&(q.matmul(&k.t()?)? * scale)?, &bias)?;
            let ctx = softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            // o(ctx) + x (x is a constant in the lowest adapted layer: no gradient computed for it).
            x = add_const(&layer.o.forward(&ctx, tape.as_deref_mut())?, &x)?;
            let hn = rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps)?;
            let gate = layer.gate.forward(&hn, tape.as_deref_mut())?.silu()?;
            let up = layer.up.forward(&hn, tape.as_deref_mut())?;
            x = (x + layer.down.forward(&(gate * up)?, tape.as_deref_mut())?)?;
        }
        Ok(x)
    }

    /// Final hidden states [b, T, H] (after the last norm).
    pub fn hidden(&self, input_ids: &Tensor, mask: &Tensor, tape: Option<&mut Tape>) -> Result<Tensor> {
        let x = self.run_layers(self.embed(input_ids)?, mask, 0..self.layers.len(), tape)?;
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Vocabulary logits [.., V] of hidden states [.., H].
    pub fn logits_of(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden, None)
    }

    /// Logits [b, T, V] at every position of unpadded sequences (`input_ids` [b, T], no padding).
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let mask = input_ids.ones_like()?.to_dtype(DType::F32)?;
        self.logits_of(&self.hidden(input_ids, &mask, None)?)
    }

    /// Next-token NLL [n] at the batch's target positions (natural log), starting from the
    /// batch's cached hidden states when it has them.
    pub fn target_nll(&self, batch: &Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        let lm = batch
            .lm
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("batch has no language-modelling targets".into()))?;
        let (x, start) = match &batch.hidden {
            Some((start, x)) => {
                if *start > self.first_adapted_layer() {
                    candle_core::bail!("cached features at layer {start} skip adapted layers below it");
                }
                (x.clone(), *start)
            }
            None => (self.embed(&batch.input_ids)?, 0),
        };
        let x = self.run_layers(x, &batch.attention_mask, start..self.layers.len(), tape)?;
        let x = rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
        let (b, t, h) = x.dims3()?;
        // Only the target positions go through the (large) LM head.
        let rows = x.reshape((b * t, h))?.index_select(&lm.positions, 0)?;
        let logp = log_softmax_last(&self.logits_of(&rows)?)?;
        logp.gather(&lm.targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    /// Greedy continuation of `prompt` by `n` tokens (no sampling; each step re-runs the whole
    /// sequence, which is exact and cheap enough for a sanity look).
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let input = Tensor::new(ids.as_slice(), self.embed.device())?.unsqueeze(0)?;
            let mask = input.ones_like()?.to_dtype(DType::F32)?;
            let h = self.hidden(&input, &mask, None)?;
            let last = h.i((0, ids.len() - 1))?.unsqueeze(0)?;
            let next = self.logits_of(&last)?.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }

    /// Frozen linear weights in `dtype` (f32, bf16 or f16).
    pub fn with_base_dtype(mut self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("base weights must be f32, bf16 or f16, not {dtype:?}");
        }
        for l in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            l.weight = l.weight.to_dtype(dtype)?;
        }
        self.lm_head.weight = self.lm_head.weight.to_dtype(dtype)?;
        Ok(self)
    }
}

/// The safetensors files of a model folder: model.safetensors, or the shards of
/// model.safetensors.index.json.
pub fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| ModelError::MissingFile(single.clone()))?;
    let bad = |message: String| ModelError::Config { path: index.clone(), message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or_else(|| bad("a weight_map value is not a file name".into()))?;
        if f.contains('/') || f.contains("..") {
            return Err(bad(format!("shard `{f}` is not a plain file name in the model folder")));
        }
        if !files.iter().any(|g| g == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if paths.is_empty() {
        return Err(bad("weight_map lists no shards".into()));
    }
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        return Err(ModelError::MissingFile(missing.clone()));
    }
    Ok(paths)
}

impl DpModel for LlamaLm {
    fn device(&self) -> &Device {
        self.embed.device()
    }
    fn base_dtype(&self) -> DType {
        self.lm_head.weight.dtype()
    }
    fn adapted_layers(&self) -> Vec<&LoraLinear> {
        self.all_linears().into_iter().filter(|l| l.adapter.is_some()).collect()
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        crate::lora::adapter_tensors(&self.adapted_layers())
    }
    fn set_trainable(&mut self, tensors: &[Tensor]) -> Result<()> {
        let expected = self.trainable();
        crate::lora::check_shapes(&expected, tensors)?;
        let mut it = tensors.iter();
        for l in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            if let Some(ad) = l.adapter.as_mut() {
                ad.a = it.next().expect("checked").clone();
                ad.b = it.next().expect("checked").clone();
            }
        }
        Ok(())
    }
    fn example_losses(&self, batch: &Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        let nll = self.target_nll(batch, tape)?;
        let lm = batch.lm.as_ref().expect("target_nll checked");
        // Each example's mean over its own targets: [b, n] · [n, 1].
        lm.weights.matmul(&nll.unsqueeze(1)?)?.squeeze(1)
    }
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn first_adapted_layer(&self) -> usize {
        self.layers.iter().position(|l| l.linears().iter().any(|x| x.adapter.is_some())).unwrap_or(self.layers.len())
    }
    fn prefix_hidden(&self, batch: &Batch, upto: usize) -> Result<Tensor> {
        self.run_layers(self.embed(&batch.input_ids)?, &batch.attention_mask, 0..upto, None)
    }
    fn task(&self) -> Task {
        Task::CausalLm
    }
    fn score_examples(&self, examples: &[crate::data::Example], batch_size: usize) -> Result<Vec<super::ExampleScore>> {
        super::score::nll_per_example(self, examples, batch_size)
    }
}

/// RMSNorm over the last dimension, written out so that it is differentiable:
/// x / √(mean(x²) + eps) · w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    mul_const(&x.broadcast_div(&(ms + eps)?.sqrt()?)?, w)
}

/// cos and sin tables [T, d] of rotate-half RoPE (angles in f64, rounded to f32).
pub fn rope_tables(t: usize, d: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let (mut c, mut s) = (Vec::with_capacity(t * d), Vec::with_capacity(t * d));
    for pos in 0..t {
        for j in 0..d {
            let inv = theta.powf(-2.0 * (j % half) as f64 / d as f64);
            let a = pos as f64 * inv;
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(c, (t, d), device)?, Tensor::from_vec(s, (t, d), device)?))
}

/// x · cos + rotate_half(x) · sin on [b, heads, T, d], rotate_half(x) = (−x₂, x₁).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    mul_const(x, cos)? + mul_const(&rot, sin)?
}

/// [b, kv, T, d] → [b, kv · n, T, d]: query head j reads key/value head j / n.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n, t, d))?.contiguous()?.reshape((b, kv * n, t, d))
}

/// Additive attention bias [b, 1, T, T]: 0 where query i may read key j (j ≤ i and j is a real
/// token), −1e30 elsewhere (exp → exactly 0). Position 0 is always real, so no row is empty.
fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let causal: Vec<f32> = (0..t * t).map(|k| if k % t <= k / t { 0.0 } else { -1e30 }).collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), mask.device())?;
    let keys = ((mask.ones_like()? - mask)? * -1e30)?.reshape((b, 1, 1, t))?;
    causal.broadcast_add(&keys)
}

/// Random weights for a Llama of shape `cfg`, named as in a Hugging Face checkpoint (tests and
/// benchmarks).
pub fn random_weights(
    cfg: &LlamaConfig,
    rng: &mut ChaCha20Rng,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use super::bert::uniform_tensor;
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
    let mut w = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, rng: &mut ChaCha20Rng| -> Result<()> {
        w.insert(name, uniform_tensor(rng, shape, scale, device)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[cfg.vocab_size, h], 1.0, rng)?;
    if !cfg.tied() {
        put("lm_head.weight".into(), &[cfg.vocab_size, h], 0.5, rng)?;
    }
    put("model.norm.weight".into(), &[h], 1.0, rng)?;
    let s = 1.7 / (h as f32).sqrt();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (m, o, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            put(format!("{p}.{m}.weight"), &[o, inp], s, rng)?;
        }
        if cfg.qkv_bias() {
            for (m, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                put(format!("{p}.self_attn.{m}.bias"), &[o], 0.1, rng)?;
            }
        }
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0, rng)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, rng)?;
    }
    Ok(w)
}
