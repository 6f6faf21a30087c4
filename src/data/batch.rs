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
    /// Language-modelling targets (when the examples have `target_start`).
    pub lm: Option<LmTargets>,
}

/// The next-token prediction targets of a padded language-modelling micro-batch. Only real
/// (non-padding) positions whose next token is a target appear, so padding and prompt tokens
/// can contribute nothing to the loss.
pub struct LmTargets {
    /// [n] flat positions `row · T + t` that predict a target.
    pub positions: Tensor,
    /// [n] the token each of them predicts (the id at `t + 1`).
    pub targets: Tensor,
    /// [b, n]: 1 / (targets of example i) where column j belongs to example i, else 0; so
    /// `weights · nll` is each example's mean token loss.
    pub weights: Tensor,
    /// Targets per example.
    pub counts: Vec<usize>,
}

impl LmTargets {
    fn build(examples: &[&Example], t: usize, device: &Device) -> Result<Option<LmTargets>> {
        let starts: Vec<Option<usize>> = examples.iter().map(|e| e.target_start).collect();
        if starts.iter().all(Option::is_none) {
            return Ok(None);
        }
        let (mut positions, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let mut counts = vec![0usize; examples.len()];
        for (row, e) in examples.iter().enumerate() {
            let Some(start) = e.target_start else {
                candle_core::bail!("a batch mixes classification and language-modelling examples")
            };
            // Position p predicts token p + 1; targets are the tokens at start.max(1)..len.
            for next in start.max(1)..e.ids.len() {
                positions.push((row * t + next - 1) as u32);
                targets.push(e.ids[next]);
                owner.push(row);
                counts[row] += 1;
            }
        }
        let n = positions.len();
        let mut weights = vec![0f32; examples.len() * n];
        for (j, &row) in owner.iter().enumerate() {
            weights[row * n + j] = 1.0 / counts[row] as f32;
        }
        Ok(Some(LmTargets {
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            weights: Tensor::from_vec(weights, (examples.len(), n), device)?,
            counts,
        }))
    }
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
        let lm = LmTargets::build(examples, t, device)?;
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            labels: Tensor::from_vec(labels, b, device)?,
            size: b,
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
            hidden: None,
            lm,
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
