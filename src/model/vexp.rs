//! A branch-free f32 exponential that the compiler vectorises, and the row kernels built on it
//! (exponentials shifted by a row's max and summed; SwiGLU), compiled for AVX-512 and AVX2 and
//! chosen at run time.
//!
//! libm's `expf` is a call per element: in the profile of a SmolLM2 step the softmax rows, the
//! vocabulary log-sum-exp and SwiGLU's sigmoid spent 5.5% of all cycles there. `exp` here is
//! Cephes' `expf` scheme (x = k ln 2 + r, |r| ≤ ln 2 / 2, a degree-6 polynomial for e^r, 2^k put
//! into the exponent bits) written without branches or calls, so loops over slices become
//! vector code. No fused multiply-add is used (Rust does not contract a·b + c), so every version
//! computes the same IEEE operations in the same order and gives the same bits, by construction
//! (the tests run the version the test machine selects; `dptrain selftest` checks the model ops
//! built on these kernels on the user's own CPU). Results below f32's smallest normal number are
//! flushed to 0 (e^x < 1.2e-38: x < −87.34), so a masked score (−1e30) gives exactly 0 as before.
//! Sums are accumulated in f64 in 16 fixed lanes, then added in lane order: the result does not
//! depend on the thread count or the instruction set. Tests bound the error against f64 `exp`.

/// Below this, e^x is under f32's smallest normal number: 0.
const MIN_X: f32 = -87.336_55;
/// Above this (127.5 ln 2, where 2^k would need k = 128), +inf. (f32 itself overflows at 88.72;
/// between the two the true value is finite but above 2.4e38: no softmax or sigmoid input here
/// gets near it, as they exponentiate x − max ≤ 0 and −|x|.)
const MAX_X: f32 = 88.376_26;

/// e^x, branch-free; relative error below 2.5e-7 on [−87.3, 88.37], 0 below, +inf above, NaN
/// for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k · LN2_HI is exact for |k| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer and leaves the integer in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2E + SHIFT;
    let k = t - SHIFT;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2^k: k + 127 into the exponent field (k's bits are the low bits of t).
    let bits = (t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23;
    let y = er * f32::from_bits(bits as u32);
    // Flush below the normal range (and −inf) to 0, overflow to +inf; NaN passes through (every
    // comparison with NaN is false).
    let y = if x < MIN_X { 0.0 } else { y };
    if x > MAX_X {
        f32::INFINITY
    } else {
        y
    }
}

/// Compiles `$body` three times — for AVX-512, for AVX2, and for the baseline — and picks the
/// best the CPU has at run time. Every version computes the same IEEE operations.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

pub(crate) use multiversion;

const LANES: usize = 16;

multiversion! {
    /// row ← e^(row − shift) when `write` (else row is left as it is), returning Σ e^(row − shift)
    /// accumulated in f64 in 16 fixed lanes.
    pub fn exp_shifted_sum(row: &mut [f32], shift: f32, write: bool) -> f64 {
        let mut acc = [0f64; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                let e = exp(*v - shift);
                *a += e as f64;
                if write {
                    *v = e;
                }
            }
        }
        for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
            let e = exp(*v - shift);
            *a += e as f64;
            if write {
                *v = e;
            }
        }
        acc.iter().sum()
    }
}

/// σ(x) = 1 / (1 + e^(−x)).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// y = silu(a) · u = a σ(a) u, elementwise.
    pub fn swiglu_forward(a: &[f32], u: &[f32], y: &mut [f32]) -> () {
        for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
            *y = a * sigmoid(a) * u;
        }
    }
}

multiversion! {
    /// d a = g · u · σ(a) (1 + a (1 − σ(a))) and d u = g · a σ(a), elementwise.
    pub fn swiglu_backward(a: &[f32], u: &[f32], g: &[f32], da: &mut [f32], du: &mut [f32]) -> () {
        for ((((da, du), &a), &u), &g) in da.iter_mut().zip(du.iter_mut()).zip(a).zip(u).zip(g) {
            let s = sigmoid(a);
            *da = g * u * s * (1.0 + a * (1.0 - s));
            *du = g * a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_within_2_5e_7_of_f64_exp_and_exact_at_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.37 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        for x in [-1e30f32, -88.0, f32::NEG_INFINITY, -1000.0] {
            assert_eq!(exp(x), 0.0, "e^{x}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn shifted_sums_match_a_scalar_f64_sum_for_every_length() {
        for n in [0usize, 1, 5, 16, 17, 100, 4099] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0).collect();
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let want: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let mut written = row.clone();
            let got = exp_shifted_sum(&mut written, max, true);
            assert!((got - want).abs() <= 3e-7 * want.max(1e-300), "n = {n}: {got} vs {want}");
            let mut kept = row.clone();
            assert_eq!(exp_shifted_sum(&mut kept, max, false), got, "n = {n}: same sum without writing");
            assert_eq!(kept, row, "n = {n}: row left as it is");
            for (w, &v) in written.iter().zip(&row) {
                assert!(((*w as f64) - ((v - max) as f64).exp()).abs() <= 3e-7 * ((v - max) as f64).exp());
            }
        }
    }

    #[test]
    fn swiglu_kernels_match_the_f64_formulas() {
        let n = 1000;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 25.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 13) % 11) as f32 / 5.0 - 1.0).collect();
        let (mut y, mut da, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        swiglu_forward(&a, &u, &mut y);
        swiglu_backward(&a, &u, &g, &mut da, &mut du);
        for i in 0..n {
            let (a, u, g) = (a[i] as f64, u[i] as f64, g[i] as f64);
            let s = 1.0 / (1.0 + (-a).exp());
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs());
            assert!(close(y[i], a * s * u), "y at {a}");
            assert!(close(da[i], g * u * s * (1.0 + a * (1.0 - s))), "da at {a}");
            assert!(close(du[i], g * a * s), "du at {a}");
        }
    }
}
