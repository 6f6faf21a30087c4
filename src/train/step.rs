//! One logical DP-SGD step (SPEC §2), stage by stage:
//! micro-batches → per-example gradients → clip → sum → noise once → ÷ expected batch size.

use crate::data::{make_micro_batches, Batch, Example, FeatureCache, MicroBatchLimits};
use crate::kernels::{clip_factors_kind, clipped_sum, per_example_sq_norms};
use crate::lora::Tape;
use crate::model::DpModel;
use crate::privacy::{per_example_grad_parts, GaussianNoise};
use crate::profile;
use candle_core::{DType, Result, Tensor};

/// The privacy mechanism of a step. `clip = None` with `noise_multiplier = 0` is the
/// non-private baseline (same sampling, same normalisation, no privacy).
#[derive(Debug, Clone, Copy)]
pub struct Mechanism {
    pub clip: Option<f64>,
    /// How examples are scaled to norm ≤ C (flat or automatic clipping).
    pub clip_kind: crate::privacy::ClipKind,
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
    /// Gradient canaries of a white-box audit in this step's sample (0 outside an audit).
    pub canaries: usize,
}

/// How per-example gradients are clipped and summed. Both compute the same thing; `Fused` is what
/// training uses, `CandleOps` the unfused "before" kept for `dptrain bench` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClipImpl {
    /// Per-tensor parts, no [b, P] concatenation; norms, factors and the weighted sum as the
    /// kernels of `crate::kernels` (CUDA) or their CPU twins.
    #[default]
    Fused,
    /// Concatenate to [b, P], then candle ops (`privacy::clip_and_sum`).
    CandleOps,
}

/// What one micro-batch contributes, still on the device (no host synchronisation).
pub struct MicroBatchSum {
    /// Σ of the clipped per-example gradients: [P] f32.
    pub sum: Tensor,
    /// Σ of the per-example losses: a scalar f32 tensor.
    pub loss_sum: Tensor,
    /// The smallest clip factor applied to each example [b] f32 (0: dropped as non-finite; < 1:
    /// clipped), for the statistics.
    pub factors: Tensor,
    pub size: usize,
    pub tokens: usize,
}

/// Sum over one micro-batch of the clipped per-example gradients (`clip = None`: unclipped, for
/// the non-private baseline; non-finite examples are dropped either way).
pub fn clipped_sum_micro_batch(
    model: &dyn DpModel,
    batch: &Batch,
    clip: Option<f64>,
    how: ClipImpl,
) -> Result<MicroBatchSum> {
    clipped_sum_micro_batch_kind(model, batch, clip, crate::privacy::ClipKind::Flat, how)
}

/// The same with a chosen `ClipKind` (the candle-ops twin implements flat clipping only).
pub fn clipped_sum_micro_batch_kind(
    model: &dyn DpModel,
    batch: &Batch,
    clip: Option<f64>,
    kind: crate::privacy::ClipKind,
    how: ClipImpl,
) -> Result<MicroBatchSum> {
    let dev = model.device();
    profile::mark(dev, "data")?;
    let mut tape = Tape::default();
    let losses = model.example_losses(batch, Some(&mut tape))?;
    // The summed loss: dL/dy at example i is example i's own gradient.
    let loss_sum = losses.sum_all()?;
    profile::mark(dev, "forward")?;
    // The backward fills the tape's gradient slots (the GradStore itself is not needed).
    loss_sum.backward()?;
    profile::mark(dev, "backward")?;
    let (sum, factors) = match how {
        ClipImpl::Fused if kind == crate::privacy::ClipKind::PerLayer => {
            let parts = per_example_grad_parts(model, &tape)?;
            // One group per adapted layer (its A and B) and one for the head (W and b): parts come
            // in pairs. Each group is clipped to C/√G, so an example's whole gradient has norm
            // ≤ √(G · C²/G) = C. An example non-finite in any group is dropped from every group.
            let groups: Vec<&[Tensor]> = parts.chunks(2).collect();
            let g = groups.len() as f64;
            let sq: Vec<Tensor> = groups.iter().map(|p| per_example_sq_norms(p)).collect::<Result<_>>()?;
            let total = sq.iter().skip(1).try_fold(sq[0].clone(), |acc, s| acc + s)?;
            let finite = clip_factors_kind(&total, None, crate::privacy::ClipKind::Flat)?;
            profile::mark(dev, "per-example")?;
            let per_group: Vec<Tensor> = sq
                .iter()
                .map(|s| clip_factors_kind(s, clip.map(|c| c / g.sqrt()), crate::privacy::ClipKind::Flat)?.mul(&finite))
                .collect::<Result<_>>()?;
            let mut sums = Vec::with_capacity(groups.len());
            for (p, f) in groups.iter().zip(&per_group) {
                sums.push(clipped_sum(p, f)?);
            }
            let smallest = per_group.iter().skip(1).try_fold(per_group[0].clone(), |acc, f| acc.minimum(f))?;
            profile::mark(dev, "clip")?;
            (Tensor::cat(&sums, 0)?, smallest)
        }
        ClipImpl::Fused => {
            let parts = faults::mix(per_example_grad_parts(model, &tape)?)?;
            let sq = per_example_sq_norms(&parts)?;
            profile::mark(dev, "per-example")?;
            let factors = clip_factors_kind(&sq, faults::clip(clip), kind)?;
            let sum = clipped_sum(&parts, &factors)?;
            profile::mark(dev, "clip")?;
            (sum, factors)
        }
        ClipImpl::CandleOps => {
            if kind != crate::privacy::ClipKind::Flat {
                candle_core::bail!("the candle-ops clip twin implements flat clipping only");
            }
            let per_example = crate::privacy::per_example_grads(model, &tape)?;
            profile::mark(dev, "per-example")?;
            let (sum, stats) = crate::privacy::clip_and_sum(&per_example, clip)?;
            profile::mark(dev, "clip")?;
            let f: Vec<f32> = stats
                .norms
                .iter()
                .map(|&n| crate::kernels::clip_factor_from_sq((n as f64) * (n as f64), clip))
                .collect();
            (sum, Tensor::from_vec(f, batch.size, &candle_core::Device::Cpu)?)
        }
    };
    Ok(MicroBatchSum { sum, loss_sum: loss_sum.detach(), factors, size: batch.size, tokens: batch.tokens })
}

/// The privatised gradient of one logical batch (`indices` into `examples`), as a flat [P]
/// tensor on the model's device in the order of `DpModel::trainable`. `step` (0-based)
/// selects the noise stream: each step must have its own. With `cache`, the frozen lower layers
/// are read from it instead of recomputed. The device is synchronised once, at the end, for the
/// step's statistics.
#[allow(clippy::too_many_arguments)]
pub fn private_gradient(
    model: &dyn DpModel,
    examples: &[Example],
    cache: Option<&FeatureCache>,
    indices: &[usize],
    max_physical_batch: impl Into<MicroBatchLimits>,
    num_params: usize,
    mech: &Mechanism,
    noise: &GaussianNoise,
    step: u64,
) -> Result<(Tensor, StepReport)> {
    private_gradient_with(
        model,
        examples,
        cache,
        indices,
        max_physical_batch,
        num_params,
        mech,
        noise,
        step,
        ClipImpl::Fused,
    )
}

/// `private_gradient` with a chosen clip implementation.
#[allow(clippy::too_many_arguments)]
pub fn private_gradient_with(
    model: &dyn DpModel,
    examples: &[Example],
    cache: Option<&FeatureCache>,
    indices: &[usize],
    max_physical_batch: impl Into<MicroBatchLimits>,
    num_params: usize,
    mech: &Mechanism,
    noise: &GaussianNoise,
    step: u64,
    how: ClipImpl,
) -> Result<(Tensor, StepReport)> {
    let (grad, _, report) = private_gradient_audited(
        model,
        examples,
        cache,
        indices,
        max_physical_batch,
        num_params,
        mech,
        noise,
        step,
        how,
        None,
    )?;
    Ok((grad, report))
}

/// The gradient canaries of a white-box audit (`crate::audit::GradientCanaries`) sampled into one
/// step: canary k is an example whose gradient is `value` on coordinate k of a block of `count`
/// coordinates appended after the model's, and zero on the model's (a Dirac canary no record
/// touches). Its row goes through the same norm, clip-factor and clipped-sum kernels as the
/// records', and the block is noised by the same call as the model's coordinates.
#[derive(Debug, Clone, Copy)]
pub struct CanaryBlock<'a> {
    /// Canary ids (< count) in this step's sample.
    pub sampled: &'a [usize],
    pub count: usize,
    pub value: f32,
}

/// `private_gradient_with` with gradient canaries in the sample: returns the privatised model
/// gradient [P] and, with `canaries`, the privatised canary block [count] (÷ L like the rest).
/// Records and canaries touch disjoint coordinates, so clipping them in separate groups gives
/// every example exactly the factor it would get in one [b, P + count] matrix.
#[allow(clippy::too_many_arguments)]
pub fn private_gradient_audited(
    model: &dyn DpModel,
    examples: &[Example],
    cache: Option<&FeatureCache>,
    indices: &[usize],
    max_physical_batch: impl Into<MicroBatchLimits>,
    num_params: usize,
    mech: &Mechanism,
    noise: &GaussianNoise,
    step: u64,
    how: ClipImpl,
    canaries: Option<CanaryBlock>,
) -> Result<(Tensor, Option<Tensor>, StepReport)> {
    let mut report = StepReport::default();
    // The sum over micro-batches accumulates in f64 (each micro-batch's sum is itself accumulated
    // in f64 and rounded to f32 once) and is rounded to f32 once, before the noise.
    let mut sum64 = Tensor::zeros(num_params, DType::F64, model.device())?;
    let mut losses = Vec::new();
    let mut factors = Vec::new();
    for mb in make_micro_batches(examples, indices, max_physical_batch) {
        let batch = Batch::gather(examples, &mb, cache, model.device())?;
        let m = clipped_sum_micro_batch_kind(model, &batch, mech.clip, mech.clip_kind, how)?;
        sum64 = (sum64 + m.sum.to_dtype(DType::F64)?)?;
        losses.push(m.loss_sum);
        factors.push(m.factors);
        report.batch_size += m.size;
        report.tokens += m.tokens;
        report.micro_batches += 1;
        profile::mark(model.device(), "other")?;
    }
    let canary_sum = match canaries {
        Some(c) => Some(canary_block_sum(&c, mech, model.device())?),
        None => None,
    };
    let mut sum = sum64.to_dtype(DType::F32)?;
    drop(sum64);
    if let Some(c) = &canary_sum {
        report.canaries = canaries.map_or(0, |c| c.sampled.len());
        sum = Tensor::cat(&[&sum, c], 0)?;
    }
    // Noise once per logical step, also when the batch was empty (PITFALLS 4, 5).
    if mech.noise_multiplier > 0.0 {
        let Some(clip) = mech.clip else {
            candle_core::bail!("noise without clipping has no sensitivity bound: refusing");
        };
        report.noised_coordinates =
            noise.add_noise_tensor(&sum, step, faults::noise_std(mech.noise_multiplier * clip))?;
    }
    profile::mark(model.device(), "noise")?;
    // Divide by the expected batch size, never the realised one (PITFALLS 2).
    let grad = (sum / mech.expected_batch_size as f64)?;
    let (grad, canary_grad) = match canary_sum {
        Some(c) => (grad.narrow(0, 0, num_params)?, Some(grad.narrow(0, num_params, c.elem_count())?)),
        None => (grad, None),
    };
    // Statistics (host side; never used by the mechanism).
    for l in &losses {
        report.loss_sum += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    for f in &factors {
        for &f in &f.to_vec1::<f32>()? {
            match f {
                0.0 => report.nonfinite += 1,
                f if f < 1.0 => report.clipped += 1,
                _ => {}
            }
        }
    }
    profile::mark(model.device(), "other")?;
    Ok((grad, canary_grad, report))
}

/// Σ of the clipped canary rows of one step ([count] f32; zeros when none was sampled).
fn canary_block_sum(c: &CanaryBlock, mech: &Mechanism, dev: &candle_core::Device) -> Result<Tensor> {
    if c.sampled.is_empty() {
        return Tensor::zeros(c.count, DType::F32, dev);
    }
    if mech.clip_kind == crate::privacy::ClipKind::PerLayer {
        candle_core::bail!("gradient canaries with per-layer clipping are not implemented (a canary has no layer)");
    }
    let mut rows = vec![0f32; c.sampled.len() * c.count];
    for (r, &k) in c.sampled.iter().enumerate() {
        if k >= c.count {
            candle_core::bail!("gradient canary {k} of {}", c.count);
        }
        rows[r * c.count + k] = c.value;
    }
    let parts = faults::mix(vec![Tensor::from_vec(rows, (c.sampled.len(), c.count), dev)?])?;
    let sq = per_example_sq_norms(&parts)?;
    let factors = clip_factors_kind(&sq, faults::clip(mech.clip), mech.clip_kind)?;
    clipped_sum(&parts, &factors)
}

/// Deliberate defects of the DP step, for showing that the white-box audit catches them
/// (`crate::audit`). They exist in test builds only: in any other build every function here is
/// the identity, and nothing can switch a defect on.
pub(crate) mod faults {
    use candle_core::{Result, Tensor};

    #[cfg(test)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fault {
        None,
        /// The noise's standard deviation divided by 4.
        NoiseQuarter,
        /// No clipping (the noise still scaled to C).
        SkipClipping,
        /// Every example's per-example gradient also carries those of the rest of its
        /// micro-batch (a reduction over the wrong axis): examples leak into each other.
        MixedExamples,
    }

    #[cfg(test)]
    thread_local! {
        static FAULT: std::cell::Cell<Fault> = const { std::cell::Cell::new(Fault::None) };
    }

    /// Run `f` with `fault` switched on in this thread's DP steps.
    #[cfg(test)]
    pub(crate) fn with<T>(fault: Fault, f: impl FnOnce() -> T) -> T {
        FAULT.with(|c| c.set(fault));
        let out = f();
        FAULT.with(|c| c.set(Fault::None));
        out
    }

    #[cfg(test)]
    fn current() -> Fault {
        FAULT.with(|c| c.get())
    }

    pub(super) fn noise_std(std: f64) -> f64 {
        #[cfg(test)]
        if current() == Fault::NoiseQuarter {
            return std / 4.0;
        }
        std
    }

    pub(super) fn clip(clip: Option<f64>) -> Option<f64> {
        #[cfg(test)]
        if current() == Fault::SkipClipping {
            return None;
        }
        clip
    }

    pub(super) fn mix(parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        #[cfg(test)]
        if current() == Fault::MixedExamples {
            return parts.iter().map(|p| p.sum_keepdim(0)?.broadcast_as(p.shape())?.contiguous()).collect();
        }
        Ok(parts)
    }
}
