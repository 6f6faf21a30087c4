//! Poisson sampling: every record is in the logical batch independently with probability q.
//!
//! This is the sampling the accountant assumes; there is deliberately no shuffling or
//! fixed-size alternative. Batches vary in size and may be empty.

use crate::privacy::streams::uniform01;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub struct PoissonSampler {
    rng: ChaCha20Rng,
    q: f64,
}

impl PoissonSampler {
    /// `rng` must be the sampling stream (separate from noise and initialisation).
    pub fn new(q: f64, rng: ChaCha20Rng) -> Self {
        assert!((0.0..=1.0).contains(&q), "sampling rate must be in [0, 1]");
        PoissonSampler { rng, q }
    }

    pub fn from_seed(q: f64, seed: [u8; 32]) -> Self {
        Self::new(q, ChaCha20Rng::from_seed(seed))
    }

    pub fn q(&self) -> f64 {
        self.q
    }

    /// The stream's exact position (checkpoints).
    pub fn rng(&self) -> &ChaCha20Rng {
        &self.rng
    }

    /// Indices of the records of one logical batch, out of `n` records.
    pub fn sample(&mut self, n: usize) -> Vec<usize> {
        (0..n).filter(|_| uniform01(&mut self.rng) < self.q).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over n·k Bernoulli(q) draws the count has std sqrt(nkq(1−q)); a 6-sigma band fails a
    /// correct sampler with probability < 2e-9 (normal tail), so this test is not flaky.
    #[test]
    fn poisson_inclusion_rate_matches_q() {
        for &q in &[0.01, 0.05, 0.3] {
            let mut s = PoissonSampler::from_seed(q, [7; 32]);
            let (n, k) = (5000usize, 200usize);
            let total: usize = (0..k).map(|_| s.sample(n).len()).sum();
            let trials = (n * k) as f64;
            let sd = (trials * q * (1.0 - q)).sqrt();
            assert!((total as f64 - trials * q).abs() < 6.0 * sd, "q={q}: {total} vs {}", trials * q);
        }
    }

    #[test]
    fn poisson_batches_vary_in_size_and_can_be_empty() {
        let mut s = PoissonSampler::from_seed(0.001, [3; 32]);
        let sizes: Vec<usize> = (0..2000).map(|_| s.sample(1000).len()).collect();
        assert!(sizes.contains(&0), "with E[size] = 1, some batches must be empty");
        assert!(sizes.iter().any(|&x| x >= 3));
    }

    #[test]
    fn every_record_is_sampled_independently_of_position() {
        // Inclusion counts of the first and last record agree within 6 sigma.
        let mut s = PoissonSampler::from_seed(0.2, [9; 32]);
        let mut counts = [0usize; 2];
        let k = 20000;
        for _ in 0..k {
            let b = s.sample(10);
            counts[0] += b.contains(&0) as usize;
            counts[1] += b.contains(&9) as usize;
        }
        let sd = (k as f64 * 0.2 * 0.8).sqrt();
        for c in counts {
            assert!((c as f64 - k as f64 * 0.2).abs() < 6.0 * sd);
        }
    }
}
