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

/// Bounds on one physical micro-batch: at most `examples` examples and, when set, at most
/// `tokens` padded tokens (examples × the longest member's length). A single example longer than
/// `tokens` forms a micro-batch of its own (a record is never split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatchLimits {
    pub examples: usize,
    pub tokens: Option<usize>,
}

impl From<usize> for MicroBatchLimits {
    fn from(examples: usize) -> Self {
        MicroBatchLimits { examples, tokens: None }
    }
}

/// Split the logical batch `indices` into micro-batches (of indices) within `limits`, grouping
/// similar lengths together to reduce padding. An empty logical batch gives no micro-batches (the
/// step then adds noise only). Every index appears in exactly one micro-batch.
pub fn make_micro_batches(
    examples: &[Example],
    indices: &[usize],
    limits: impl Into<MicroBatchLimits>,
) -> Vec<Vec<usize>> {
    let limits = limits.into();
    let mut sorted: Vec<usize> = indices.to_vec();
    sorted.sort_by_key(|&i| (examples[i].ids.len(), i));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in sorted {
        // Sorted by length: example i is the longest of `cur` plus itself.
        let padded = (cur.len() + 1) * examples[i].ids.len();
        let full = cur.len() + 1 > limits.examples.max(1) || limits.tokens.is_some_and(|m| padded > m);
        if full && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_respect_both_limits_and_cover_every_index_once() {
        let exs: Vec<Example> = (0..40).map(|i| Example::classification(vec![1; 1 + (i * 7) % 23], 0)).collect();
        let idx: Vec<usize> = (0..40).filter(|i| i % 3 != 1).collect();
        let limits = MicroBatchLimits { examples: 6, tokens: Some(40) };
        let mbs = make_micro_batches(&exs, &idx, limits);
        let mut all: Vec<usize> = mbs.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, idx);
        for mb in &mbs {
            let longest = mb.iter().map(|&i| exs[i].ids.len()).max().unwrap();
            assert!(mb.len() <= 6);
            assert!(mb.len() == 1 || mb.len() * longest <= 40, "{} × {longest}", mb.len());
        }
        // A record longer than the token limit still runs, alone.
        let long = vec![Example::classification(vec![1; 50], 0), Example::classification(vec![1; 3], 0)];
        assert_eq!(
            make_micro_batches(&long, &[0, 1], MicroBatchLimits { examples: 8, tokens: Some(10) }),
            vec![vec![1], vec![0]]
        );
    }
}
