//! Llama-family decoders (Llama, Mistral, Qwen2, SmolLM: RMSNorm, rotate-half RoPE, grouped-query
//! attention, SwiGLU MLP, optionally tied embeddings) with LoRA adapters, for causal language
//! modelling.
//!
//! Every op of the training forward is differentiable (see `ops`). Padding is on the right, the
//! causal mask keeps every real token from seeing later positions (so it never sees padding), and
//! padded keys are masked as well; the loss reads only the positions listed in the batch's
//! `LmTargets`, so padding and prompt tokens contribute nothing to any example's gradient. No op
//! mixes examples of a batch.

use super::attention::{attention, attention_capped, Heads};
pub use super::fused_llama::{rms_norm, rope, swiglu};
use super::ops::add_const;
use super::{DpModel, ModelError, Task};
use crate::data::Batch;
use crate::lora::{FrozenWeight, LoraAdapter, LoraLinear, Tape};
use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha20Rng;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Module names a Llama layer exposes to LoRA (PEFT names).
pub const LLAMA_LORA_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Phi-3's linear layers (q, k, v fused into `qkv_proj`; gate and up into `gate_up_proj`), as
/// PEFT names them.
pub const PHI3_LORA_MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Keys of a Llama-family config.json known not to change dptrain's computation, beyond
/// `config_keys::IGNORED_KEYS` (see there).
pub const LLAMA_IGNORED_KEYS: &[(&str, &[&str])] = &[
    ("nanotron's marker of a config written in Llama form (SmolLM2); no setting", &["is_llama_config"]),
    (
        "Phi-3's original context length: read only by its longrope RoPE scaling, which is refused by name",
        &["original_max_position_embeddings"],
    ),
];

/// A Llama-family config.json. Every key is a field here (parsed and used or validated), or lands
/// in `other`, where `validate` accepts it only when it is known not to change the computation
/// (`config_keys`). RoPE settings come in two layouts that must give the same model: the older
/// Hub one (`rope_theta`, `rope_scaling`) and the one transformers 5 writes (`rope_parameters`:
/// {"rope_type": "default", "rope_theta": θ}); see [`LlamaConfig::rope_theta`].
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
    /// Older layout's θ (absent: `rope_parameters`' θ, else 10000, transformers' default).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// The trained context length: with plain RoPE it changes nothing that dptrain computes.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Older layout: null, or a scaled RoPE (refused unless its type is "default").
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 layout: {"rope_type": "default", "rope_theta": θ}; any other type is refused.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// nanotron's flag for interleaved RoPE pairs (SmolLM2 writes false); only false is implemented.
    #[serde(default)]
    pub rope_interleaved: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: the sliding window applies from this layer up. dptrain refuses any sequence longer
    /// than an active window (`run_layers`), where sliding and full attention agree.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Per-layer attention kind ("full_attention" or "sliding_attention"; Qwen2, transformers ≥ 4.53).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2/3: the MLP's activation (transformers reads this key for Gemma, not `hidden_act`).
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Gemma 2/3: attention scores are scaled by query_pre_attn_scalar^−½ (not head_dim^−½).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2/3: attention scores become c · tanh(scores / c) before the mask and softmax.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2/3: vocabulary logits become c · tanh(logits / c).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3, older layout: θ of the sliding-window layers' RoPE (plain, unscaled).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3, older layout: every `sliding_window_pattern`-th layer is global, the rest slide
    /// (transformers 5 writes `layer_types` and keeps the pattern as `_sliding_window_pattern`).
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default, rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_v5: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Every other key of config.json (checked by `validate`).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Llama 3.x's RoPE frequency scaling (`rope_type` "llama3"): the parameters transformers'
/// `_compute_llama3_parameters` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The RoPE a config describes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub llama3: Option<Llama3Scaling>,
    /// Linear position interpolation (`rope_type` "linear"): every frequency divided by this
    /// factor (Gemma 3's global layers, 4B and larger).
    pub linear: Option<f64>,
}

impl Rope {
    /// Plain RoPE with base θ.
    pub fn plain(theta: f64) -> Rope {
        Rope { theta, llama3: None, linear: None }
    }

    /// The d/2 inverse frequencies θ^(−2j/d), with Llama 3's scaling when configured: wavelengths
    /// (2π/f) above original/low_freq_factor are divided by `factor`, those below
    /// original/high_freq_factor kept, and those between interpolated with
    /// s = (original/wavelength − low) / (high − low): (1 − s)·f/factor + s·f. Linear scaling
    /// divides every frequency by its factor.
    pub fn inv_freqs(&self, d: usize) -> Vec<f64> {
        (0..d / 2)
            .map(|j| {
                let f = self.theta.powf(-2.0 * j as f64 / d as f64);
                let f = f / self.linear.unwrap_or(1.0);
                let Some(s) = self.llama3 else { return f };
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let (low, high) = (
                    s.original_max_position_embeddings / s.low_freq_factor,
                    s.original_max_position_embeddings / s.high_freq_factor,
                );
                if wavelen > low {
                    f / s.factor
                } else if wavelen < high {
                    f
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// What one RoPE settings object states.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RopeSettings {
    theta: Option<f64>,
    llama3: Option<Llama3Scaling>,
    linear: Option<f64>,
}

/// What a RoPE settings object (`rope_scaling` or `rope_parameters`, named `name`) states: its θ
/// if any, and Llama 3 or linear scaling if that is its type. Plain ("default"), "llama3" and
/// "linear" are implemented; anything else (another scaled type, an unknown field, per-layer-type
/// parameters where the architecture has one RoPE) is refused, naming it.
fn rope_settings(
    name: &str,
    p: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<RopeSettings, String> {
    let kind = p.get("rope_type").or_else(|| p.get("type"));
    let kind = match kind {
        Some(serde_json::Value::String(t)) => t.as_str(),
        Some(other) => return Err(format!("`{name}`: rope_type {other} is not a string")),
        None if p.values().any(|v| v.is_object()) => {
            let kinds: Vec<&str> = p.keys().map(|k| k.as_str()).collect();
            return Err(format!(
                "unsupported `{name}` with parameters per layer type ({}): only one RoPE for every \
                 layer is implemented for this architecture (per layer type: gemma3_text)",
                kinds.join(", ")
            ));
        }
        None => "default",
    };
    const LLAMA3_KEYS: [&str; 4] =
        ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"];
    let allowed = |k: &str, v: &serde_json::Value| {
        matches!(k, "rope_type" | "type" | "rope_theta")
            || (k == "partial_rotary_factor" && v.as_f64() == Some(1.0))
            || (kind == "llama3" && LLAMA3_KEYS.contains(&k))
            || (kind == "linear" && k == "factor")
    };
    if !matches!(kind, "default" | "llama3" | "linear") {
        return Err(format!(
            "unsupported {name} with rope_type `{kind}` (implemented: default, llama3, linear): {}",
            serde_json::Value::Object(p.clone())
        ));
    }
    if let Some(k) = p.iter().find(|(k, v)| !allowed(k, v)).map(|(k, _)| k) {
        return Err(format!("unsupported `{name}.{k}` for rope_type `{kind}`"));
    }
    let number = |k: &str| -> std::result::Result<f64, String> {
        match p.get(k) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("`{name}.{k}` is {v}, not a positive number")),
            None => Err(format!("`{name}` of rope_type `{kind}` lacks `{k}`")),
        }
    };
    let llama3 = if kind == "llama3" {
        let s = Llama3Scaling {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        };
        if s.high_freq_factor <= s.low_freq_factor {
            return Err(format!("`{name}`: high_freq_factor must exceed low_freq_factor"));
        }
        Some(s)
    } else {
        None
    };
    let linear = if kind == "linear" { Some(number("factor")?) } else { None };
    let theta = match p.get("rope_theta") {
        None => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| format!("`{name}.rope_theta` is {v}, not a number"))?),
    };
    Ok(RopeSettings { theta, llama3, linear })
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> std::result::Result<LlamaConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|_| ModelError::MissingFile(path.into()))?;
        Self::from_json(&text).map_err(|message| ModelError::Config { path: path.into(), message })
    }

    /// Parses and validates the text of a config.json.
    pub fn from_json(text: &str) -> std::result::Result<LlamaConfig, String> {
        let cfg: LlamaConfig = serde_json::from_str(text).map_err(|e| format!("not a Llama-family config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The RoPE, from either layout: θ from `rope_theta` at the top level or from
    /// `rope_parameters` {"rope_type": …, "rope_theta": θ, …} as transformers 5 writes it (also
    /// accepted inside `rope_scaling`); Llama 3 or linear scaling from `rope_scaling` (older
    /// layout) or `rope_parameters` (transformers 5). Where several state θ, or several state a
    /// scaling, they must agree; where none states θ, θ = 10000 (transformers' default). For
    /// Gemma 3 this is the RoPE of its full-attention layers (see `rope_for`).
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        self.rope_for(false)
    }

    /// The RoPE of a full-attention (`sliding` false) or a sliding-window layer. Only Gemma 3 has
    /// two: its sliding layers use plain RoPE with θ = `rope_local_base_freq` (older layout,
    /// default 10000) or `rope_parameters.sliding_attention` (transformers 5), its full layers
    /// `rope_theta` and `rope_scaling`, or `rope_parameters.full_attention`. Every other
    /// architecture has one RoPE for all layers.
    pub fn rope_for(&self, sliding: bool) -> std::result::Result<Rope, String> {
        let two = self.is_gemma3();
        let mut stated: Vec<(String, f64)> = Vec::new();
        let mut objects: Vec<(String, &serde_json::Map<String, serde_json::Value>)> = Vec::new();
        let object = |name: &str, v: &'_ Option<serde_json::Value>| -> std::result::Result<_, String> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Object(p)) => Ok(Some(p.clone())),
                Some(other) => Err(format!("`{name}` is {other}, not an object")),
            }
        };
        let scaling = object("rope_scaling", &self.rope_scaling)?;
        let params = object("rope_parameters", &self.rope_parameters)?;
        let per_type = two && params.as_ref().is_some_and(|p| p.values().any(|v| v.is_object()));
        let kind = if sliding { "sliding_attention" } else { "full_attention" };
        if two && sliding {
            if let Some(t) = self.rope_local_base_freq {
                stated.push(("rope_local_base_freq".into(), t));
            }
        } else {
            if let Some(t) = self.rope_theta {
                stated.push(("rope_theta".into(), t));
            }
            if let Some(p) = &scaling {
                objects.push(("rope_scaling".into(), p));
            }
        }
        let typed;
        match &params {
            Some(p) if per_type => {
                if let Some(k) = p.keys().find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention")) {
                    return Err(format!("`rope_parameters.{k}`: not a layer type of gemma3_text"));
                }
                typed = match p.get(kind) {
                    Some(serde_json::Value::Object(q)) => q.clone(),
                    _ => return Err(format!("`rope_parameters` has no `{kind}` object")),
                };
                objects.push((format!("rope_parameters.{kind}"), &typed));
            }
            // A single object for both of Gemma 3's layer types would be ambiguous: refused.
            Some(_) if two => {
                return Err("gemma3_text: `rope_parameters` must give full_attention and sliding_attention".into())
            }
            Some(p) => objects.push(("rope_parameters".into(), p)),
            None => {}
        }
        let mut scalings: Vec<(String, RopeSettings)> = Vec::new();
        for (name, p) in objects {
            let s = rope_settings(&name, p)?;
            if let Some(t) = s.theta {
                stated.push((format!("{name}.rope_theta"), t));
            }
            if s.llama3.is_some() || s.linear.is_some() {
                scalings.push((name, s));
            }
        }
        let theta = stated.first().map_or(10_000.0, |s| s.1);
        if let Some((name, t)) = stated.iter().find(|s| s.1 != theta) {
            return Err(format!("`{}` = {theta} and `{name}` = {t} disagree", stated[0].0));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("RoPE theta {theta} is not a positive number"));
        }
        if let [(a, x), (b, y)] = scalings.as_slice() {
            if (x.llama3, x.linear) != (y.llama3, y.linear) {
                return Err(format!("the RoPE scalings of `{a}` and `{b}` disagree"));
            }
        }
        let first = scalings.first().map(|s| s.1);
        Ok(Rope { theta, llama3: first.and_then(|s| s.llama3), linear: first.and_then(|s| s.linear) })
    }

    /// θ of the RoPE (`rope`).
    pub fn rope_theta(&self) -> std::result::Result<f64, String> {
        self.rope().map(|r| r.theta)
    }

    /// Checks what this implementation supports; every unsupported feature, and every key that is
    /// neither understood nor known not to matter, is named.
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
        super::config_keys::check_other_keys(&self.other, LLAMA_IGNORED_KEYS, "Llama-family")?;
        if self.is_gemma() {
            // transformers' Gemma 2/3 MLP reads `hidden_activation` (default gelu_pytorch_tanh);
            // a `hidden_act` beside it must say the same, so that no reader is misled.
            for (key, act) in [("hidden_activation", &self.hidden_activation), ("hidden_act", &self.hidden_act)] {
                if let Some(a) = act.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
                    return Err(format!("unsupported {key} `{a}` for Gemma (supported: gelu_pytorch_tanh)"));
                }
            }
            for (key, v) in [
                ("query_pre_attn_scalar", self.query_pre_attn_scalar),
                ("attn_logit_softcapping", self.attn_logit_softcapping),
                ("final_logit_softcapping", self.final_logit_softcapping),
            ] {
                if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
                    return Err(format!("`{key}` is {x}, not a positive number"));
                }
            }
            if self.window().is_none() {
                return Err("Gemma: no `sliding_window` is set for its sliding-window layers".into());
            }
        } else {
            if let Some(act) = self.hidden_act.as_deref() {
                if act != "silu" {
                    return Err(format!("unsupported hidden_act `{act}` (supported: silu)"));
                }
            }
            for (key, set) in [
                ("hidden_activation", self.hidden_activation.is_some()),
                ("query_pre_attn_scalar", self.query_pre_attn_scalar.is_some()),
                ("attn_logit_softcapping", self.attn_logit_softcapping.is_some()),
                ("final_logit_softcapping", self.final_logit_softcapping.is_some()),
            ] {
                if set {
                    return Err(format!("unsupported `{key}` for model_type {:?} (a Gemma setting)", self.model_type));
                }
            }
        }
        if !self.is_gemma3()
            && (self.rope_local_base_freq.is_some()
                || self.sliding_window_pattern.is_some()
                || self.sliding_window_pattern_v5.is_some())
        {
            return Err(format!(
                "unsupported `rope_local_base_freq` / `sliding_window_pattern` for model_type {:?} (Gemma 3 settings)",
                self.model_type
            ));
        }
        if let Some(p) = self.sliding_window_pattern.or(self.sliding_window_pattern_v5).filter(|&p| p == 0) {
            return Err(format!("sliding_window_pattern {p} must be at least 1"));
        }
        self.rope()?;
        if self.is_gemma3() {
            self.rope_for(true)?;
        }
        if self.rope_interleaved == Some(true) {
            return Err("unsupported rope_interleaved = true (dptrain implements rotate-half RoPE)".into());
        }
        if self.mlp_bias == Some(true) {
            return Err("unsupported mlp_bias = true".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types lists {} layers, the model has {}",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
                return Err(format!(
                    "unsupported layer type `{t}` in layer_types (supported: full_attention, sliding_attention)"
                ));
            }
            if types.iter().any(|t| t == "sliding_attention") && self.window().is_none() {
                return Err("layer_types has sliding_attention layers but no sliding window is set".into());
            }
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

    /// Tied input and output embeddings (Gemma's default is tied, every other family's untied,
    /// as in transformers).
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(self.is_gemma())
    }

    /// Gemma 2 or 3 (text): (1 + w) RMSNorms, also around the attention and MLP outputs;
    /// GeGLU (tanh GELU) MLP; embeddings scaled by √hidden; query_pre_attn_scalar; soft-capping.
    pub fn is_gemma(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("gemma2" | "gemma3_text"))
    }

    /// Gemma 3 (text): Gemma 2 plus q/k norms and a second RoPE for the sliding-window layers.
    pub fn is_gemma3(&self) -> bool {
        self.model_type.as_deref() == Some("gemma3_text")
    }

    /// Which layers use sliding-window attention: `layer_types` where given; else Gemma 2's
    /// alternation (even layers slide), Gemma 3's pattern (every `sliding_window_pattern`-th
    /// layer, default 6, is global), and every layer when another family sets an active window.
    pub fn sliding_layers(&self) -> Vec<bool> {
        let n = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            return types.iter().map(|t| t == "sliding_attention").collect();
        }
        match self.model_type.as_deref() {
            Some("gemma2") => (0..n).map(|i| i % 2 == 0).collect(),
            Some("gemma3_text") => {
                let p = self.sliding_window_pattern.or(self.sliding_window_pattern_v5).unwrap_or(6);
                (0..n).map(|i| (i + 1) % p != 0).collect()
            }
            _ => vec![self.window().is_some(); n],
        }
    }

    /// The factor on attention scores: query_pre_attn_scalar^−½ (Gemma), else head_dim^−½.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64).sqrt()
    }

    /// q/k/v biases: Qwen2 always has them; Llama when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2") || self.attention_bias == Some(true)
    }

    /// Phi-3: q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj`.
    pub fn fused_projections(&self) -> bool {
        self.model_type.as_deref() == Some("phi3")
    }

    /// LoRA targets when the config names none: PEFT's defaults (query and value; Phi-3's fused
    /// `qkv_proj`).
    pub fn default_lora_targets(&self) -> Vec<String> {
        let t: &[&str] = if self.fused_projections() { &["qkv_proj"] } else { &["q_proj", "v_proj"] };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// Qwen3's and Gemma 3's per-head RMSNorm of queries and keys (`self_attn.q_norm` / `k_norm`).
    pub fn qk_norm(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("qwen3" | "gemma3_text"))
    }

    /// An o_proj bias: Llama's and Qwen3's `attention_bias` puts one on all four attention
    /// projections (transformers' LlamaAttention, Qwen3Attention); Qwen2's fixed q/k/v biases
    /// leave o_proj without.
    pub fn o_bias(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("llama" | "qwen3")) && self.attention_bias == Some(true)
    }

    /// Mistral-style sliding-window attention, when it is active.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_deref() {
            Some("qwen2" | "qwen3") if self.use_sliding_window != Some(true) => None,
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
    /// The linear layers in forward order: q, k, v, o, gate, up, down; or, fused (Phi-3),
    /// qkv, o, gate_up, down.
    lin: Vec<LoraLinear>,
    fused: bool,
    input_norm: Tensor,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    post_norm: Tensor,
    /// Gemma: norms of the attention's and the MLP's outputs before each residual add (its
    /// `post_attention_layernorm` and `post_feedforward_layernorm`).
    attn_out_norm: Option<Tensor>,
    ff_out_norm: Option<Tensor>,
    /// Qwen3, Gemma 3: RMSNorm of every query / key head (weight [head_dim]) before RoPE.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Sliding-window attention (with its own RoPE in Gemma 3).
    sliding: bool,
}

impl LlamaLayer {
    fn linears(&self) -> &[LoraLinear] {
        &self.lin
    }
    fn linears_mut(&mut self) -> &mut [LoraLinear] {
        &mut self.lin
    }
}

/// A Llama-family causal LM with LoRA adapters (no trainable head: the LM head stays frozen).
pub struct LlamaLm {
    pub config: LlamaConfig,
    /// [V, H] f32, or GGML blocks with `model.quantize-vocab`, for the input lookup.
    embed: FrozenWeight,
    layers: Vec<LlamaLayer>,
    norm: Tensor,
    /// [V, H] frozen (the embedding itself when tied, blocks included).
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
        Self::new_with_base(vb, config, lora, init_rng, DType::F32.into())
    }

    /// `new`, with the decoder's linear weights quantized to `base.quant` and the embedding and
    /// head to `base.quant_vocab` as they are read (`vb` gives the rest, in its own dtype).
    pub fn new_with_base(
        vb: VarBuilder,
        config: LlamaConfig,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
        base: super::quant::BaseFormat,
    ) -> Result<Self> {
        let source = vb.clone();
        Self::new_with_quant_source(vb, &source, config, lora, init_rng, base)
    }

    /// `new_with_base`, with the weights to be quantized read from `source` instead of `vb` (e.g.
    /// a CPU source for a GPU model, so that no f32 copy of them is ever made on the device).
    pub fn new_with_quant_source(
        vb: VarBuilder,
        source: &VarBuilder,
        config: LlamaConfig,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
        base: super::quant::BaseFormat,
    ) -> Result<Self> {
        Self::build(vb, source, config, lora, init_rng, base, Default::default())
    }

    /// `new_with_base` (`base.quant` for the decoder's linear weights, `base.quant_vocab` for the
    /// embedding and head; `base.dtype` is `vb`'s), with the linear weights named in `stored` (HF
    /// name → GGML blocks, from a folder's `model::quant::STORED_FILE`) taken as they are; every
    /// stored tensor must be used. The weights to be quantized are read from `source` (any device,
    /// any dtype: `quant::quantize_weight` converts a chunk of rows at a time), the rest from `vb`.
    fn build(
        vb: VarBuilder,
        source: &VarBuilder,
        config: LlamaConfig,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
        base: super::quant::BaseFormat,
        mut stored: std::collections::BTreeMap<String, std::sync::Arc<candle_core::quantized::QTensor>>,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let (h, f) = (config.hidden_size, config.intermediate_size);
        let (nh, nkv, hd) = (config.num_attention_heads, config.kv_heads(), config.head_dim());
        if let Some(spec) = lora {
            let known: &[&str] = if config.fused_projections() { &PHI3_LORA_MODULES } else { &LLAMA_LORA_MODULES };
            if let Some(bad) = spec.targets.iter().find(|t| !known.contains(&t.as_str())) {
                candle_core::bail!(
                    "lora.target-modules: `{bad}` matches no linear layer of a Llama-family model ({}; known: {})",
                    config.model_type.as_deref().unwrap_or("no model_type"),
                    known.join(", ")
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
        let mut lin = |vb: &VarBuilder,
                       layer: usize,
                       module: &str,
                       out: usize,
                       inp: usize,
                       bias: bool|
         -> Result<LoraLinear> {
            let v = vb.pp(module);
            let adapter = match lora {
                Some(spec)
                    if spec.targets.iter().any(|t| t == module)
                        && spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer)) =>
                {
                    Some(LoraAdapter::init(spec, out, inp, init_rng, vb.device())?)
                }
                _ => None,
            };
            let name = v.prefix().to_string();
            let weight = if let Some(q) = stored.remove(&format!("{name}.weight")) {
                if q.shape().dims() != [out, inp] {
                    candle_core::bail!(
                        "{}: {name}.weight has shape {:?}, the model needs [{out}, {inp}]",
                        super::quant::STORED_FILE,
                        q.shape().dims()
                    );
                }
                FrozenWeight::Quantized(q)
            } else {
                match base.quant {
                    None => v.get((out, inp), "weight")?.into(),
                    Some(q) => {
                        let weight = source.get((out, inp), &format!("{name}.weight"))?;
                        FrozenWeight::Quantized(super::quant::quantize_weight(&weight, q, &name, vb.device())?)
                    }
                }
            };
            Ok(LoraLinear { name, weight, bias: if bias { Some(f32_get(&v, &[out], "bias")?) } else { None }, adapter })
        };
        // RMSNorm weights as the forward multiplies by them: Gemma's norms scale by (1 + w).
        let gemma = config.is_gemma();
        let norm = |vb: &VarBuilder, n: usize, name: &str| -> Result<Tensor> {
            let w = f32_get(vb, &[n], name)?;
            if gemma {
                w + 1.0
            } else {
                Ok(w)
            }
        };
        let bias = config.qkv_bias();
        let sliding = config.sliding_layers();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (i, &slides) in sliding.iter().enumerate() {
            let l = vb.pp(format!("model.layers.{i}"));
            let att = l.pp("self_attn");
            let mlp = l.pp("mlp");
            let fused = config.fused_projections();
            let lin_layers = if fused {
                vec![
                    lin(&att, i, "qkv_proj", (nh + 2 * nkv) * hd, h, bias)?,
                    lin(&att, i, "o_proj", h, nh * hd, config.o_bias())?,
                    lin(&mlp, i, "gate_up_proj", 2 * f, h, false)?,
                    lin(&mlp, i, "down_proj", h, f, false)?,
                ]
            } else {
                vec![
                    lin(&att, i, "q_proj", nh * hd, h, bias)?,
                    lin(&att, i, "k_proj", nkv * hd, h, bias)?,
                    lin(&att, i, "v_proj", nkv * hd, h, bias)?,
                    lin(&att, i, "o_proj", h, nh * hd, config.o_bias())?,
                    lin(&mlp, i, "gate_proj", f, h, false)?,
                    lin(&mlp, i, "up_proj", f, h, false)?,
                    lin(&mlp, i, "down_proj", h, f, false)?,
                ]
            };
            let (post_norm, attn_out_norm, ff_out_norm) = if gemma {
                (
                    norm(&l, h, "pre_feedforward_layernorm.weight")?,
                    Some(norm(&l, h, "post_attention_layernorm.weight")?),
                    Some(norm(&l, h, "post_feedforward_layernorm.weight")?),
                )
            } else {
                (norm(&l, h, "post_attention_layernorm.weight")?, None, None)
            };
            layers.push(LlamaLayer {
                lin: lin_layers,
                fused,
                input_norm: norm(&l, h, "input_layernorm.weight")?,
                post_norm,
                attn_out_norm,
                ff_out_norm,
                q_norm: if config.qk_norm() { Some(norm(&att, hd, "q_norm.weight")?) } else { None },
                k_norm: if config.qk_norm() { Some(norm(&att, hd, "k_norm.weight")?) } else { None },
                sliding: slides,
            });
        }
        let v = config.vocab_size;
        let mut stored_vocab = |name: &str| -> Result<Option<std::sync::Arc<candle_core::quantized::QTensor>>> {
            let Some(q) = stored.remove(name) else { return Ok(None) };
            if q.shape().dims() != [v, h] {
                candle_core::bail!(
                    "{}: {name} has shape {:?}, the model needs [{v}, {h}]",
                    super::quant::STORED_FILE,
                    q.shape().dims()
                );
            }
            if base.quant_vocab.is_some() {
                candle_core::bail!(
                    "{} holds {name} as blocks already: leave model.quantize-vocab unset",
                    super::quant::STORED_FILE
                );
            }
            Ok(Some(q))
        };
        let stored_embed = stored_vocab("model.embed_tokens.weight")?;
        let stored_head = if config.tied() { None } else { stored_vocab("lm_head.weight")? };
        if !stored.is_empty() {
            let names: Vec<&str> = stored.keys().map(String::as_str).collect();
            candle_core::bail!(
                "{} holds tensors that are not linear weights of this model's decoder layers, its embedding or its untied head: {}",
                super::quant::STORED_FILE,
                names.join(", ")
            );
        }
        // Blocks from the folder's stored file are taken as they are; a tied head is the embedding.
        let dense_head = |vb: &VarBuilder| vb.get((v, h), "lm_head.weight");
        let (embed, head_weight) = match (stored_embed, base.quant_vocab) {
            (Some(e), _) => {
                let head = match stored_head {
                    _ if config.tied() => FrozenWeight::Quantized(e.clone()),
                    Some(q) => FrozenWeight::Quantized(q),
                    None => FrozenWeight::Dense(dense_head(&vb)?),
                };
                (FrozenWeight::Quantized(e), head)
            }
            (None, None) => {
                let embed_raw = vb.get((v, h), "model.embed_tokens.weight")?;
                let head = match stored_head {
                    _ if config.tied() => FrozenWeight::Dense(embed_raw.clone()),
                    Some(q) => FrozenWeight::Quantized(q),
                    None => FrozenWeight::Dense(dense_head(&vb)?),
                };
                (FrozenWeight::Dense(embed_raw.to_dtype(DType::F32)?), head)
            }
            // One set of blocks for a tied pair: the lookup and the head read the same values.
            (None, Some(q)) => {
                let quantize = |name: &str, what: &str| -> Result<std::sync::Arc<candle_core::quantized::QTensor>> {
                    super::quant::quantize_weight(&source.get((v, h), name)?, q, what, vb.device())
                };
                let embed = quantize("model.embed_tokens.weight", "model.embed_tokens")?;
                let head = if config.tied() { embed.clone() } else { quantize("lm_head.weight", "lm_head")? };
                (FrozenWeight::Quantized(embed), FrozenWeight::Quantized(head))
            }
        };
        Ok(LlamaLm {
            embed,
            layers,
            norm: norm(&vb, h, "model.norm.weight")?,
            lm_head: LoraLinear { name: "lm_head".into(), weight: head_weight, bias: None, adapter: None },
            config,
        })
    }

    /// Load from a Hugging Face folder: config.json and model.safetensors, or the shards listed
    /// in model.safetensors.index.json. Frozen linear weights are kept in `base.dtype`, or with
    /// `base.quant` quantized as they are read (everything else then in f32).
    pub fn load(
        dir: &Path,
        lora: Option<&crate::lora::LoraSpec>,
        init_rng: &mut ChaCha20Rng,
        device: &Device,
        base: impl Into<super::quant::BaseFormat>,
    ) -> std::result::Result<Self, ModelError> {
        let base = base.into();
        let bad_dtype = !matches!(base.dtype, DType::F32 | DType::BF16 | DType::F16);
        if bad_dtype || (base.is_quantized() && base.dtype != DType::F32) {
            return Err(ModelError::Config {
                path: dir.into(),
                message: if bad_dtype {
                    format!("base weights must be f32, bf16 or f16, not {:?}", base.dtype)
                } else {
                    format!(
                        "quantized base weights are dequantized to f32, so the dtype must be f32, not {:?}",
                        base.dtype
                    )
                },
            });
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        super::check_weight_dtypes(&files)?;
        let stored = match super::quant::stored_file(dir) {
            None => Default::default(),
            Some(file) => {
                let conflict = if base.quant.is_some() {
                    Some("leave model.quantize unset (the blocks are used as they are, never re-quantized)")
                } else if base.dtype != DType::F32 {
                    Some("its products run in f32: leave model.dtype unset or f32")
                } else {
                    None
                };
                if let Some(why) = conflict {
                    return Err(ModelError::Config {
                        path: dir.into(),
                        message: format!(
                            "the folder holds quantized linear weights ({}, from dptrain convert --keep-quantized): {why}",
                            super::quant::STORED_FILE
                        ),
                    });
                }
                super::quant::read_stored(dir, device)
                    .map_err(|e| ModelError::Load { file: file.clone(), message: e.to_string() })?
            }
        };
        // SAFETY: the files are memory-mapped read-only; dptrain never writes to a model folder.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, base.dtype, device)? };
        // The weights to be quantized are read on the CPU in their stored dtype, so neither a
        // whole f32 copy nor (on a GPU) a device copy of them is ever made.
        let source = if base.is_quantized() { unsafe { super::quant::as_stored_source(&files)? } } else { vb.clone() };
        Self::build(vb, &source, config, lora, init_rng, base, stored)
            .map_err(|e| ModelError::Load { file: files[0].clone(), message: e.to_string() })
    }

    /// Every quantized frozen weight (the embedding and head included) replaced by its f32
    /// dequantization (dense): the model a quantized one must compute exactly (the slow twin of
    /// `model::quant`'s products, lookups and vocabulary NLL).
    pub fn dequantize_base(&mut self) -> Result<()> {
        for l in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            l.weight = FrozenWeight::Dense(l.weight.dequantized()?);
        }
        self.embed = FrozenWeight::Dense(self.embed.dequantized()?);
        self.lm_head.weight = FrozenWeight::Dense(self.lm_head.weight.dequantized()?);
        Ok(())
    }

    /// Bytes of the embedding and the LM head as stored (a tied pair counted once).
    pub fn vocab_weight_bytes(&self) -> usize {
        self.embed.storage_bytes() + if self.config.tied() { 0 } else { self.lm_head.weight.storage_bytes() }
    }

    /// Bytes of the frozen linear weights of the decoder layers as stored.
    pub fn layer_weight_bytes(&self) -> usize {
        self.all_linears().iter().map(|l| l.weight.storage_bytes()).sum()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every frozen weight matrix with its checkpoint name: the decoder's linear weights, the
    /// embedding and (untied) the LM head.
    pub fn frozen_weights(&self) -> Vec<(String, &FrozenWeight)> {
        let mut w: Vec<(String, &FrozenWeight)> =
            self.all_linears().into_iter().map(|l| (format!("{}.weight", l.name), &l.weight)).collect();
        w.push(("model.embed_tokens.weight".into(), &self.embed));
        if !self.config.tied() {
            w.push(("lm_head.weight".into(), &self.lm_head.weight));
        }
        w
    }

    fn all_linears(&self) -> Vec<&LoraLinear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    /// Input embeddings [b, T, H].
    /// Gemma scales them by √hidden (in f32, the precision dptrain computes in).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let rows = match &self.embed {
            FrozenWeight::Dense(e) => e.index_select(&ids, 0)?,
            FrozenWeight::Quantized(q) => {
                super::quant::gather_rows(q, &ids.to_dtype(DType::U32)?.to_vec1::<u32>()?, self.device())?
            }
        };
        let x = rows.reshape((b, t, self.config.hidden_size))?;
        if self.config.is_gemma() {
            x * (self.config.hidden_size as f32).sqrt() as f64
        } else {
            Ok(x)
        }
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
        // RoPE tables per layer kind (Gemma 3's sliding layers have their own).
        let table = |sliding: bool| -> Result<(Tensor, Tensor)> {
            let spec = cfg.rope_for(sliding).map_err(candle_core::Error::Msg)?;
            rope_tables_of(t, hd, &spec.inv_freqs(hd), x.device())
        };
        let full = table(false)?;
        let local = if cfg.is_gemma3() { Some(table(true)?) } else { None };
        let bias = attention_bias(mask)?;
        let scale = cfg.attention_scale();
        let heads = Heads { query: nh, kv: nkv, dim: hd };
        for layer in &self.layers[layers] {
            let (cos, sin) = match &local {
                Some(tables) if layer.sliding => (&tables.0, &tables.1),
                _ => (&full.0, &full.1),
            };
            let hn = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            // RoPE on [b, T, heads, d] (the projection's own layout), back to [b, T, heads · d].
            // Qwen3 first normalises every head (RMSNorm over its head_dim).
            let rotated = |y: Tensor, n: usize, norm: Option<&Tensor>| -> Result<Tensor> {
                let y = y.reshape((b, t, n, hd))?;
                let y = match norm {
                    Some(w) => rms_norm(&y, w, cfg.rms_norm_eps)?,
                    None => y,
                };
                rope(&y, cos, sin)?.reshape((b, t, n * hd))
            };
            let l = &layer.lin;
            let (q, k, v) = if layer.fused {
                // Phi-3's qkv_proj: the query heads, then the key heads, then the value heads.
                let y = l[0].forward(&hn, tape.as_deref_mut())?;
                let part = |start: usize, len: usize| y.narrow(D::Minus1, start, len)?.contiguous();
                (part(0, nh * hd)?, part(nh * hd, nkv * hd)?, part((nh + nkv) * hd, nkv * hd)?)
            } else {
                let q = l[0].forward(&hn, tape.as_deref_mut())?;
                let k = l[1].forward(&hn, tape.as_deref_mut())?;
                (q, k, l[2].forward(&hn, tape.as_deref_mut())?)
            };
            let q = rotated(q, nh, layer.q_norm.as_ref())?;
            let k = rotated(k, nkv, layer.k_norm.as_ref())?;
            let ctx = match cfg.attn_logit_softcapping {
                Some(cap) => attention_capped(&q, &k, &v, &bias, heads, scale, Some(cap))?,
                None => attention(&q, &k, &v, &bias, heads, scale)?,
            };
            let (o, down) = (if layer.fused { &l[1] } else { &l[3] }, &l[l.len() - 1]);
            let mut y = o.forward(&ctx, tape.as_deref_mut())?;
            if let Some(w) = &layer.attn_out_norm {
                y = rms_norm(&y, w, cfg.rms_norm_eps)?;
            }
            // o(ctx) + x (x is a constant in the lowest adapted layer: no gradient computed for it).
            x = add_const(&y, &x)?;
            let hn = rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps)?;
            let (gate, up) = if layer.fused {
                // Phi-3's gate_up_proj: the gate half, then the up half.
                let y = l[2].forward(&hn, tape.as_deref_mut())?;
                let f = cfg.intermediate_size;
                (y.narrow(D::Minus1, 0, f)?.contiguous()?, y.narrow(D::Minus1, f, f)?.contiguous()?)
            } else {
                let gate = l[4].forward(&hn, tape.as_deref_mut())?;
                (gate, l[5].forward(&hn, tape.as_deref_mut())?)
            };
            let act = if cfg.is_gemma() { geglu_tanh(&gate, &up)? } else { swiglu(&gate, &up)? };
            let mut y = down.forward(&act, tape.as_deref_mut())?;
            if let Some(w) = &layer.ff_out_norm {
                y = rms_norm(&y, w, cfg.rms_norm_eps)?;
            }
            x = (x + y)?;
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
        let logits = self.lm_head.forward(hidden, None)?;
        match self.config.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
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
        // The head is frozen and never adapted (`new`); the NLL op takes its weight alone.
        if self.lm_head.adapter.is_some() || self.lm_head.bias.is_some() {
            candle_core::bail!("the LM head has an adapter or a bias, which the vocabulary NLL does not apply");
        }
        super::vocab::vocab_nll_frozen(&rows, &self.lm_head.weight, &lm.targets, self.config.final_logit_softcapping)
    }

    /// Greedy continuation of `prompt` by `n` tokens (no sampling; each step re-runs the whole
    /// sequence, which is exact and cheap enough for a sanity look).
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let input = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
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
        self.norm.device()
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

/// cos and sin tables [T, d] of plain rotate-half RoPE with base θ.
pub fn rope_tables(t: usize, d: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    rope_tables_of(t, d, &Rope::plain(theta).inv_freqs(d), device)
}

/// cos and sin tables [T, d] of rotate-half RoPE with the d/2 inverse frequencies `inv` (angles in
/// f64, rounded to f32).
pub fn rope_tables_of(t: usize, d: usize, inv: &[f64], device: &Device) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    if inv.len() != half {
        candle_core::bail!("RoPE: {} inverse frequencies for head dimension {d}", inv.len());
    }
    let (mut c, mut s) = (Vec::with_capacity(t * d), Vec::with_capacity(t * d));
    for pos in 0..t {
        for j in 0..d {
            let a = pos as f64 * inv[j % half];
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(c, (t, d), device)?, Tensor::from_vec(s, (t, d), device)?))
}

/// c · tanh(x / c) (Gemma's soft-capping of attention scores and logits), differentiable.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// gelu_tanh(gate) · up (Gemma's GeGLU MLP, transformers' `gelu_pytorch_tanh`), from candle's
/// differentiable ops (candle's `gelu` is the tanh approximation).
pub fn geglu_tanh(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.gelu()? * up
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

/// The tensors of a Llama checkpoint of shape `cfg` (Hugging Face names), each with the scale of
/// its uniform random values, in the order `random_weights` draws them.
fn random_weight_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, f32)> {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
    let mut w = Vec::new();
    let mut put = |name: String, shape: &[usize], scale: f32| w.push((name, shape.to_vec(), scale));
    put("model.embed_tokens.weight".into(), &[cfg.vocab_size, h], 1.0);
    if !cfg.tied() {
        put("lm_head.weight".into(), &[cfg.vocab_size, h], 0.5);
    }
    put("model.norm.weight".into(), &[h], 1.0);
    let s = 1.7 / (h as f32).sqrt();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let separate = [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ];
        let fused = [
            ("self_attn.qkv_proj", q + 2 * kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_up_proj", 2 * f, h),
            ("mlp.down_proj", h, f),
        ];
        let linears: &[(&str, usize, usize)] = if cfg.fused_projections() { &fused } else { &separate };
        for &(m, o, inp) in linears {
            put(format!("{p}.{m}.weight"), &[o, inp], s);
        }
        if cfg.qkv_bias() {
            for (m, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                put(format!("{p}.self_attn.{m}.bias"), &[o], 0.1);
            }
        }
        if cfg.o_bias() {
            put(format!("{p}.self_attn.o_proj.bias"), &[h], 0.1);
        }
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
        if cfg.is_gemma() {
            put(format!("{p}.pre_feedforward_layernorm.weight"), &[h], 1.0);
            put(format!("{p}.post_feedforward_layernorm.weight"), &[h], 1.0);
        }
        if cfg.qk_norm() {
            put(format!("{p}.self_attn.q_norm.weight"), &[cfg.head_dim()], 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), &[cfg.head_dim()], 1.0);
        }
    }
    w
}

/// Random weights for a Llama of shape `cfg`, named as in a Hugging Face checkpoint (tests and
/// benchmarks).
pub fn random_weights(
    cfg: &LlamaConfig,
    rng: &mut ChaCha20Rng,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    random_weight_specs(cfg)
        .into_iter()
        .map(|(name, shape, scale)| Ok((name, super::bert::uniform_tensor(rng, &shape, scale, device)?)))
        .collect()
}

/// Random weights for a Llama of shape `cfg` made only when the model reads them (each tensor
/// from its own ChaCha20 stream of `seed`, the same values on every read and on every device), so
/// that nothing holds the whole f32 model while a quantized one is built (`dptrain bench --shape
/// … --quantize`: an 8B-shaped f32 model is 32 GB, its q4_k blocks 4 GB).
pub struct LazyRandomWeights {
    specs: std::collections::HashMap<String, (Vec<usize>, f32, u64)>,
    seed: u64,
}

impl LazyRandomWeights {
    pub fn new(cfg: &LlamaConfig, seed: u64) -> Self {
        let specs = random_weight_specs(cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape, scale))| (name, (shape, scale, i as u64)))
            .collect();
        LazyRandomWeights { specs, seed }
    }

    fn make(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        use rand::SeedableRng;
        let Some((shape, scale, stream)) = self.specs.get(name) else {
            candle_core::bail!("random weights: a Llama of this shape has no tensor {name}")
        };
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        rng.set_stream(*stream);
        super::bert::uniform_tensor(&mut rng, shape, *scale, dev)?.to_dtype(dtype)
    }
}

impl candle_nn::var_builder::SimpleBackend for LazyRandomWeights {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.make(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("random weights: {name} has shape {:?}, asked for {:?}", t.shape(), s);
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.make(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }
}

/// gemma-2-2b's config.json as the Hub has it (older layout, no `layer_types`): the
/// `gemma-2-2b` shape of `dptrain bench` and the reference of the config tests.
pub const GEMMA2_2B_HUB_CONFIG: &str = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false,
  "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
  "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
  "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
  "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
  "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
  "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": true,
  "vocab_size": 256000}"#;

/// gemma-3-1b's config.json as the Hub has it (older layout): the `gemma-3-1b` shape of
/// `dptrain bench` and the reference of the config tests.
pub const GEMMA3_1B_HUB_CONFIG: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
  "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2,
  "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": null,
  "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
  "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
  "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
  "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
  "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
  "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
  "use_cache": true, "vocab_size": 262144}"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-0.5B's config.json as on the Hub (transformers 4.x layout: top-level `rope_theta`).
    pub(crate) const QWEN2_OLD: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
      "use_sliding_window": false, "vocab_size": 151936
    }"#;

    /// The same model saved by transformers 5: `rope_parameters`, `dtype`, `layer_types`, no
    /// top-level `rope_theta` or `rope_scaling`.
    fn qwen2_v5() -> String {
        let layer_types = serde_json::json!(vec!["full_attention"; 24]);
        format!(
            r#"{{
          "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
          "dtype": "bfloat16", "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
          "initializer_range": 0.02, "intermediate_size": 4864, "layer_types": {layer_types},
          "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "pad_token_id": null,
          "rms_norm_eps": 1e-06, "rope_parameters": {{"rope_theta": 1000000.0, "rope_type": "default"}},
          "sliding_window": null, "tie_word_embeddings": true, "transformers_version": "5.0.0",
          "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
        }}"#
        )
    }

    /// SmolLM2-135M-Instruct's config.json as on the Hub (written by nanotron).
    const SMOLLM2_HUB: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
      "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
      "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
    }"#;

    /// Llama-3.2-1B's settings in both layouts (llama3-scaled RoPE).
    fn llama3(v5: bool) -> String {
        let scaling = r#"{"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3""#;
        let rope = if v5 {
            format!(r#""rope_parameters": {scaling}, "rope_theta": 500000.0}}"#)
        } else {
            format!(r#""rope_scaling": {scaling}}}, "rope_theta": 500000.0"#)
        };
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, {rope}, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": true,
            "vocab_size": 128256}}"#
        )
    }

    /// Everything of a config that the computation reads.
    fn effective(c: &LlamaConfig) -> String {
        format!(
            "{:?} V{} H{} F{} L{} heads {}/{} hd{} eps{} θ{:?} tied {} bias {}/{} window {:?} eos {:?} act {:?}",
            c.model_type,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.kv_heads(),
            c.head_dim(),
            c.rms_norm_eps,
            c.rope_theta(),
            c.tied(),
            c.qkv_bias(),
            c.o_bias(),
            c.window(),
            c.eos_token(),
            c.hidden_act
        )
    }

    /// With one key replaced (`None`: removed).
    fn with(text: &str, key: &str, value: Option<serde_json::Value>) -> String {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        let m = v.as_object_mut().unwrap();
        match value {
            Some(x) => m.insert(key.into(), x),
            None => m.remove(key),
        };
        v.to_string()
    }

    #[test]
    fn older_hub_and_transformers5_layouts_give_the_same_config() {
        let old = LlamaConfig::from_json(QWEN2_OLD).unwrap();
        let new = LlamaConfig::from_json(&qwen2_v5()).unwrap();
        assert_eq!(old.rope_theta(), Ok(1e6));
        assert_eq!(new.rope_theta(), Ok(1e6));
        assert_eq!(effective(&old), effective(&new));
        // Both layouts at once are fine when they agree, an error naming both when they do not.
        let both = with(&qwen2_v5(), "rope_theta", Some(1e6.into()));
        assert_eq!(LlamaConfig::from_json(&both).unwrap().rope_theta(), Ok(1e6));
        let e = LlamaConfig::from_json(&with(&qwen2_v5(), "rope_theta", Some(1e4.into()))).unwrap_err();
        assert!(
            e.contains("`rope_theta`") && e.contains("`rope_parameters.rope_theta`") && e.contains("disagree"),
            "{e}"
        );
        // A `rope_scaling` of type "default" is plain RoPE too; `rope_scaling: null` is nothing.
        let default_scaling = with(QWEN2_OLD, "rope_scaling", Some(serde_json::json!({"rope_type": "default"})));
        assert_eq!(LlamaConfig::from_json(&default_scaling).unwrap().rope_theta(), Ok(1e6));
        let null_scaling = with(QWEN2_OLD, "rope_scaling", Some(serde_json::Value::Null));
        assert_eq!(LlamaConfig::from_json(&null_scaling).unwrap().rope_theta(), Ok(1e6));
        // Neither layout: transformers' default.
        assert_eq!(LlamaConfig::from_json(&with(QWEN2_OLD, "rope_theta", None)).unwrap().rope_theta(), Ok(1e4));
    }

    #[test]
    fn hub_and_converted_smollm2_configs_load() {
        let hub = LlamaConfig::from_json(SMOLLM2_HUB).unwrap();
        assert_eq!((hub.rope_theta(), hub.kv_heads(), hub.head_dim(), hub.eos_token()), (Ok(1e5), 3, 64, Some(2)));
        let e = LlamaConfig::from_json(&with(SMOLLM2_HUB, "rope_interleaved", Some(true.into()))).unwrap_err();
        assert!(e.contains("rope_interleaved"), "{e}");
        let converted = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct/config.json");
        if converted.exists() {
            // (rms_norm_eps differs: the GGUF stores it as f32.)
            let c = LlamaConfig::from_file(&converted).unwrap();
            let shape = |c: &LlamaConfig| {
                (c.rope_theta(), c.kv_heads(), c.head_dim(), c.tied(), c.num_hidden_layers, c.vocab_size, c.eos_token())
            };
            assert_eq!(shape(&c), shape(&hub), "converted vs Hub config");
        } else {
            eprintln!("skipping the converted config: {} not there (scripts/fetch-assets.sh)", converted.display());
        }
    }

    #[test]
    fn llama3_rope_reads_the_same_from_both_layouts_and_is_checked() {
        let (old, new) =
            (LlamaConfig::from_json(&llama3(false)).unwrap(), LlamaConfig::from_json(&llama3(true)).unwrap());
        let want = Rope {
            theta: 500_000.0,
            llama3: Some(Llama3Scaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            linear: None,
        };
        assert_eq!((old.rope(), new.rope()), (Ok(want), Ok(want)));
        // Both layouts in one file must agree; a missing or extra field is named.
        let mut both: serde_json::Value = serde_json::from_str(&llama3(true)).unwrap();
        both["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(LlamaConfig::from_json(&both.to_string()).unwrap_err().contains("disagree"));
        let mut missing: serde_json::Value = serde_json::from_str(&llama3(true)).unwrap();
        missing["rope_parameters"].as_object_mut().unwrap().remove("low_freq_factor");
        assert!(LlamaConfig::from_json(&missing.to_string()).unwrap_err().contains("lacks `low_freq_factor`"));
        let mut extra: serde_json::Value = serde_json::from_str(&llama3(false)).unwrap();
        extra["rope_scaling"]["beta_fast"] = 32.into();
        assert!(LlamaConfig::from_json(&extra.to_string()).unwrap_err().contains("`rope_scaling.beta_fast`"));
    }

    #[test]
    fn other_scaled_rope_is_refused_in_both_layouts_naming_the_rope_type() {
        for v5 in [false, true] {
            let mut c: serde_json::Value = serde_json::from_str(&llama3(v5)).unwrap();
            let key = if v5 { "rope_parameters" } else { "rope_scaling" };
            c[key]["rope_type"] = "yarn".into();
            let e = LlamaConfig::from_json(&c.to_string()).unwrap_err();
            assert!(
                e.contains(key) && e.contains("`yarn`") && e.contains("implemented: default, llama3, linear"),
                "{e}"
            );
        }
        // The legacy `type` spelling (linear scaling is implemented: every frequency ÷ factor;
        // dynamic is not), and a "default" type with a scaling field.
        let linear = with(QWEN2_OLD, "rope_scaling", Some(serde_json::json!({"type": "linear", "factor": 2.0})));
        assert_eq!(LlamaConfig::from_json(&linear).unwrap().rope().unwrap().linear, Some(2.0));
        let dynamic = with(QWEN2_OLD, "rope_scaling", Some(serde_json::json!({"type": "dynamic", "factor": 2.0})));
        assert!(LlamaConfig::from_json(&dynamic).unwrap_err().contains("`dynamic`"));
        let extra = with(
            &qwen2_v5(),
            "rope_parameters",
            Some(serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "factor": 2.0})),
        );
        assert!(LlamaConfig::from_json(&extra).unwrap_err().contains("`rope_parameters.factor`"));
        // Rotating every dimension is plain RoPE; rotating a part is not.
        let partial = |f: f64| {
            let p = serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": f});
            LlamaConfig::from_json(&with(&qwen2_v5(), "rope_parameters", Some(p)))
        };
        assert_eq!(partial(1.0).unwrap().rope_theta(), Ok(1e6));
        assert!(partial(0.5).unwrap_err().contains("`rope_parameters.partial_rotary_factor`"));
        // Gemma 3's per-layer-type map.
        let per_layer = with(
            &qwen2_v5(),
            "rope_parameters",
            Some(serde_json::json!({
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}
            })),
        );
        let e = LlamaConfig::from_json(&per_layer).unwrap_err();
        assert!(e.contains("per layer type") && e.contains("full_attention"), "{e}");
    }

    #[test]
    fn unknown_keys_and_unsupported_layer_types_are_refused_naming_them() {
        let e = LlamaConfig::from_json(&with(QWEN2_OLD, "foo_scaling", Some(2.into()))).unwrap_err();
        assert!(e.contains("`foo_scaling`"), "{e}");
        let q = with(QWEN2_OLD, "quantization_config", Some(serde_json::json!({"quant_method": "awq"})));
        assert!(LlamaConfig::from_json(&q).unwrap_err().contains("`quantization_config`"));
        let sliding = with(&qwen2_v5(), "layer_types", Some(serde_json::json!(vec!["sliding_attention"; 24])));
        assert!(LlamaConfig::from_json(&sliding).unwrap_err().contains("no sliding window"));
        let short = with(&qwen2_v5(), "layer_types", Some(serde_json::json!(["full_attention"])));
        assert!(LlamaConfig::from_json(&short).unwrap_err().contains("layer_types lists 1"));
        // A config built in code is held to the same rules when a model is built from it.
        let mut c = LlamaConfig::from_json(QWEN2_OLD).unwrap();
        c.other.insert("foo_scaling".into(), 2.into());
        assert!(c.validate().unwrap_err().contains("`foo_scaling`"));
    }

    #[test]
    fn gemma_hub_configs_read_their_layer_kinds_ropes_scale_and_tied_head() {
        let g2 = LlamaConfig::from_json(GEMMA2_2B_HUB_CONFIG).unwrap();
        assert!(g2.is_gemma() && !g2.is_gemma3() && g2.tied() && !g2.qk_norm());
        // Gemma 2 alternates, starting with a sliding layer.
        let kinds = g2.sliding_layers();
        assert!(kinds.iter().enumerate().all(|(i, &s)| s == (i % 2 == 0)) && kinds.len() == 26);
        assert_eq!((g2.attention_scale(), g2.window()), (1.0 / 16.0, Some(4096)));
        assert_eq!(g2.rope(), Ok(Rope::plain(10_000.0)));
        let g3 = LlamaConfig::from_json(GEMMA3_1B_HUB_CONFIG).unwrap();
        assert!(g3.is_gemma3() && g3.tied() && g3.qk_norm());
        let globals: Vec<usize> = (0..26).filter(|&i| !g3.sliding_layers()[i]).collect();
        assert_eq!(globals, [5, 11, 17, 23]);
        assert_eq!((g3.rope_for(false), g3.rope_for(true)), (Ok(Rope::plain(1e6)), Ok(Rope::plain(1e4))));
        // Gemma 3 4B's text model: linear scaling on the global layers only.
        let g3_4b =
            with(GEMMA3_1B_HUB_CONFIG, "rope_scaling", Some(serde_json::json!({"rope_type": "linear", "factor": 8.0})));
        let c = LlamaConfig::from_json(&g3_4b).unwrap();
        assert_eq!(c.rope_for(false), Ok(Rope { theta: 1e6, llama3: None, linear: Some(8.0) }));
        assert_eq!(c.rope_for(true), Ok(Rope::plain(1e4)));
        assert_eq!(Rope { theta: 1e4, llama3: None, linear: Some(8.0) }.inv_freqs(4), [1.0 / 8.0, 1e-2 / 8.0]);
        // transformers 5's layout of the same settings reads the same.
        let mut v5: serde_json::Value = serde_json::from_str(&g3_4b).unwrap();
        for k in ["rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern"] {
            v5.as_object_mut().unwrap().remove(k);
        }
        v5["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}});
        v5["_sliding_window_pattern"] = 6.into();
        let c5 = LlamaConfig::from_json(&v5.to_string()).unwrap();
        assert_eq!((c5.rope_for(false), c5.rope_for(true)), (c.rope_for(false), c.rope_for(true)));
        assert_eq!(c5.sliding_layers(), c.sliding_layers());
    }

    #[test]
    fn gemma_settings_elsewhere_and_unsupported_gemma_options_are_refused_naming_them() {
        let refused = |text: String, want: &str| {
            let e = LlamaConfig::from_json(&text).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        refused(with(GEMMA2_2B_HUB_CONFIG, "hidden_activation", Some("gelu".into())), "hidden_activation `gelu`");
        refused(with(GEMMA2_2B_HUB_CONFIG, "hidden_act", Some("silu".into())), "hidden_act `silu`");
        refused(with(GEMMA2_2B_HUB_CONFIG, "sliding_window", None), "sliding_window");
        refused(
            with(GEMMA2_2B_HUB_CONFIG, "use_bidirectional_attention", Some(true.into())),
            "use_bidirectional_attention",
        );
        refused(with(GEMMA2_2B_HUB_CONFIG, "rope_local_base_freq", Some(10.0.into())), "rope_local_base_freq");
        refused(with(GEMMA2_2B_HUB_CONFIG, "attn_logit_softcapping", Some(0.0.into())), "attn_logit_softcapping");
        refused(with(SMOLLM2_HUB, "final_logit_softcapping", Some(30.0.into())), "final_logit_softcapping");
        refused(with(SMOLLM2_HUB, "query_pre_attn_scalar", Some(256.into())), "query_pre_attn_scalar");
        // Gemma 3 in transformers 5's layout needs both layer types' RoPE.
        let one = serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}});
        refused(with(GEMMA3_1B_HUB_CONFIG, "rope_parameters", Some(one)), "no `sliding_attention`");
        let flat = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        refused(with(GEMMA3_1B_HUB_CONFIG, "rope_parameters", Some(flat)), "full_attention and sliding_attention");
        // Other architectures still refuse per-layer-type RoPE.
        let per_type = serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}});
        refused(with(SMOLLM2_HUB, "rope_parameters", Some(per_type)), "per layer type");
    }
}
