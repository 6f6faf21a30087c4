//! Model-FLOP utilisation for `dptrain bench`: the analytic floating-point operations of one
//! LoRA training step, and the measured peak of the machine (a short GEMM probe), so the distance
//! to the hardware limit is visible on any machine.
//!
//! Counting convention (like PaLM's "model FLOPs": what the step needs, not what an
//! implementation happens to compute; a multiply-add is 2 FLOPs):
//! - forward, every token through every layer: the linear layers (2·in·out), attention scores and
//!   the weighted sum (2·T·d each, the full T×T square as computed, causal or not), the LoRA
//!   branches (2·r·(in + out)), and the output head (2·h·V for a language model's vocabulary
//!   head, 2·h·labels for a classifier);
//! - backward, from the top down to the lowest adapted layer only (below it nothing is trainable):
//!   the gradient with respect to each frozen linear layer's input (2·in·out, no weight gradient),
//!   attention backward (twice its forward: gradients for scores' two operands and for the
//!   weighted sum's two), each LoRA branch twice its forward (its input gradient and the A/B weight
//!   gradients, per example or summed: the same count), and the head's input gradient.
//!
//! Norms, activations, softmax, clipping, noise and the optimiser are not counted (O(tokens·h) or
//! O(P), not O(tokens·h²)).

use candle_core::{DType, Device, Result, Tensor};
use std::time::Instant;

/// The shape of a transformer as far as FLOPs go.
#[derive(Debug, Clone, PartialEq)]
pub struct FlopShape {
    pub layers: usize,
    pub hidden: usize,
    /// Output width of each frozen linear layer of one layer, with its input width: (in, out).
    pub linears: Vec<(usize, usize)>,
    /// Width of the attention's query/key/value heads together (heads · head_dim).
    pub attention_width: usize,
    /// Output width of the head (vocabulary for a language model, labels for a classifier) and
    /// whether it runs on every token (language model) or once per example (pooled classifier).
    pub head_out: usize,
    pub head_per_token: bool,
}

impl FlopShape {
    /// BERT: q, k, v, attention output (h×h each), intermediate (h→i), output (i→h).
    pub fn bert(cfg: &crate::model::BertConfig, labels: usize) -> FlopShape {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        FlopShape {
            layers: cfg.num_hidden_layers,
            hidden: h,
            linears: vec![(h, h), (h, h), (h, h), (h, h), (h, i), (i, h)],
            attention_width: h,
            head_out: labels,
            head_per_token: false,
        }
    }

    /// Llama: q (h→heads·d), k and v (h→kv·d), o (heads·d→h), gate and up (h→i), down (i→h);
    /// the vocabulary head on every position.
    pub fn llama(cfg: &crate::model::LlamaConfig) -> FlopShape {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * d, cfg.kv_heads() * d);
        FlopShape {
            layers: cfg.num_hidden_layers,
            hidden: h,
            linears: vec![(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)],
            attention_width: q,
            head_out: cfg.vocab_size,
            head_per_token: true,
        }
    }
}

/// One LoRA branch: its layer, and the widths of A ([r, in]) and B ([out, r]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraBranch {
    pub layer: usize,
    pub rank: usize,
    pub input: usize,
    pub output: usize,
}

/// The LoRA branches of a model, from its trainable tensors' names and shapes
/// (`…layer.<i>.….lora_A.weight` [r, in] and the matching `lora_B` [out, r]).
pub fn lora_branches(trainable: &[(String, Tensor)]) -> Vec<LoraBranch> {
    let layer_of = |name: &str| {
        let parts: Vec<&str> = name.split('.').collect();
        let i = parts.iter().position(|p| *p == "layer" || *p == "layers")?;
        parts.get(i + 1)?.parse::<usize>().ok()
    };
    let mut out = Vec::new();
    for (name, a) in trainable {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else { continue };
        let Some((_, b)) = trainable.iter().find(|(n, _)| *n == format!("{prefix}.lora_B.weight")) else {
            continue;
        };
        if let (Some(layer), [r, input], [output, _]) = (layer_of(name), a.dims(), b.dims()) {
            out.push(LoraBranch { layer, rank: *r, input: *input, output: *output });
        }
    }
    out
}

/// Analytic FLOPs of one training step (forward + the backward the step needs) over a batch of
/// records with these token counts (see the module comment for what is counted).
pub fn step_flops(shape: &FlopShape, lora: &[LoraBranch], lengths: &[usize]) -> f64 {
    let lowest = lora.iter().map(|b| b.layer).min().unwrap_or(shape.layers);
    let linear: f64 = shape.linears.iter().map(|&(i, o)| 2.0 * i as f64 * o as f64).sum();
    let mut total = 0.0;
    for &t in lengths {
        let t = t as f64;
        // Per token per layer: linear layers, and attention (scores + weighted sum, 2·T·d each).
        let attention = 4.0 * t * shape.attention_width as f64;
        let forward_layer = t * (linear + attention);
        let backward_layer = t * (linear + 2.0 * attention);
        let layers_with_backward = shape.layers.saturating_sub(lowest) as f64;
        total += shape.layers as f64 * forward_layer + layers_with_backward * backward_layer;
        let head = 2.0 * shape.hidden as f64 * shape.head_out as f64 * if shape.head_per_token { t } else { 1.0 };
        total += 2.0 * head; // forward and its input gradient (a trained head's weight gradient is negligible beside the vocabulary head's)
        for b in lora {
            let fwd = 2.0 * t * b.rank as f64 * (b.input + b.output) as f64;
            total += 3.0 * fwd;
        }
    }
    total
}

/// The measured peak of `device` for matrix products in `dtype`: the best of a few square GEMMs
/// (sizes 512 … 2048, each timed after a warm-up), in FLOP/s.
pub fn gemm_peak(device: &Device, dtype: DType) -> Result<f64> {
    let mut best = 0f64;
    for n in [512usize, 1024, 2048] {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        let _ = a.matmul(&b)?;
        device.synchronize()?;
        let reps = if n <= 512 { 8 } else { 3 };
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        best = best.max(2.0 * (n as f64).powi(3) / dt);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand count for a 2-layer toy with one adapted layer (layer 1).
    #[test]
    fn step_flops_of_a_toy_model_equal_the_hand_count() {
        let shape = FlopShape {
            layers: 2,
            hidden: 4,
            linears: vec![(4, 4), (4, 8), (8, 4)],
            attention_width: 4,
            head_out: 10,
            head_per_token: true,
        };
        let lora = [LoraBranch { layer: 1, rank: 2, input: 4, output: 4 }];
        // T = 3 tokens: linear per token = 2·(16 + 32 + 32) = 160; attention per token = 4·3·4 = 48.
        // Forward: 2 layers · 3 · (160 + 48) = 1248. Backward of layer 1 only: 3 · (160 + 96) = 768.
        // Head: 2 · (2·4·10·3) = 480. LoRA: 3 · 2·3·2·(4 + 4) = 288.
        assert_eq!(step_flops(&shape, &lora, &[3]), 1248.0 + 768.0 + 480.0 + 288.0);
        // Two records add up; no adapter means no backward at all.
        assert_eq!(step_flops(&shape, &lora, &[3, 3]), 2.0 * step_flops(&shape, &lora, &[3]));
        assert_eq!(step_flops(&shape, &[], &[3]), 1248.0 + 480.0);
    }

    #[test]
    fn lora_branches_are_read_from_names_and_shapes() {
        let d = Device::Cpu;
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &d).unwrap();
        let named = vec![
            ("base_model.model.encoder.layer.3.attention.self.query.lora_A.weight".to_string(), t(&[8, 384])),
            ("base_model.model.encoder.layer.3.attention.self.query.lora_B.weight".to_string(), t(&[384, 8])),
            ("base_model.model.model.layers.7.mlp.up_proj.lora_A.weight".to_string(), t(&[4, 576])),
            ("base_model.model.model.layers.7.mlp.up_proj.lora_B.weight".to_string(), t(&[1536, 4])),
            ("base_model.model.classifier.weight".to_string(), t(&[2, 384])),
        ];
        assert_eq!(
            lora_branches(&named),
            [
                LoraBranch { layer: 3, rank: 8, input: 384, output: 384 },
                LoraBranch { layer: 7, rank: 4, input: 576, output: 1536 }
            ]
        );
    }

    #[test]
    fn the_gemm_probe_measures_a_plausible_cpu_peak() {
        let p = gemm_peak(&Device::Cpu, DType::F32).unwrap();
        // Anything from a slow emulator to a large server: 1e8 … 1e14 FLOP/s.
        assert!(p.is_finite() && p > 1e8 && p < 1e14, "{p}");
    }
}
