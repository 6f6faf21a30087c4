//! Physical micro-batches: a logical batch split into pieces of at most `max_physical_batch`
//! examples, each padded to its longest member, with a mask so padding never contributes.

use super::Example;
use candle_core::{Device, Result, Tensor};

/// A padded micro-batch.
pub struct Batch {
    /// [b, T] token ids (padding id 0).
    pub input_ids: Tensor,
    /// [b, T] 1.0 for real tokens, 0.0 for padding.
    pub attention_mask: Tensor,
    /// [b] class indices.
    pub labels: Tensor,
    pub size: usize,
    pub tokens: usize,
}

impl Batch {
    pub fn from_examples(examples: &[&Example], device: &Device) -> Result<Batch> {
        let b = examples.len();
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, e) in examples.iter().enumerate() {
            ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
            mask[i * t..i * t + e.ids.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let labels: Vec<u32> = examples.iter().map(|e| e.label as u32).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            labels: Tensor::from_vec(labels, b, device)?,
            size: b,
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
        })
    }
}

/// Split the logical batch `indices` into micro-batches of at most `max_physical` examples,
/// grouping similar lengths together to reduce padding. An empty logical batch gives no
/// micro-batches (the step then adds noise only).
pub fn make_micro_batches<'a>(
    examples: &'a [Example],
    indices: &[usize],
    max_physical: usize,
) -> Vec<Vec<&'a Example>> {
    let mut sorted: Vec<usize> = indices.to_vec();
    sorted.sort_by_key(|&i| (examples[i].ids.len(), i));
    sorted.chunks(max_physical.max(1)).map(|c| c.iter().map(|&i| &examples[i]).collect()).collect()
}
