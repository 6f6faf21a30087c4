//! Per-example clipping and summation.
//!
//! Flat clipping: example i is scaled by min(1, C' / (‖g_i‖ + 1e-6)), ‖·‖ the L2 norm over all
//! trainable tensors together and C' = C·CLIP_MARGIN (see there), so every clipped gradient has
//! norm ≤ C in floating point too and the sum has add/remove-one sensitivity C. An example whose gradient is not finite is zeroed (not skipped
//! silently: it is counted in the stats) before the sum.

use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct ClipStats {
    /// Per-example L2 norms before clipping (non-finite ones as NaN/inf).
    pub norms: Vec<f32>,
    /// Examples whose gradient was scaled down.
    pub clipped: usize,
    /// Examples whose gradient had a NaN or inf and was zeroed.
    pub nonfinite: usize,
}

/// Examples are clipped to C·CLIP_MARGIN, not C: the clip factor is stored in f32 (relative
/// rounding ≤ 2⁻²⁴) and each scaled value is rounded to f32 once more (≤ 2⁻²⁴), so a clipped norm
/// computed exactly is at most C·CLIP_MARGIN·(1 + 2⁻²⁴)²·(1 + 2⁻⁵²) < C. The margin costs a
/// relative 1e-6 of the signal; without it a clipped norm could exceed C by ~2⁻²⁴ relative.
pub const CLIP_MARGIN: f64 = 1.0 - 1.0 / (1u64 << 20) as f64;

/// Clip factor for one example's gradient norm: min(1, C·CLIP_MARGIN / (‖g‖ + 1e-6)).
pub fn clip_factor(norm: f64, c: f64) -> f64 {
    (c * CLIP_MARGIN / (norm + 1e-6)).min(1.0)
}

/// How per-example gradients are bounded. Both give every scaled gradient a norm below C, so the
/// sum's add/remove-one sensitivity is C either way.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ClipKind {
    /// Scale by min(1, C' / (‖g‖ + 1e-6)): gradients under C pass unchanged.
    #[default]
    Flat,
    /// Automatic clipping (Bu et al., NeurIPS 2023, "AUTO-S"): scale every example by
    /// C' / (‖g‖ + γ), so its norm C'‖g‖/(‖g‖ + γ) is below C' for any ‖g‖ and there is no
    /// threshold to tune (C only scales the update, which Adam normalises away); γ > 0 keeps small
    /// gradients from being blown up to norm C.
    Automatic { stability: f64 },
    /// Per-layer clipping: each adapted layer's (A, B) and the head's (W, b) gradient is clipped
    /// flat to C/√G (G groups), so the whole gradient's norm is ≤ C. Implemented in the DP step
    /// (`train::step`), over groups of the per-example parts.
    PerLayer,
}

impl ClipKind {
    /// The factor for one example's whole-gradient norm with clip norm `c` (C' = c·CLIP_MARGIN);
    /// `None` for per-layer clipping, which has one factor per group, not one per example (the
    /// step computes those).
    pub fn factor(self, norm: f64, c: f64) -> Option<f64> {
        match self {
            ClipKind::Flat => Some(clip_factor(norm, c)),
            ClipKind::Automatic { stability } => Some(c * CLIP_MARGIN / (norm + stability)),
            ClipKind::PerLayer => None,
        }
    }
}

/// Clip each row of `per_example` [b, P] to norm `clip` (no clipping when `None`, for the
/// non-private baseline) and sum the rows: returns ([P], stats).
pub fn clip_and_sum(per_example: &Tensor, clip: Option<f64>) -> Result<(Tensor, ClipStats)> {
    let (b, p) = per_example.dims2()?;
    if b == 0 {
        return Ok((Tensor::zeros(p, DType::F32, per_example.device())?, ClipStats::default()));
    }
    let sq: Vec<f32> = per_example.sqr()?.sum(1)?.to_vec1()?;
    let mut stats = ClipStats::default();
    let mut factors = Vec::with_capacity(b);
    let mut finite = Vec::with_capacity(b);
    for &s in &sq {
        let norm = (s as f64).sqrt();
        stats.norms.push(norm as f32);
        if !norm.is_finite() {
            stats.nonfinite += 1;
            factors.push(0.0f32);
            finite.push(0u8);
            continue;
        }
        finite.push(1u8);
        let f = clip.map_or(1.0, |c| clip_factor(norm, c));
        if f < 1.0 {
            stats.clipped += 1;
        }
        factors.push(f as f32);
    }
    let dev = per_example.device();
    let rows = if stats.nonfinite > 0 {
        // 0 · NaN is NaN: replace bad rows instead of scaling them.
        let keep = Tensor::from_vec(finite, (b, 1), dev)?.broadcast_as((b, p))?;
        keep.where_cond(per_example, &per_example.zeros_like()?)?
    } else {
        per_example.clone()
    };
    let f = Tensor::from_vec(factors, (b, 1), dev)?;
    Ok((rows.broadcast_mul(&f)?.sum(0)?, stats))
}

/// The obviously-correct twin: f64 loops over plain vectors.
pub fn clip_and_sum_reference(per_example: &[Vec<f32>], clip: f64) -> (Vec<f64>, usize) {
    clip_and_sum_reference_kind(per_example, clip, ClipKind::Flat)
}

/// The same for any `ClipKind`.
pub fn clip_and_sum_reference_kind(per_example: &[Vec<f32>], clip: f64, kind: ClipKind) -> (Vec<f64>, usize) {
    let p = per_example.first().map_or(0, |r| r.len());
    let mut sum = vec![0f64; p];
    let mut nonfinite = 0;
    for row in per_example {
        if row.iter().any(|v| !v.is_finite()) {
            nonfinite += 1;
            continue;
        }
        let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        let f = kind.factor(norm, clip).expect("per-layer clipping has per-group factors: use the step's grouped twin");
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += f * v as f64;
        }
    }
    (sum, nonfinite)
}
