//! Shared helpers for integration tests: a tiny random BERT and deterministic random tensors.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dptrain::model::bert::{BertClassifier, BertConfig, LoraSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::HashMap;

pub fn rand_tensor(rng: &mut ChaCha20Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn tiny_config() -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 16,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    }))
    .unwrap()
}

/// A 2-layer BERT with random weights, LoRA on `targets`, and random (non-zero) LoRA B and head
/// so that every per-example gradient is non-trivial.
pub fn tiny_bert(seed: u64, targets: &[&str], num_labels: usize) -> BertClassifier {
    let cfg = tiny_config();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, rng: &mut ChaCha20Rng| {
        w.insert(name, rand_tensor(rng, shape, scale));
    };
    put("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, h], 1.0, &mut rng);
    put("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, h], 0.5, &mut rng);
    put("embeddings.token_type_embeddings.weight".into(), &[2, h], 0.5, &mut rng);
    for ln in ["embeddings.LayerNorm"] {
        put(format!("{ln}.weight"), &[h], 1.0, &mut rng);
        put(format!("{ln}.bias"), &[h], 0.2, &mut rng);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (m, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            put(format!("{p}.{m}.weight"), &[o, inp], 0.3, &mut rng);
            put(format!("{p}.{m}.bias"), &[o], 0.1, &mut rng);
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(format!("{p}.{ln}.weight"), &[h], 1.0, &mut rng);
            put(format!("{p}.{ln}.bias"), &[h], 0.2, &mut rng);
        }
    }
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let spec = LoraSpec { rank: 3, alpha: 6.0, targets: targets.iter().map(|s| s.to_string()).collect() };
    let mut model = BertClassifier::new(vb, cfg, Some(&spec), num_labels, &mut rng).unwrap();
    let random: Vec<Tensor> = model.trainable().iter().map(|(_, t)| rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    model.set_trainable(&random).unwrap();
    model
}
