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
    fn first_and_last_record_have_the_same_inclusion_rate() {
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

    /// Independence, not just the right rates (a shuffled fixed-size batch, or all-or-nothing
    /// inclusion, has every record's rate right): over k = 20,000 batches of n = 50 records at
    /// q = 0.2, (a) pairs of records, adjacent and distant, are both in a batch with frequency q²,
    /// and a record is in two consecutive batches with frequency q² (each count within 6 sd of
    /// k·q², sd = √(k·q²(1 − q²))); (b) batch sizes are Binomial(n, q): mean nq and variance
    /// nq(1 − q), the sample variance within 6 of its sd √((2/(k − 1) + κ/k))·σ², κ the excess
    /// kurtosis (1 − 6q(1 − q))/(nq(1 − q)). A correct sampler fails this with probability < 1e-7.
    #[test]
    fn inclusions_are_pairwise_independent_and_batch_sizes_binomial() {
        let (n, q, k) = (50usize, 0.2f64, 20_000usize);
        let mut s = PoissonSampler::from_seed(q, [21; 32]);
        let pairs = [(0usize, 1usize), (24, 25), (48, 49), (0, 49), (3, 30), (10, 11)];
        let mut joint = [0usize; 6];
        let mut consecutive = [0usize; 3];
        let mut sizes = Vec::with_capacity(k);
        let mut prev = vec![false; n];
        for t in 0..k {
            let mut inb = vec![false; n];
            for i in s.sample(n) {
                inb[i] = true;
            }
            for (c, &(i, j)) in joint.iter_mut().zip(&pairs) {
                *c += (inb[i] && inb[j]) as usize;
            }
            if t > 0 {
                for (c, i) in consecutive.iter_mut().zip([0usize, 17, 49]) {
                    *c += (prev[i] && inb[i]) as usize;
                }
            }
            sizes.push(inb.iter().filter(|&&x| x).count() as f64);
            prev = inb;
        }
        let q2 = q * q;
        let check = |what: String, count: usize, trials: usize| {
            let (mean, sd) = (trials as f64 * q2, (trials as f64 * q2 * (1.0 - q2)).sqrt());
            assert!((count as f64 - mean).abs() < 6.0 * sd, "{what}: {count} vs {mean} ± {sd}");
        };
        for (&c, (i, j)) in joint.iter().zip(pairs) {
            check(format!("records {i} and {j} together"), c, k);
        }
        for (&c, i) in consecutive.iter().zip([0usize, 17, 49]) {
            check(format!("record {i} in consecutive batches"), c, k - 1);
        }
        let kf = k as f64;
        let var = n as f64 * q * (1.0 - q);
        let mean = sizes.iter().sum::<f64>() / kf;
        assert!((mean - n as f64 * q).abs() < 6.0 * (var / kf).sqrt(), "mean batch size {mean}");
        let s2 = sizes.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (kf - 1.0);
        let kurt = (1.0 - 6.0 * q * (1.0 - q)) / var;
        let sd_s2 = var * (2.0 / (kf - 1.0) + kurt / kf).sqrt();
        assert!((s2 - var).abs() < 6.0 * sd_s2, "batch-size variance {s2} vs Binomial's {var} ± {sd_s2}");
    }
}
