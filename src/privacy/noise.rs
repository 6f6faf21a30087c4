//! Gaussian noise from a cryptographically secure, counter-based generator.
//!
//! The noise of step t at coordinate j is a fixed function of (secret key, t, j): ChaCha20
//! keystream block ⌊j/2⌋ of stream t, 64-bit words 4(j mod 2) … 4(j mod 2)+3. That lets the GPU
//! kernel (`dp_add_gaussian_noise`, one thread per block) and this CPU twin draw the same noise,
//! and makes a step's noise independent of how many coordinates earlier steps used.
//!
//! Each N(0, s²) draw is the sum of 4 independent N(0, s²/4) draws (Holohan & Braghin 2021),
//! which removes the floating-point artefacts that let an attacker tell a noised value from its
//! neighbours (Jin et al. 2021). Normals come from Box–Muller on 53-bit uniforms, computed in
//! f64: constant time, no rejection loop (no timing side channel). The key is 256 bits drawn from
//! the noise stream (OS entropy unless the run is seeded) and never written anywhere.

use crate::kernels::NoiseKey;
use candle_core::{Result, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Number of Gaussians summed per draw.
pub const GAUSSIANS_PER_DRAW: usize = 4;

pub struct GaussianNoise {
    key: NoiseKey,
}

impl GaussianNoise {
    /// `rng` must be the noise stream (never shared with sampling or initialisation); the key is
    /// drawn from it.
    pub fn new(mut rng: ChaCha20Rng) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        GaussianNoise { key: NoiseKey::new(key) }
    }

    /// The generator of a checkpointed run (the key is as secret as the data).
    pub fn from_key(key: NoiseKey) -> Self {
        GaussianNoise { key }
    }

    pub fn key(&self) -> &NoiseKey {
        &self.key
    }

    /// Adds independent N(0, std²) noise to every coordinate of `values` (computed in f64, stored
    /// in f32) with the noise of `step`. Returns the number of coordinates noised.
    pub fn add_noise(&self, values: &mut [f32], step: u64, std: f64) -> usize {
        add_noise_cpu(values, &self.key, step, std);
        values.len()
    }

    /// The same on a tensor ([n] f32, contiguous, any device), in place.
    pub fn add_noise_tensor(&self, values: &Tensor, step: u64, std: f64) -> Result<usize> {
        crate::kernels::add_gaussian_noise(values, &self.key, step, std)?;
        Ok(values.elem_count())
    }
}

/// The CPU twin of the `dp_add_gaussian_noise` kernel (see the module comment for the layout).
pub fn add_noise_cpu(values: &mut [f32], key: &NoiseKey, stream: u64, std: f64) {
    let mut rng = ChaCha20Rng::from_seed(*key.bytes());
    rng.set_stream(stream);
    rng.set_word_pos(0);
    let part = std / (GAUSSIANS_PER_DRAW as f64).sqrt();
    for pair in values.chunks_mut(2) {
        let w: [u64; 8] = std::array::from_fn(|_| rng.next_u64());
        for (c, x) in pair.iter_mut().enumerate() {
            let mut z = 0.0f64;
            for p in 0..2 {
                let (a, b) = (w[4 * c + 2 * p], w[4 * c + 2 * p + 1]);
                let u1 = 1.0 - (a >> 11) as f64 * (1.0 / (1u64 << 53) as f64); // (0, 1]: ln is finite
                let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, co) = (std::f64::consts::TAU * u2).sin_cos();
                z += part * (r * co);
                z += part * (r * s);
            }
            *x = (*x as f64 + z) as f32;
        }
    }
}

/// The slow twin of [`add_noise_cpu`], written from the layout in the module comment with the
/// scalar block function `kernels::chacha::chacha20_block` (checked against RFC 8439's published
/// block) instead of rand_chacha: coordinate j reads block ⌊j/2⌋ of stream `stream` and, of its
/// 16 little-endian 32-bit words, words 8(j mod 2) … 8(j mod 2)+7 as four 64-bit words
/// a₀ b₀ a₁ b₁ (low word first). Each (a, b) gives a Box–Muller pair r·cos 2πu₂, r·sin 2πu₂ with
/// u₁ = 1 − ⌊a/2¹¹⌋·2⁻⁵³, u₂ = ⌊b/2¹¹⌋·2⁻⁵³, r = √(−2 ln u₁); each of the four normals is scaled
/// by std/2 and added in that order to z = 0 in f64, and the value becomes f32(value + z). The
/// operation order is part of the specification (the CUDA kernel follows it with round-to-nearest
/// intrinsics), so this twin and the fast path agree bit for bit. One block per coordinate: slow.
pub fn add_noise_reference(values: &mut [f32], key: &NoiseKey, stream: u64, std: f64) {
    let two_53 = (1u64 << 53) as f64;
    for (j, x) in values.iter_mut().enumerate() {
        let block = crate::kernels::chacha::chacha20_block(key.bytes(), (j / 2) as u64, stream);
        let word = |k: usize| {
            let lo = 8 * (j % 2) + 2 * k;
            block[lo] as u64 | (block[lo + 1] as u64) << 32
        };
        let scale = std / 2.0;
        let mut z = 0.0f64;
        for pair in 0..2 {
            let (a, b) = (word(2 * pair), word(2 * pair + 1));
            let u1 = 1.0 - (a >> 11) as f64 / two_53;
            let u2 = (b >> 11) as f64 / two_53;
            let r = (-2.0 * u1.ln()).sqrt();
            let angle = 2.0 * std::f64::consts::PI * u2;
            z += scale * (r * angle.cos());
            z += scale * (r * angle.sin());
        }
        *x = (*x as f64 + z) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64) -> GaussianNoise {
        GaussianNoise::new(ChaCha20Rng::seed_from_u64(seed))
    }

    /// n = 200,000 draws: the sample mean has sd std/√n, the sample variance sd ≈ std²·√(2/n).
    /// Bands of 6 sd fail a correct sampler with probability < 1e-8.
    #[test]
    fn noise_has_mean_zero_and_std_sigma_c() {
        let (sigma, c) = (1.3, 0.7);
        let std = sigma * c;
        let g = noise(5);
        let n = 200_000;
        let mut v = vec![0f32; n];
        g.add_noise(&mut v, 0, std);
        let xs: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(mean.abs() < 6.0 * std / (n as f64).sqrt(), "mean {mean}");
        assert!((var - std * std).abs() < 6.0 * std * std * (2.0 / n as f64).sqrt(), "var {var}");
        // Fourth moment of a Gaussian is 3σ⁴: catches a non-Gaussian shape with the right variance.
        let m4 = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64;
        assert!((m4 / (var * var) - 3.0).abs() < 0.1, "kurtosis {}", m4 / (var * var));
        // Neighbouring coordinates (same keystream block) are uncorrelated.
        let corr = xs.chunks(2).map(|p| p[0] * p[1]).sum::<f64>() / (n / 2) as f64 / var;
        assert!(corr.abs() < 6.0 / ((n / 2) as f64).sqrt(), "pair correlation {corr}");
    }

    #[test]
    fn every_step_draws_fresh_noise() {
        let g = noise(1);
        let mut a = vec![0f32; 1000];
        let mut b = vec![0f32; 1000];
        g.add_noise(&mut a, 0, 1.0);
        g.add_noise(&mut b, 1, 1.0);
        assert_ne!(a, b);
        // Consecutive steps are uncorrelated: |corr| < 6/√n.
        let corr: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>()
            / (a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() * b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
                .sqrt();
        assert!(corr.abs() < 6.0 / (1000f64).sqrt());
    }

    #[test]
    fn seeded_noise_reproduces_bit_for_bit_and_keys_differ_by_seed() {
        let (mut a, mut b, mut c) = (vec![0.5f32; 65], vec![0.5f32; 65], vec![0.5f32; 65]);
        noise(42).add_noise(&mut a, 3, 2.0);
        noise(42).add_noise(&mut b, 3, 2.0);
        noise(43).add_noise(&mut c, 3, 2.0);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
    }

    #[test]
    fn noise_of_a_prefix_does_not_depend_on_the_vector_length() {
        let g = noise(7);
        let (mut short, mut long) = (vec![0f32; 9], vec![0f32; 1000]);
        g.add_noise(&mut short, 2, 1.0);
        g.add_noise(&mut long, 2, 1.0);
        assert_eq!(short[..], long[..9]);
    }

    /// add_noise_cpu (rand_chacha's keystream, 8 u64 per coordinate pair) against the twin written
    /// from the specification on the RFC-checked scalar block function: bit for bit, for a known
    /// key, odd and even lengths, and streams that use both halves of the 64-bit stream id.
    #[test]
    fn cpu_noise_equals_the_scalar_reference_from_the_specification_bit_for_bit() {
        let key = NoiseKey::new(std::array::from_fn(|i| i as u8));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (n, stream, std) in
            [(0usize, 0u64, 1.0), (1, 0, 1.0), (2, 1, 0.3), (7, 0x4a00_0000, 2.5), (100, 1 << 40, 1.3)]
        {
            let start: Vec<f32> = (0..n).map(|i| (i as f32 - 3.0) * 0.37).collect();
            let (mut fast, mut slow) = (start.clone(), start.clone());
            add_noise_cpu(&mut fast, &key, stream, std);
            add_noise_reference(&mut slow, &key, stream, std);
            assert_eq!(bits(&fast), bits(&slow), "n = {n}, stream {stream}, std {std}");
            if n > 0 {
                assert_ne!(bits(&fast), bits(&start), "no noise was added");
            }
        }
        // The reference's first draw, by hand from the block words (a check on the reference itself).
        let w = crate::kernels::chacha::chacha20_block(key.bytes(), 0, 5);
        let u = |k: usize| ((w[2 * k] as u64 | (w[2 * k + 1] as u64) << 32) >> 11) as f64 / 9007199254740992.0;
        let normals = [(0, 1), (2, 3)].map(|(a, b)| {
            let r = (-2.0 * (1.0 - u(a)).ln()).sqrt();
            (r * (std::f64::consts::TAU * u(b)).cos(), r * (std::f64::consts::TAU * u(b)).sin())
        });
        let want = 0.5 * (normals[0].0 + normals[0].1 + normals[1].0 + normals[1].1);
        let mut v = [0f32];
        add_noise_cpu(&mut v, &key, 5, 1.0);
        assert!((v[0] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "{} vs {want}", v[0]);
    }

    /// The tensor op (what the training step calls; the CUDA kernel on a GPU) hands key, step and
    /// std to the CPU twin and noises exactly the tensor's own elements, also inside a larger
    /// buffer (a narrowed view starts at an offset).
    #[test]
    fn tensor_noise_op_noises_exactly_its_view_with_the_given_key_step_and_std() {
        let g = noise(11);
        let full = Tensor::from_vec(vec![0.25f32; 40], 40, &candle_core::Device::Cpu).unwrap();
        let view = full.narrow(0, 5, 31).unwrap();
        g.add_noise_tensor(&view, 5, 0.3).unwrap();
        let got = full.to_vec1::<f32>().unwrap();
        let mut want = vec![0.25f32; 31];
        add_noise_reference(&mut want, g.key(), 5, 0.3);
        assert_eq!(&got[5..36], &want[..]);
        assert!(got[..5].iter().chain(&got[36..]).all(|&x| x == 0.25), "noise outside the view: {got:?}");
    }
}
