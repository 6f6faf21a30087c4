//! Private selection with a random number of runs (Papernot & Steinke, "Hyperparameter Tuning
//! with Renyi Differential Privacy", ICLR 2022): run a DP mechanism Q K times, K drawn from a
//! truncated negative binomial distribution D(η, γ), release only the best run. If Q is
//! (λ, ε_λ)-RDP at every order λ of a grid, Theorem 2 gives the selection
//!
//!   ε'(λ) = ε_λ + log E[K] / (λ − 1) + (1 + η) · min over λ̂ of [ (1 − 1/λ̂) ε_λ̂ + log(1/γ) / λ̂ ],
//!
//! and since RDP is non-decreasing in the order, each ε'(λ) may be replaced by the smallest ε'
//! at an order ≥ λ. D(η, γ), for η > −1 and γ ∈ (0, 1): P[K = k] ∝ (1 − γ)^k ∏_{ℓ<k} (ℓ + η)/(ℓ + 1)
//! for k ≥ 1; η = 1 is the geometric distribution (mean 1/γ), η = 0 the logarithmic one. Here
//! η ≥ 0 (the range Google's dp_accounting implements, against which this module is tested:
//! tests/reference/repeat_and_select.json).

use super::AccountingError;

/// E[K] of D(η, γ): η(1 − γ) / (γ (1 − γ^η)) for η > 0, (1 − γ) / (γ log(1/γ)) for η = 0.
pub fn tnb_mean(shape: f64, gamma: f64) -> f64 {
    if shape == 0.0 {
        (1.0 - gamma) / (gamma * (1.0 / gamma).ln())
    } else {
        shape * (1.0 - gamma) / (gamma * (1.0 - gamma.powf(shape)))
    }
}

fn check_shape(shape: f64) -> Result<(), AccountingError> {
    if !(shape >= 0.0 && shape.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!(
            "the shape η of the number of runs must be a finite number ≥ 0, got {shape}"
        )));
    }
    Ok(())
}

/// The γ whose D(η, γ) has mean `mean` (> 1); E[K] falls from ∞ to 1 as γ goes from 0 to 1, so
/// bisection to the last bit.
pub fn tnb_gamma(shape: f64, mean: f64) -> Result<f64, AccountingError> {
    check_shape(shape)?;
    if !(mean > 1.0 && mean.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!("the mean number of runs must be > 1, got {mean}")));
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if tnb_mean(shape, mid) > mean {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(0.5 * (lo + hi))
}

/// The RDP vector of repeat-and-select (Theorem 2, then monotonicity in the order), from the
/// RDP vector `rdp` of one run at `orders` (each > 1).
pub fn repeat_and_select_rdp(orders: &[f64], rdp: &[f64], mean: f64, shape: f64) -> Result<Vec<f64>, AccountingError> {
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(AccountingError::InvalidParameter("orders and RDP values must pair up".into()));
    }
    if let Some(&bad) = orders.iter().find(|&&o| o <= 1.0 || o.is_nan()) {
        return Err(AccountingError::InvalidParameter(format!("RDP orders must be > 1, got {bad}")));
    }
    let gamma = tnb_gamma(shape, mean)?;
    let log_inv_gamma = -gamma.ln();
    let c = (1.0 + shape)
        * orders.iter().zip(rdp).map(|(&l, &e)| (1.0 - 1.0 / l) * e + log_inv_gamma / l).fold(f64::INFINITY, f64::min);
    let direct: Vec<f64> = orders.iter().zip(rdp).map(|(&l, &e)| e + mean.ln() / (l - 1.0) + c).collect();
    Ok(orders
        .iter()
        .map(|&l| orders.iter().zip(&direct).filter(|(&o, _)| o >= l).map(|(_, &v)| v).fold(f64::INFINITY, f64::min))
        .collect())
}

/// D(η, γ): the number of runs of a private selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruncatedNegativeBinomial {
    pub shape: f64,
    pub gamma: f64,
}

impl TruncatedNegativeBinomial {
    /// The distribution with shape η ≥ 0 and the given mean (> 1).
    pub fn with_mean(shape: f64, mean: f64) -> Result<Self, AccountingError> {
        Ok(TruncatedNegativeBinomial { shape, gamma: tnb_gamma(shape, mean)? })
    }

    pub fn mean(&self) -> f64 {
        tnb_mean(self.shape, self.gamma)
    }

    /// P[K = 1].
    fn p1(&self) -> f64 {
        let (eta, g) = (self.shape, self.gamma);
        if eta == 0.0 {
            (1.0 - g) / (1.0 / g).ln()
        } else {
            // (1 − γ) η / (γ^−η − 1), written to stay accurate for small η.
            (1.0 - g) * eta / (-eta * g.ln()).exp_m1()
        }
    }

    /// P[K = k] for k ≥ 1 (0 for k = 0).
    pub fn pmf(&self, k: u64) -> f64 {
        if k == 0 {
            return 0.0;
        }
        let mut p = self.p1();
        for j in 2..=k {
            p *= (1.0 - self.gamma) * (j as f64 - 1.0 + self.shape) / j as f64;
        }
        p
    }

    /// The number of runs for a uniform `u` in [0, 1) (inverse CDF). The mass beyond the point
    /// where the terms underflow is below f64 rounding and is assigned to that point.
    pub fn sample(&self, u: f64) -> u64 {
        let mut p = self.p1();
        let mut cum = p;
        let mut k = 1u64;
        while cum <= u && p > 0.0 {
            k += 1;
            p *= (1.0 - self.gamma) * (k as f64 - 1.0 + self.shape) / k as f64;
            cum += p;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_has_its_closed_forms_and_stated_mean() {
        for (shape, mean) in [(0.0, 3.0), (0.5, 5.0), (1.0, 3.0), (2.0, 10.0), (1.0, 1.5)] {
            let d = TruncatedNegativeBinomial::with_mean(shape, mean).unwrap();
            assert!((d.mean() - mean).abs() < 1e-9 * mean, "η {shape}: mean {}", d.mean());
            let (mut total, mut first_moment) = (0.0, 0.0);
            for k in 1..20_000u64 {
                let p = d.pmf(k);
                total += p;
                first_moment += k as f64 * p;
            }
            assert!((total - 1.0).abs() < 1e-9, "η {shape}: Σ pmf = {total}");
            assert!((first_moment - mean).abs() < 1e-6 * mean, "η {shape}: Σ k pmf = {first_moment}");
            let g = d.gamma;
            for k in 1..8u64 {
                let want = match shape {
                    // Geometric: γ (1 − γ)^(k − 1).
                    1.0 => g * (1.0 - g).powi(k as i32 - 1),
                    // Logarithmic: (1 − γ)^k / (k log(1/γ)).
                    0.0 => (1.0 - g).powi(k as i32) / (k as f64 * (1.0 / g).ln()),
                    _ => continue,
                };
                assert!((d.pmf(k) - want).abs() < 1e-12, "η {shape}, k {k}");
            }
        }
        assert!(tnb_gamma(1.0, 1.0).is_err() && tnb_gamma(-0.5, 3.0).is_err());
    }

    #[test]
    fn sampled_run_counts_follow_the_distribution() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        for (shape, mean) in [(1.0, 3.0), (0.5, 5.0), (0.0, 2.0)] {
            let d = TruncatedNegativeBinomial::with_mean(shape, mean).unwrap();
            let n = 40_000;
            let bins = 12u64;
            let mut counts = vec![0u64; bins as usize + 1];
            let mut sum = 0u64;
            for _ in 0..n {
                let k = d.sample(rng.random::<f64>());
                assert!(k >= 1);
                sum += k;
                counts[(k.min(bins + 1) - 1) as usize] += 1;
            }
            // χ² over k = 1..12 and the tail: 12 degrees of freedom, 0.1% critical value 32.9.
            let mut chi2 = 0.0;
            for (i, &c) in counts.iter().enumerate() {
                let k = i as u64 + 1;
                let p = if k <= bins { d.pmf(k) } else { 1.0 - (1..=bins).map(|j| d.pmf(j)).sum::<f64>() };
                let e = p * n as f64;
                chi2 += (c as f64 - e).powi(2) / e;
            }
            assert!(chi2 < 32.9, "η {shape}, mean {mean}: χ² = {chi2}, counts {counts:?}");
            let m = sum as f64 / n as f64;
            assert!((m - mean).abs() < 0.1 * mean, "η {shape}: sample mean {m}");
        }
    }
}
