//! Per-example gradients of every trainable tensor, vectorised over the batch.
//!
//! From the tape of one forward pass and the backward of the *summed* loss (so that dL/dy at
//! example i depends on example i only); the LoRA products are computed by each layer's tap as
//! the backward passes it (see `lora`), the head's here:
//!   LoRA B [out, r]:  dB_i = s · G_iᵀ U_i          (G_i = dL/dy_i [T, out], U_i = X_i Aᵀ [T, r])
//!   LoRA A [r, in]:   dA_i = s · (G_i B)ᵀ X_i
//!   head W [C, H]:    dW_i = g_i h_iᵀ              (g_i = dL/dlogits_i, h_i the pooled features)
//!   head b [C]:       db_i = g_i
//! as batched matrix products. The result is [b, P] in the canonical order of
//! `DpModel::trainable` (per adapted layer A then B, then head W, head b when there is a head).
//! Padding positions have G = 0 exactly (no loss reads them), so they add nothing.
//! The slow twin is one backward pass per example (tests/per_example_grads.rs).

use crate::lora::Tape;
use crate::model::DpModel;
use candle_core::{Result, Tensor};

pub fn per_example_grads(model: &dyn DpModel, tape: &Tape) -> Result<Tensor> {
    Tensor::cat(&per_example_grad_parts(model, tape)?, 1)
}

/// The same as one [b, n_k] f32 tensor per trainable tensor (canonical order), without the
/// concatenation: what the fused norm and clip kernels take.
pub fn per_example_grad_parts(model: &dyn DpModel, tape: &Tape) -> Result<Vec<Tensor>> {
    let layers = model.adapted_layers();
    if layers.len() != tape.lora.len() {
        candle_core::bail!("tape has {} LoRA records, model has {} adapted layers", tape.lora.len(), layers.len());
    }
    let mut parts: Vec<Tensor> = Vec::with_capacity(2 * layers.len() + 2);
    for (layer, rec) in layers.iter().zip(&tape.lora) {
        if layer.name != rec.name {
            candle_core::bail!("tape order mismatch: {} vs {}", layer.name, rec.name);
        }
        // Computed by the layer's tap during the backward (lora::LoraTapData::parts). A missing
        // one means the graph was cut (PITFALLS 15): fail, never clip nothing.
        let (d_a, d_b) = rec
            .parts
            .get()
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached LoRA layer {}", rec.name)))?;
        parts.push(d_a);
        parts.push(d_b);
    }
    if let Some(head) = &tape.head {
        let g = &head
            .grad
            .get()
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the classification head".into()))?;
        let d_w = g.unsqueeze(2)?.matmul(&head.h.unsqueeze(1)?)?; // [b, C, H]
        parts.push(d_w.reshape((g.dim(0)?, ()))?);
        parts.push(g.contiguous()?);
    }
    // Every trainable tensor must have its per-example gradient, in order (a model whose head
    // was not recorded would otherwise be trained on unclipped, unnoised nothing).
    let expected = model.trainable();
    if parts.len() != expected.len() {
        candle_core::bail!("per-example gradients cover {} tensors, the model trains {}", parts.len(), expected.len());
    }
    for (p, (name, t)) in parts.iter().zip(&expected) {
        if p.dim(1)? != t.elem_count() {
            candle_core::bail!("per-example gradient of {name} has {} values, expected {}", p.dim(1)?, t.elem_count());
        }
    }
    Ok(parts)
}
