//! The exact-erf GELU and its derivative on the CPU, fast: x · Φ(x) and Φ(x) + x φ(x).
//!
//! The slow twins (`*_reference`) evaluate libm's f64 `erfc` one element at a time; libm's `erf`
//! in the same form, 0.5·x·(1 + erf(x/√2)), was the CPU implementation until the quickstart profile showed them taking about a third of a training
//! step on one core while the other idled. The fast path evaluates, in f64 lanes with no branches
//! (so the compiler vectorises it), Φ(x) = erfc(−x/√2) / 2 with the Chebyshev fit of Numerical
//! Recipes' `erfcc` (relative error below 1.2e-7 on all of z ≥ 0, so Φ is accurate in relative
//! terms in the far negative tail too, where 1 + erf(x/√2) would cancel), and a branch-free exp;
//! results are rounded to f32 once. Tests bound the difference to the twins on a dense grid and on
//! random inputs, and non-finite inputs take the twin's path, so NaN and ±inf propagate as before.
//! Large inputs are split across threads (rayon), each element computed independently, so the
//! result does not depend on the thread count.

use super::vexp::multiversion;
use rayon::prelude::*;

const INV_SQRT2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// Elements per parallel chunk: below this, threads cost more than they save.
const CHUNK: usize = 1 << 14;

/// x · Φ(x) with libm's f64 erfc, Φ(x) = erfc(−x/√2) / 2 (not (1 + erf(x/√2)) / 2, which
/// cancels to nothing below x ≈ −8): the slow twin of [`gelu_forward`].
pub fn gelu_reference(x: f32) -> f32 {
    let v = x as f64;
    (0.5 * v * libm::erfc(-v * INV_SQRT2)) as f32
}

/// (Φ(x) + x φ(x)) · g with libm's f64 erfc and exp: the slow twin of [`gelu_backward`].
pub fn gelu_grad_reference(x: f32, g: f32) -> f32 {
    let v = x as f64;
    let d = 0.5 * libm::erfc(-v * INV_SQRT2) + v * INV_SQRT_2PI * (-0.5 * v * v).exp();
    (d * g as f64) as f32
}

/// c[0] + c[1] x + … + c[9] x⁹ by Estrin's scheme: a dependency chain of depth 5 instead of
/// Horner's 9 (these loops are latency-bound).
#[inline(always)]
fn poly9(x: f64, c: [f64; 10]) -> f64 {
    let x2 = x * x;
    let x4 = x2 * x2;
    let p01 = c[0] + c[1] * x;
    let p23 = c[2] + c[3] * x;
    let p45 = c[4] + c[5] * x;
    let p67 = c[6] + c[7] * x;
    let p89 = c[8] + c[9] * x;
    let q03 = p01 + p23 * x2;
    let q47 = p45 + p67 * x2;
    (q03 + q47 * x4) + p89 * (x4 * x4)
}

/// e^y for y in [−700, 700], branch-free: y = k ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor
/// series to r⁹/9! (truncation below 1e-11 relative, far below f32's 6e-8), 2^k put straight
/// into the exponent bits.
#[inline(always)]
fn exp_f64(y: f64) -> f64 {
    // Adding 1.5·2⁵² rounds y·log2(e) to the nearest integer k and leaves k in the low bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const TAYLOR: [f64; 10] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
    ];
    let y = y.clamp(-700.0, 700.0);
    let shifted = y * std::f64::consts::LOG2_E + SHIFT;
    let k = shifted - SHIFT;
    let r = (y - k * LN2_HI) - k * LN2_LO;
    let k_int = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    let scale = f64::from_bits(k_int.wrapping_add(1023) << 52);
    poly9(r, TAYLOR) * scale
}

/// (Φ(x), min(|x|/√2, 26)) for finite x, in f64: the normal CDF from NR's erfc fit.
#[inline(always)]
fn normal_cdf(x: f64) -> (f64, f64) {
    // |x| / √2, capped where erfc(z) is far below f32's smallest value anyway.
    let z = (x.abs() * INV_SQRT2).min(26.0);
    let t = 1.0 / (1.0 + 0.5 * z);
    const NR_ERFCC: [f64; 10] = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let p = poly9(t, NR_ERFCC);
    let half_erfc = 0.5 * t * exp_f64(p - z * z);
    let cdf = if x < 0.0 { half_erfc } else { 1.0 - half_erfc };
    (cdf, z)
}

multiversion! {
    /// The fast forward on one slice (AVX-512, AVX2 or baseline code, chosen at run time).
    pub fn forward_slice(x: &[f32], y: &mut [f32]) -> () {
        for (o, &v) in y.iter_mut().zip(x) {
            let v = v as f64;
            *o = (v * normal_cdf(v).0) as f32;
        }
    }
}

multiversion! {
    /// The fast backward on one slice (AVX-512, AVX2 or baseline code, chosen at run time).
    pub fn backward_slice(x: &[f32], g: &[f32], out: &mut [f32]) -> () {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            let v = v as f64;
            let (cdf, z) = normal_cdf(v);
            let pdf = INV_SQRT_2PI * exp_f64(-z * z);
            *o = ((cdf + v * pdf) * g as f64) as f32;
        }
    }
}

/// Whether any element is NaN or ±inf (a fold, not a short-circuit, so that it vectorises).
fn any_non_finite(x: &[f32]) -> bool {
    x.iter().fold(false, |acc, v| acc | !v.is_finite())
}

fn forward_chunk(x: &[f32], y: &mut [f32]) {
    forward_slice(x, y);
    // The fast path assumes finite inputs; the rare others take the reference's path.
    if any_non_finite(x) {
        for (o, &v) in y.iter_mut().zip(x) {
            if !v.is_finite() {
                *o = gelu_reference(v);
            }
        }
    }
}

fn backward_chunk(x: &[f32], g: &[f32], out: &mut [f32]) {
    backward_slice(x, g, out);
    if any_non_finite(x) || any_non_finite(g) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            if !v.is_finite() || !g.is_finite() {
                *o = gelu_grad_reference(v, g);
            }
        }
    }
}

/// x · Φ(x) for every element. Non-finite inputs give what the reference gives (NaN stays NaN).
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if x.len() <= CHUNK {
        forward_chunk(x, &mut y);
    } else {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| forward_chunk(x, y));
    }
    y
}

/// (Φ(x) + x φ(x)) · g for every element pair. Non-finite inputs give what the reference gives.
pub fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), g.len(), "gelu backward: input and gradient lengths differ");
    let mut out = vec![0f32; x.len()];
    if x.len() <= CHUNK {
        backward_chunk(x, g, &mut out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| backward_chunk(x, g, o));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Relative difference, measured against the larger of |reference| and a floor below which
    /// f32 cannot hold the value to full precision anyway.
    fn rel(got: f32, want: f32, floor: f64) -> f64 {
        (got as f64 - want as f64).abs() / (want as f64).abs().max(floor)
    }

    #[test]
    fn fast_exp_matches_std_exp_to_1e_11_relative_over_its_range() {
        let mut worst = 0f64;
        let mut y = -700.0;
        while y < 700.0 {
            let r = (exp_f64(y) - y.exp()).abs() / y.exp();
            worst = worst.max(r);
            y += 0.0137;
        }
        assert!(worst < 1e-11, "worst relative error {worst:e}");
    }

    #[test]
    fn fast_gelu_forward_matches_the_f64_erf_reference_on_a_dense_grid() {
        let xs: Vec<f32> = (0..600_001).map(|i| -30.0 + i as f32 * 1e-4).collect();
        let got = gelu_forward(&xs);
        let mut worst = (0f64, 0f32);
        for (&x, &y) in xs.iter().zip(&got) {
            let r = rel(y, gelu_reference(x), 1e-37);
            if r > worst.0 {
                worst = (r, x);
            }
        }
        // NR's erfc fit is within 1.2e-7; rounding to f32 adds at most 6e-8.
        assert!(worst.0 < 2.5e-7, "worst relative error {:e} at x = {}", worst.0, worst.1);
    }

    #[test]
    fn fast_gelu_backward_matches_the_f64_reference_on_a_dense_grid() {
        let xs: Vec<f32> = (0..600_001).map(|i| -30.0 + i as f32 * 1e-4).collect();
        let gs: Vec<f32> = xs.iter().enumerate().map(|(i, _)| 0.5 + (i % 7) as f32 * 0.3).collect();
        let got = gelu_backward(&xs, &gs);
        let mut worst = (0f64, 0f32);
        for ((&x, &g), &d) in xs.iter().zip(&gs).zip(&got) {
            // Φ(x) + xφ(x) crosses zero near x = −0.75: there the natural scale of the error is
            // the size of the two terms, not of their sum.
            let v = x as f64;
            let scale = (0.5 * libm::erfc(-v * INV_SQRT2) + (v * INV_SQRT_2PI * (-0.5 * v * v).exp()).abs()) * g as f64;
            let err = (d as f64 - gelu_grad_reference(x, g) as f64).abs() / scale.max(1e-37);
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 < 3e-7, "worst relative error {:e} at x = {}", worst.0, worst.1);
    }

    #[test]
    fn fast_gelu_matches_the_reference_on_random_inputs_of_many_sizes_split_across_threads() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(17);
        for n in [0usize, 1, 3, 7, 8, 33, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 13] {
            let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0f32..8.0) * rng.random_range(0.0f32..1.0)).collect();
            let gs: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let fwd = gelu_forward(&xs);
            let bwd = gelu_backward(&xs, &gs);
            for i in 0..n {
                assert!(rel(fwd[i], gelu_reference(xs[i]), 1e-30) < 2.5e-7, "n = {n}, x = {}", xs[i]);
                let want = gelu_grad_reference(xs[i], gs[i]);
                assert!(
                    (bwd[i] - want).abs() as f64 <= 3e-7 * (gs[i].abs() as f64 * 1.2).max(1e-30),
                    "n = {n}, x = {}",
                    xs[i]
                );
            }
        }
    }

    #[test]
    fn non_finite_inputs_propagate_as_in_the_reference() {
        let xs = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -2.0];
        let gs = [1.0, 1.0, 1.0, f32::NAN, f32::INFINITY];
        let fwd = gelu_forward(&xs);
        assert!(fwd[0].is_nan());
        assert_eq!(fwd[1], f32::INFINITY);
        assert!(fwd[2].is_nan(), "−inf · Φ(−inf) is 0 · inf in the reference: NaN, counted as non-finite");
        let bwd = gelu_backward(&xs, &gs);
        assert!(bwd[0].is_nan());
        assert!(bwd[3].is_nan(), "a NaN upstream gradient stays NaN");
        assert!(bwd[4].is_infinite());
        for i in 0..xs.len() {
            let want = gelu_grad_reference(xs[i], gs[i]);
            assert!(bwd[i].to_bits() == want.to_bits() || (bwd[i].is_nan() && want.is_nan()), "i = {i}");
        }
    }
}
