//! One logical DP-SGD step (SPEC §2), stage by stage:
//! micro-batches → per-example gradients → clip → sum → noise once → ÷ expected batch size.

use crate::data::{make_micro_batches, Batch, Example, FeatureCache};
use crate::kernels::{clip_factors, clipped_sum, per_example_sq_norms};
use crate::lora::Tape;
use crate::model::bert::cross_entropy_per_example;
use crate::model::BertClassifier;
use crate::privacy::{per_example_grad_parts, GaussianNoise};
use candle_core::{DType, Result, Tensor};

/// The privacy mechanism of a step. `clip = None` with `noise_multiplier = 0` is the
/// non-private baseline (same sampling, same normalisation, no privacy).
#[derive(Debug, Clone, Copy)]
pub struct Mechanism {
    pub clip: Option<f64>,
    pub noise_multiplier: f64,
    /// L: the public constant the noisy sum is divided by.
    pub expected_batch_size: usize,
}

#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub batch_size: usize,
    pub tokens: usize,
    pub loss_sum: f64,
    pub clipped: usize,
    pub nonfinite: usize,
    pub noised_coordinates: usize,
    pub micro_batches: usize,
}

/// Sum over one micro-batch of the clipped per-example gradients: [P], with its stats. The norms,
/// clip factors and weighted sum run as fused kernels on the model's device (`crate::kernels`).
pub fn clipped_sum_micro_batch(
    model: &BertClassifier,
    batch: &Batch,
    clip: Option<f64>,
) -> Result<(Tensor, StepReport)> {
    let mut tape = Tape::default();
    let logits = model.batch_logits(batch, Some(&mut tape))?;
    let losses = cross_entropy_per_example(&logits, &batch.labels)?;
    // The summed loss: dL/dy at example i is example i's own gradient.
    let grads = losses.sum_all()?.backward()?;
    let parts = per_example_grad_parts(model, &tape, &grads)?;
    let sq = per_example_sq_norms(&parts)?;
    let factors = clip_factors(&sq, clip)?;
    let sum = clipped_sum(&parts, &factors)?;
    let (mut clipped, mut nonfinite) = (0, 0);
    for &q in &sq.to_vec1::<f64>()? {
        match crate::kernels::clip_factor_from_sq(q, clip) {
            0.0 => nonfinite += 1,
            f if f < 1.0 => clipped += 1,
            _ => {}
        }
    }
    let loss_sum = losses.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((
        sum,
        StepReport {
            batch_size: batch.size,
            tokens: batch.tokens,
            loss_sum,
            clipped,
            nonfinite,
            noised_coordinates: 0,
            micro_batches: 1,
        },
    ))
}

/// The privatised gradient of one logical batch (`indices` into `examples`), as a flat [P]
/// tensor on the model's device in the order of `BertClassifier::trainable`. `step` (0-based)
/// selects the noise stream: each step must have its own. With `cache`, the frozen lower layers
/// are read from it instead of recomputed.
#[allow(clippy::too_many_arguments)]
pub fn private_gradient(
    model: &BertClassifier,
    examples: &[Example],
    cache: Option<&FeatureCache>,
    indices: &[usize],
    max_physical_batch: usize,
    num_params: usize,
    mech: &Mechanism,
    noise: &GaussianNoise,
    step: u64,
) -> Result<(Tensor, StepReport)> {
    let mut report = StepReport::default();
    let mut sum = Tensor::zeros(num_params, DType::F32, model.device())?;
    for mb in make_micro_batches(examples, indices, max_physical_batch) {
        let batch = Batch::gather(examples, &mb, cache, model.device())?;
        let (s, r) = clipped_sum_micro_batch(model, &batch, mech.clip)?;
        sum = (sum + s)?;
        report.batch_size += r.batch_size;
        report.tokens += r.tokens;
        report.loss_sum += r.loss_sum;
        report.clipped += r.clipped;
        report.nonfinite += r.nonfinite;
        report.micro_batches += 1;
    }
    // Noise once per logical step, also when the batch was empty (PITFALLS 4, 5).
    if mech.noise_multiplier > 0.0 {
        let Some(clip) = mech.clip else {
            candle_core::bail!("noise without clipping has no sensitivity bound: refusing");
        };
        report.noised_coordinates = noise.add_noise_tensor(&sum, step, mech.noise_multiplier * clip)?;
    }
    // Divide by the expected batch size, never the realised one (PITFALLS 2).
    let grad = (sum / mech.expected_batch_size as f64)?;
    Ok((grad, report))
}
