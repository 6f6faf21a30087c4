//! BERT-family encoder (BERT, MiniLM) with LoRA adapters and a mean-pooling classification head.
//!
//! Every op in the forward is differentiable (see `ops`), the attention mask sends padded keys
//! to probability exactly 0 and mean pooling ignores padded positions, so padding contributes
//! nothing to any example's output or gradient. No op mixes examples of a batch.

use super::attention::{attention, Heads};
use super::ops::{add_const, gelu_erf, layer_norm, mul_const};
use super::ModelError;
use crate::lora::{linear_nd, HeadRecord, LoraAdapter, LoraLinear, Tape};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use serde::Deserialize;
use std::path::Path;

/// Keys of a BERT config.json known not to change dptrain's computation, beyond
/// `config_keys::IGNORED_KEYS` (see there).
pub const BERT_IGNORED_KEYS: &[(&str, &[&str])] = &[(
    "BERT's pooler and pre-training heads: dptrain mean-pools the last hidden states into its own \
         head and never runs the pooler or the masked-LM head (whose tying this is)",
    &[
        "pooler_fc_size",
        "pooler_num_attention_heads",
        "pooler_num_fc_layers",
        "pooler_size_per_head",
        "pooler_type",
        "tie_word_embeddings",
    ],
)];

/// A BERT config.json. Every key is a field here (parsed and used or validated), or lands in
/// `other`, where `validate` accepts it only when it is known not to change the computation
/// (`config_keys`).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// Only "absolute" (learned position embeddings) is implemented.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// RoBERTa / XLM-R: the padding id, which also sets where positions start (its index + 1).
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// Every other key of config.json (checked by `validate`).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> std::result::Result<BertConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|_| ModelError::MissingFile(path.into()))?;
        Self::from_json(&text).map_err(|message| ModelError::Config { path: path.into(), message })
    }

    /// Parses and validates the text of a config.json. A DistilBERT config (`dim`, `n_layers`,
    /// `n_heads`, `hidden_dim`, `activation`) is read into the same fields, with no token types
    /// and transformers' fixed LayerNorm eps of 1e-12.
    pub fn from_json(text: &str) -> std::result::Result<BertConfig, String> {
        let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not a BERT config: {e}"))?;
        if v["model_type"] == "distilbert" {
            let m = v.as_object_mut().ok_or("not a JSON object")?;
            for (from, to) in [
                ("dim", "hidden_size"),
                ("n_layers", "num_hidden_layers"),
                ("n_heads", "num_attention_heads"),
                ("hidden_dim", "intermediate_size"),
                ("activation", "hidden_act"),
            ] {
                if m.contains_key(to) {
                    return Err(format!("a DistilBERT config with `{to}` as well as `{from}`"));
                }
                if let Some(x) = m.remove(from) {
                    m.insert(to.into(), x);
                }
            }
            for (k, x) in [("type_vocab_size", 0.into()), ("layer_norm_eps", 1e-12.into())] {
                if m.insert(k.into(), x).is_some() {
                    return Err(format!("a DistilBERT config with `{k}`"));
                }
            }
            // The position table is in the weights either way, but a sinusoidal one has not been
            // checked here.
            match m.remove("sinusoidal_pos_embds") {
                None | Some(serde_json::Value::Bool(false)) => {}
                Some(x) => {
                    return Err(format!("unsupported sinusoidal_pos_embds = {x} (only learned positions are checked)"))
                }
            }
        }
        let cfg: BertConfig = serde_json::from_value(v).map_err(|e| format!("not a BERT config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// DistilBERT (its own weight and module names, no token types).
    pub fn is_distilbert(&self) -> bool {
        self.model_type.as_deref() == Some("distilbert")
    }

    /// Checks what this implementation supports; every unsupported feature, and every key that is
    /// neither understood nor known not to matter, is named.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.model_type.as_deref() {
            Some(t) if super::BERT_MODEL_TYPES.contains(&t) => {}
            other => {
                return Err(format!(
                    "unsupported architecture {other:?}: this model family is {}",
                    super::BERT_MODEL_TYPES.join(", ")
                ))
            }
        }
        super::config_keys::check_other_keys(&self.other, BERT_IGNORED_KEYS, "BERT")?;
        if self.hidden_act != "gelu" {
            return Err(format!("unsupported hidden_act `{}` (supported: gelu)", self.hidden_act));
        }
        if let Some(p) = self.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(format!("unsupported position_embedding_type `{p}` (supported: absolute)"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if self.position_offset() >= self.max_position_embeddings {
            return Err(format!(
                "positions start at {} (pad_token_id + 1) but there are only {} position embeddings",
                self.position_offset(),
                self.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// The position index of the first token: 0 for BERT; pad_token_id + 1 for RoBERTa and XLM-R,
    /// whose position ids count real tokens from there (transformers'
    /// `create_position_ids_from_input_ids`; padding, always on the right here, is masked out).
    pub fn position_offset(&self) -> usize {
        match self.model_type.as_deref() {
            Some("roberta" | "xlm-roberta") => self.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        }
    }
}

pub use super::{load_tokenizer, HEAD_MODULE};
pub use crate::lora::LoraSpec;

/// Module names a DistilBERT layer exposes to LoRA (PEFT's), each with the BERT name that is
/// accepted as its alias (so the same config and `dptrain init` recipe serve both).
pub const DISTILBERT_LORA_MODULES: [(&str, &str); 6] = [
    ("q_lin", "query"),
    ("k_lin", "key"),
    ("v_lin", "value"),
    ("out_lin", "attention.output.dense"),
    ("lin1", "intermediate.dense"),
    ("lin2", "output.dense"),
];

/// Where a BERT-family encoder keeps its layers' tensors: the layer prefix, the six linear
/// layers' paths and LoRA module names (query, key, value, attention output, intermediate,
/// output), and the two LayerNorms.
struct Layout {
    layer: &'static str,
    paths: [&'static str; 6],
    modules: [&'static str; 6],
    attn_ln: &'static str,
    out_ln: &'static str,
}

const BERT_LAYOUT: Layout = Layout {
    layer: "encoder.layer",
    paths: [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    modules: crate::config::BERT_LORA_MODULES,
    attn_ln: "attention.output.LayerNorm",
    out_ln: "output.LayerNorm",
};

const DISTILBERT_LAYOUT: Layout = Layout {
    layer: "transformer.layer",
    paths: ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"],
    modules: ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    attn_ln: "sa_layer_norm",
    out_ln: "output_layer_norm",
};

impl BertConfig {
    fn layout(&self) -> &'static Layout {
        if self.is_distilbert() {
            &DISTILBERT_LAYOUT
        } else {
            &BERT_LAYOUT
        }
    }

    /// The model's own LoRA module name for a configured target (DistilBERT also takes the BERT
    /// names), or `None` when it has no such module.
    pub fn lora_module(&self, target: &str) -> Option<&'static str> {
        let layout = self.layout();
        if let Some(m) = layout.modules.iter().find(|m| **m == target) {
            return Some(m);
        }
        if self.is_distilbert() {
            return DISTILBERT_LORA_MODULES.iter().find(|(_, bert)| *bert == target).map(|(m, _)| *m);
        }
        None
    }
}

struct BertLayer {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    attn_out: LoraLinear,
    attn_ln: (Tensor, Tensor),
    intermediate: LoraLinear,
    output: LoraLinear,
    out_ln: (Tensor, Tensor),
}

/// BERT encoder + LoRA + a trainable linear head on the mean-pooled last hidden state.
pub struct BertClassifier {
    pub config: BertConfig,
    word_emb: Tensor,
    pos_emb: Tensor,
    /// [types, H]; `None` for DistilBERT (no token types).
    type_emb: Option<Tensor>,
    emb_ln: (Tensor, Tensor),
    layers: Vec<BertLayer>,
    /// [C, H]
    pub head_w: Tensor,
    /// [C]
    pub head_b: Tensor,
}

impl BertClassifier {
    /// Build from a weight source. `lora = None` builds the plain encoder (no adapters).
    /// LoRA A is drawn from `init_rng` (Kaiming-uniform, as PEFT); B and the head start at zero.
    pub fn new(
        vb: VarBuilder,
        config: BertConfig,
        lora: Option<&LoraSpec>,
        num_labels: usize,
        init_rng: &mut ChaCha20Rng,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        let ln = |vb: VarBuilder| -> Result<(Tensor, Tensor)> { Ok((vb.get(h, "weight")?, vb.get(h, "bias")?)) };
        if let Some(bad) = lora.iter().flat_map(|s| &s.targets).find(|t| config.lora_module(t).is_none()) {
            let known: Vec<&str> = if config.is_distilbert() {
                DISTILBERT_LORA_MODULES.iter().flat_map(|(m, b)| [*m, *b]).collect()
            } else {
                crate::config::BERT_LORA_MODULES.to_vec()
            };
            candle_core::bail!(
                "lora.target-modules: `{bad}` matches no linear layer of a BERT-family model ({}; known: {})",
                config.model_type.as_deref().unwrap_or("no model_type"),
                known.join(", ")
            );
        }
        let targets: Vec<&'static str> =
            lora.iter().flat_map(|s| &s.targets).filter_map(|t| config.lora_module(t)).collect();
        let layout = config.layout();
        if let Some(layers) = lora.and_then(|s| s.layers.as_ref()) {
            if let Some(bad) = layers.iter().find(|&&l| l >= config.num_hidden_layers) {
                candle_core::bail!(
                    "lora.layers: layer {bad} does not exist (the model has {} layers)",
                    config.num_hidden_layers
                );
            }
        }
        let mut lin =
            |vb: &VarBuilder, layer: usize, path: &str, module: &str, out: usize, inp: usize| -> Result<LoraLinear> {
                let v = vb.pp(path);
                let name = v.prefix().to_string();
                let adapt = |spec: &LoraSpec| {
                    targets.contains(&module) && spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer))
                };
                let adapter = match lora {
                    Some(spec) if adapt(spec) => Some(LoraAdapter::init(spec, out, inp, init_rng, vb.device())?),
                    _ => None,
                };
                Ok(LoraLinear {
                    name,
                    weight: v.get((out, inp), "weight")?.into(),
                    bias: Some(v.get(out, "bias")?),
                    adapter,
                })
            };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("{}.{i}", layout.layer));
            let f = config.intermediate_size;
            let (p, m) = (&layout.paths, &layout.modules);
            layers.push(BertLayer {
                query: lin(&l, i, p[0], m[0], h, h)?,
                key: lin(&l, i, p[1], m[1], h, h)?,
                value: lin(&l, i, p[2], m[2], h, h)?,
                attn_out: lin(&l, i, p[3], m[3], h, h)?,
                attn_ln: ln(l.pp(layout.attn_ln))?,
                intermediate: lin(&l, i, p[4], m[4], f, h)?,
                output: lin(&l, i, p[5], m[5], h, f)?,
                out_ln: ln(l.pp(layout.out_ln))?,
            });
        }
        Ok(BertClassifier {
            word_emb: emb.get((config.vocab_size, h), "word_embeddings.weight")?,
            pos_emb: emb.get((config.max_position_embeddings, h), "position_embeddings.weight")?,
            type_emb: if config.type_vocab_size > 0 {
                Some(emb.get((config.type_vocab_size, h), "token_type_embeddings.weight")?)
            } else {
                None
            },
            emb_ln: ln(emb.pp("LayerNorm"))?,
            layers,
            head_w: Tensor::zeros((num_labels, h), DType::F32, vb.device())?,
            head_b: Tensor::zeros(num_labels, DType::F32, vb.device())?,
            config,
        })
    }

    /// Load from a Hugging Face folder (config.json + model.safetensors) onto `device`, weights
    /// in f32 (see `with_base_dtype` for bf16/f16 frozen weights).
    pub fn load(
        dir: &Path,
        lora: Option<&LoraSpec>,
        num_labels: usize,
        init_rng: &mut ChaCha20Rng,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        if let Some(f) = super::quant::stored_file(dir) {
            return Err(ModelError::Config {
                path: f,
                message:
                    "quantized base weights are implemented for the Llama family only (this is a BERT-family model)"
                        .into(),
            });
        }
        let st = dir.join("model.safetensors");
        if !st.exists() {
            return Err(ModelError::MissingFile(st));
        }
        super::check_weight_dtypes(std::slice::from_ref(&st))?;
        // SAFETY: the file is memory-mapped read-only; dptrain never writes to a model folder.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&st], DType::F32, device)? };
        // A task model's weights sit under the family's prefix (bert., roberta.); a bare encoder's
        // do not.
        let prefix = ["bert", "roberta", "distilbert"]
            .into_iter()
            .find(|p| vb.contains_tensor(&format!("{p}.embeddings.word_embeddings.weight")));
        let vb = match prefix {
            Some(p) => vb.pp(p),
            None => vb,
        };
        Self::new(vb, config, lora, num_labels, init_rng)
            .map_err(|e| ModelError::Load { file: st, message: e.to_string() })
    }

    pub fn device(&self) -> &Device {
        self.word_emb.device()
    }

    /// Stores the frozen linear weights (the bulk of the model) in `dtype` (f32, bf16 or f16).
    /// Their products run in that dtype and return f32; embeddings, layer norms, LoRA tensors, the
    /// head, per-example gradients, clipping and noise stay in f32.
    pub fn with_base_dtype(mut self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("base weights must be f32, bf16 or f16, not {dtype:?}");
        }
        for l in self.all_linears_mut() {
            l.weight = l.weight.to_dtype(dtype)?;
        }
        Ok(self)
    }

    /// The dtype of the frozen linear weights.
    pub fn base_dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, |l| l.query.weight.dtype())
    }

    /// The LoRA-adapted layers in forward order.
    pub fn adapted_layers(&self) -> Vec<&LoraLinear> {
        self.all_linears().into_iter().filter(|l| l.adapter.is_some()).collect()
    }

    fn all_linears(&self) -> Vec<&LoraLinear> {
        self.layers.iter().flat_map(|l| [&l.query, &l.key, &l.value, &l.attn_out, &l.intermediate, &l.output]).collect()
    }

    fn all_linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.intermediate, &mut l.output])
            .collect()
    }

    /// Trainable tensors in canonical order, with their PEFT names: for every adapted layer
    /// lora_A then lora_B, then the head's weight and bias.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut out = crate::lora::adapter_tensors(&self.adapted_layers());
        out.push((format!("base_model.model.{HEAD_MODULE}.weight"), self.head_w.clone()));
        out.push((format!("base_model.model.{HEAD_MODULE}.bias"), self.head_b.clone()));
        out
    }

    /// Replace the trainable tensors (same order and shapes as `trainable`).
    pub fn set_trainable(&mut self, tensors: &[Tensor]) -> Result<()> {
        crate::lora::check_shapes(&self.trainable(), tensors)?;
        let mut it = tensors.iter();
        for l in self.all_linears_mut() {
            if let Some(ad) = l.adapter.as_mut() {
                ad.a = it.next().expect("checked").clone();
                ad.b = it.next().expect("checked").clone();
            }
        }
        self.head_w = it.next().expect("checked").clone();
        self.head_b = it.next().expect("checked").clone();
        Ok(())
    }

    /// Index of the lowest layer with an adapter (the number of layers when none has one).
    /// Nothing below it is trainable, so its input is a fixed function of each record.
    pub fn first_adapted_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|l| {
                [&l.query, &l.key, &l.value, &l.attn_out, &l.intermediate, &l.output]
                    .iter()
                    .any(|x| x.adapter.is_some())
            })
            .unwrap_or(self.layers.len())
    }

    /// Embeddings (word + position + token type 0, layer-normed): [b, T, H].
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.config;
        let offset = cfg.position_offset();
        if t + offset > cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence length {t} exceeds the {} positions of max_position_embeddings {}",
                cfg.max_position_embeddings - offset,
                cfg.max_position_embeddings
            );
        }
        let h = cfg.hidden_size;
        let words = self.word_emb.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        let pos = self.pos_emb.narrow(0, offset, t)?;
        let mut x = words.broadcast_add(&pos)?;
        if let Some(types) = &self.type_emb {
            x = x.broadcast_add(&types.narrow(0, 0, 1)?)?;
        }
        layer_norm(&x, &self.emb_ln.0, &self.emb_ln.1, cfg.layer_norm_eps)
    }

    /// Last hidden state [b, T, H].
    pub fn encode(&self, input_ids: &Tensor, mask: &Tensor, tape: Option<&mut Tape>) -> Result<Tensor> {
        let x = self.embed(input_ids)?;
        self.run_layers(x, mask, 0..self.layers.len(), tape)
    }

    /// Hidden states [b, T, H] after running `layers` on `x` (the input of the first of them).
    pub fn run_layers(
        &self,
        mut x: Tensor,
        mask: &Tensor,
        layers: std::ops::Range<usize>,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let hd = h / nh;
        // Additive key mask [b, 1, 1, T]: 0 for real tokens, -1e30 for padding (exp → exactly 0).
        let bias = ((mask.ones_like()? - mask)? * -1e30)?.reshape((b, 1, 1, t))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = Heads { query: nh, kv: nh, dim: hd };
        for layer in &self.layers[layers] {
            let q = layer.query.forward(&x, tape.as_deref_mut())?;
            let k = layer.key.forward(&x, tape.as_deref_mut())?;
            let v = layer.value.forward(&x, tape.as_deref_mut())?;
            let ctx = attention(&q, &k, &v, &bias, heads, scale)?;
            let a = layer.attn_out.forward(&ctx, tape.as_deref_mut())?;
            // a + x (x is a constant in the lowest adapted layer: no gradient computed for it).
            let a = layer_norm(&add_const(&a, &x)?, &layer.attn_ln.0, &layer.attn_ln.1, cfg.layer_norm_eps)?;
            let f = gelu_erf(&layer.intermediate.forward(&a, tape.as_deref_mut())?)?;
            let o = layer.output.forward(&f, tape.as_deref_mut())?;
            x = layer_norm(&(o + &a)?, &layer.out_ln.0, &layer.out_ln.1, cfg.layer_norm_eps)?;
        }
        Ok(x)
    }

    /// Mean of the last hidden state over real tokens: [b, H].
    pub fn pooled(&self, input_ids: &Tensor, mask: &Tensor, tape: Option<&mut Tape>) -> Result<Tensor> {
        let hidden = self.encode(input_ids, mask, tape)?;
        mean_pool(&hidden, mask)
    }

    /// Class logits [b, C].
    pub fn logits(&self, input_ids: &Tensor, mask: &Tensor, tape: Option<&mut Tape>) -> Result<Tensor> {
        let x = self.embed(input_ids)?;
        self.logits_from(x, 0, mask, tape)
    }

    /// Class logits of a batch, starting from its cached hidden states when it has them.
    pub fn batch_logits(&self, batch: &crate::data::Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        match &batch.hidden {
            Some((start, x)) => {
                if *start > self.first_adapted_layer() {
                    candle_core::bail!("cached features at layer {start} skip adapted layers below it");
                }
                self.logits_from(x.clone(), *start, &batch.attention_mask, tape)
            }
            None => self.logits(&batch.input_ids, &batch.attention_mask, tape),
        }
    }

    /// The pooled last hidden state [b, H] of a batch (from its cached hidden states when it has
    /// them), without a tape.
    pub fn batch_pooled(&self, batch: &crate::data::Batch) -> Result<Tensor> {
        let (start, x) = match &batch.hidden {
            Some((start, x)) => (*start, x.clone()),
            None => (0, self.embed(&batch.input_ids)?),
        };
        let hidden = self.run_layers(x, &batch.attention_mask, start..self.layers.len(), None)?;
        mean_pool(&hidden, &batch.attention_mask)
    }

    /// Class logits from `x`, the hidden states entering layer `start`.
    pub fn logits_from(&self, x: Tensor, start: usize, mask: &Tensor, mut tape: Option<&mut Tape>) -> Result<Tensor> {
        let hidden = self.run_layers(x, mask, start..self.layers.len(), tape.as_deref_mut())?;
        let pooled = mean_pool(&hidden, mask)?;
        let logits = add_const(&linear_nd(&pooled, &self.head_w)?, &self.head_b)?;
        match tape {
            None => Ok(logits),
            Some(tape) => {
                let h = pooled.detach();
                let grad = crate::lora::GradSlot::default();
                let logits = crate::lora::grad_tap(&logits, &grad)?;
                tape.head = Some(HeadRecord { h, grad });
                Ok(logits)
            }
        }
    }
}

impl super::DpModel for BertClassifier {
    fn device(&self) -> &Device {
        BertClassifier::device(self)
    }
    fn base_dtype(&self) -> DType {
        BertClassifier::base_dtype(self)
    }
    fn adapted_layers(&self) -> Vec<&LoraLinear> {
        BertClassifier::adapted_layers(self)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        BertClassifier::trainable(self)
    }
    fn set_trainable(&mut self, tensors: &[Tensor]) -> Result<()> {
        BertClassifier::set_trainable(self, tensors)
    }
    fn example_losses(&self, batch: &crate::data::Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        cross_entropy_per_example(&self.batch_logits(batch, tape)?, &batch.labels)
    }
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn first_adapted_layer(&self) -> usize {
        BertClassifier::first_adapted_layer(self)
    }
    fn prefix_hidden(&self, batch: &crate::data::Batch, upto: usize) -> Result<Tensor> {
        self.run_layers(self.embed(&batch.input_ids)?, &batch.attention_mask, 0..upto, None)
    }
    fn task(&self) -> super::Task {
        super::Task::Classification
    }
    fn score_examples(&self, examples: &[crate::data::Example], batch_size: usize) -> Result<Vec<super::ExampleScore>> {
        super::score::correct_per_example(self, examples, batch_size)
    }
    fn pooled_features(&self, batch: &crate::data::Batch) -> Result<Tensor> {
        self.batch_pooled(batch)
    }
}

/// Σ_t mask_t h_t / Σ_t mask_t.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?;
    mul_const(hidden, &m)?.sum(1)?.broadcast_div(&m.sum(1)?)
}

/// Per-example cross-entropy losses [b] (natural log).
pub fn cross_entropy_per_example(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    let logp = super::ops::log_softmax_last(logits)?;
    let onehot = labels.unsqueeze(1)?.broadcast_eq(&Tensor::arange(0u32, c as u32, logits.device())?.unsqueeze(0)?)?;
    (logp * onehot.to_dtype(DType::F32)?)?.sum(1)?.neg()
}

/// A tensor of uniform values in [-scale, scale) from `rng`.
pub fn uniform_tensor(rng: &mut ChaCha20Rng, shape: &[usize], scale: f32, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    Tensor::from_vec(v, shape, device)
}

/// Random weights for a BERT of shape `cfg`, named as in a Hugging Face checkpoint (for tests and
/// benchmarks that need a model of a given size without its download).
pub fn random_weights(
    cfg: &BertConfig,
    rng: &mut ChaCha20Rng,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut w = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, rng: &mut ChaCha20Rng| -> Result<()> {
        w.insert(name, uniform_tensor(rng, shape, scale, device)?);
        Ok(())
    };
    put("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, h], 1.0, rng)?;
    put("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, h], 0.5, rng)?;
    if cfg.type_vocab_size > 0 {
        put("embeddings.token_type_embeddings.weight".into(), &[cfg.type_vocab_size, h], 0.5, rng)?;
    }
    put("embeddings.LayerNorm.weight".into(), &[h], 1.0, rng)?;
    put("embeddings.LayerNorm.bias".into(), &[h], 0.2, rng)?;
    let lin_scale = 1.7 / (h as f32).sqrt();
    let layout = cfg.layout();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("{}.{i}", layout.layer);
        let shapes = [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)];
        for (m, (o, inp)) in layout.paths.iter().zip(shapes) {
            put(format!("{p}.{m}.weight"), &[o, inp], lin_scale, rng)?;
            put(format!("{p}.{m}.bias"), &[o], 0.1, rng)?;
        }
        for ln in [layout.attn_ln, layout.out_ln] {
            put(format!("{p}.{ln}.weight"), &[h], 1.0, rng)?;
            put(format!("{p}.{ln}.bias"), &[h], 0.2, rng)?;
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// all-MiniLM-L6-v2's config.json (as in the fetched model; written by transformers 4.8).
    const MINILM: &str = r#"{
      "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
      "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": false, "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02, "intermediate_size": 1536,
      "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
      "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute",
      "transformers_version": "4.8.2", "type_vocab_size": 2, "use_cache": true, "vocab_size": 30522
    }"#;

    /// The same saved by transformers 5 (`dtype`; no `gradient_checkpointing`).
    const MINILM_V5: &str = r#"{
      "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "classifier_dropout": null,
      "dtype": "float32", "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 384,
      "initializer_range": 0.02, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
      "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 6,
      "pad_token_id": 0, "position_embedding_type": "absolute", "transformers_version": "5.0.0",
      "type_vocab_size": 2, "use_cache": true, "vocab_size": 30522
    }"#;

    fn with(text: &str, key: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        v.as_object_mut().unwrap().insert(key.into(), value);
        v.to_string()
    }

    fn effective(c: &BertConfig) -> String {
        let mut c = c.clone();
        c.other.clear();
        format!("{c:?}")
    }

    #[test]
    fn minilm_config_loads_in_both_layouts_and_from_the_fetched_model() {
        let old = BertConfig::from_json(MINILM).unwrap();
        let new = BertConfig::from_json(MINILM_V5).unwrap();
        assert_eq!((old.hidden_size, old.num_hidden_layers, old.vocab_size), (384, 6, 30522));
        assert_eq!(effective(&old), effective(&new));
        let fetched = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/all-MiniLM-L6-v2/config.json");
        if fetched.exists() {
            assert_eq!(effective(&BertConfig::from_file(&fetched).unwrap()), effective(&old));
        } else {
            eprintln!("skipping the fetched config: {} not there (scripts/fetch-assets.sh)", fetched.display());
        }
    }

    #[test]
    fn unknown_keys_and_unsupported_settings_are_refused_naming_them() {
        let e = BertConfig::from_json(&with(MINILM, "foo_scaling", 2.into())).unwrap_err();
        assert!(e.contains("`foo_scaling`"), "{e}");
        let e = BertConfig::from_json(&with(MINILM, "is_decoder", true.into())).unwrap_err();
        assert!(e.contains("`is_decoder`"), "{e}");
        assert!(BertConfig::from_json(&with(MINILM, "is_decoder", false.into())).is_ok());
        let e = BertConfig::from_json(&with(MINILM, "position_embedding_type", "relative_key".into())).unwrap_err();
        assert!(e.contains("relative_key"), "{e}");
        // Keys of another family are not silently accepted either.
        let e = BertConfig::from_json(&with(MINILM, "rope_theta", 10000.0.into())).unwrap_err();
        assert!(e.contains("`rope_theta`"), "{e}");
    }

    #[test]
    fn distilbert_reads_its_own_config_and_names_and_takes_bert_target_names_as_aliases() {
        let text = r#"{"activation": "gelu", "attention_dropout": 0.1, "dim": 64, "dropout": 0.1, "hidden_dim": 96,
            "initializer_range": 0.02, "max_position_embeddings": 40, "model_type": "distilbert", "n_heads": 4,
            "n_layers": 2, "pad_token_id": 0, "qa_dropout": 0.1, "seq_classif_dropout": 0.2,
            "sinusoidal_pos_embds": false, "tie_word_embeddings": true, "vocab_size": 96}"#;
        let cfg = BertConfig::from_json(text).unwrap();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.type_vocab_size
            ),
            (64, 2, 4, 96, 0)
        );
        assert_eq!((cfg.layer_norm_eps, cfg.position_offset()), (1e-12, 0));
        let e = BertConfig::from_json(&with(text, "sinusoidal_pos_embds", true.into())).unwrap_err();
        assert!(e.contains("sinusoidal_pos_embds"), "{e}");
        let adapted = |targets: &[&str]| -> std::result::Result<Vec<String>, String> {
            let mut rng = <ChaCha20Rng as rand::SeedableRng>::seed_from_u64(1);
            let w = random_weights(&cfg, &mut rng, &Device::Cpu).map_err(|e| e.to_string())?;
            let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
            let spec = LoraSpec {
                rank: 2,
                alpha: 4.0,
                targets: targets.iter().map(|t| t.to_string()).collect(),
                layers: Some(vec![1]),
            };
            let m = BertClassifier::new(vb, cfg.clone(), Some(&spec), 2, &mut rng).map_err(|e| e.to_string())?;
            Ok(m.adapted_layers().iter().map(|l| l.name.clone()).collect())
        };
        let want = vec!["transformer.layer.1.attention.q_lin".to_string(), "transformer.layer.1.ffn.lin2".to_string()];
        assert_eq!(adapted(&["q_lin", "lin2"]).unwrap(), want);
        assert_eq!(adapted(&["query", "output.dense"]).unwrap(), want);
        let e = adapted(&["dense"]).unwrap_err();
        assert!(e.contains("`dense`") && e.contains("q_lin") && e.contains("query"), "{e}");
        // A BERT model has no q_lin.
        let bert = BertConfig::from_json(MINILM).unwrap();
        assert_eq!((bert.lora_module("q_lin"), bert.lora_module("query")), (None, Some("query")));
    }
}
