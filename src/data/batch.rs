//! Physical micro-batches: a logical batch split into pieces of at most `max_physical_batch`
//! examples, each padded to its longest member, with a mask so padding never contributes.

use super::Example;
use candle_core::{Device, Result, Tensor};

/// Hidden states entering layer `start_layer` of the encoder, one [len_i · H] vector per
/// training example (same order as the examples). When no layer below `start_layer` has an
/// adapter, these are a fixed function of each record alone, so computing them once and reusing
/// them gives exactly the values a full forward would (test `cached_prefix_gives_full_forward`).
pub struct FeatureCache {
    pub start_layer: usize,
    pub hidden_size: usize,
    pub hidden: Vec<Vec<f32>>,
}

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
    /// With a feature cache: (start layer, [b, T, H] hidden states entering it, zero-padded).
    pub hidden: Option<(usize, Tensor)>,
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
            hidden: None,
        })
    }

    /// The micro-batch of `indices` into `examples`, with cached hidden states when given.
    pub fn gather(
        examples: &[Example],
        indices: &[usize],
        cache: Option<&FeatureCache>,
        device: &Device,
    ) -> Result<Batch> {
        let refs: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
        let mut batch = Batch::from_examples(&refs, device)?;
        if let Some(c) = cache {
            let (b, t, h) = (refs.len(), batch.input_ids.dim(1)?, c.hidden_size);
            let mut x = vec![0f32; b * t * h];
            for (row, &i) in indices.iter().enumerate() {
                let v = &c.hidden[i];
                if v.len() != examples[i].ids.len() * h {
                    candle_core::bail!(
                        "feature cache entry {i} has {} values, expected {}",
                        v.len(),
                        examples[i].ids.len() * h
                    );
                }
                x[row * t * h..row * t * h + v.len()].copy_from_slice(v);
            }
            batch.hidden = Some((c.start_layer, Tensor::from_vec(x, (b, t, h), device)?));
        }
        Ok(batch)
    }
}

/// Split the logical batch `indices` into micro-batches (of indices) of at most `max_physical`
/// examples, grouping similar lengths together to reduce padding. An empty logical batch gives no
/// micro-batches (the step then adds noise only).
pub fn make_micro_batches(examples: &[Example], indices: &[usize], max_physical: usize) -> Vec<Vec<usize>> {
    let mut sorted: Vec<usize> = indices.to_vec();
    sorted.sort_by_key(|&i| (examples[i].ids.len(), i));
    sorted.chunks(max_physical.max(1)).map(|c| c.to_vec()).collect()
}
