//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! RDP of one step at order α (Mironov, Talwar, Zhang 2019): exact binomial sum for integer α,
//! the convergent signed series for fractional α (the TF-Privacy/Opacus formulation). Conversion
//! to (ε, δ) uses the tight bound of Balle et al. (2020):
//! ε = RDP(α) − (ln δ + ln α)/(α − 1) + ln((α − 1)/α), minimised over the order grid.
//! All sums are in log space, so huge step counts and tiny δ stay finite.

use super::{AccountingError, DpEvent};
use serde::Serialize;

/// The default order grid: 1.1, 1.2, …, 10.9, then 12, 13, …, 63 (as Opacus).
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((12..64).map(|x| x as f64));
    orders
}

/// An RDP accountant over a fixed grid of orders.
#[derive(Debug, Clone)]
pub struct RdpAccountant {
    pub orders: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        RdpAccountant { orders: default_orders() }
    }
}

/// ε from the RDP accountant, with the order that achieved it.
#[derive(Debug, Clone, Serialize)]
pub struct RdpEpsilon {
    pub epsilon: f64,
    pub optimal_order: f64,
    /// True when the optimal order is the smallest or largest of the grid: the grid may be too
    /// narrow and ε looser than it could be.
    pub order_at_grid_edge: bool,
}

impl RdpAccountant {
    /// RDP of `event` at every order of the grid. Private selection needs the whole grid (its
    /// bound minimises over a second order), so events are accounted vector by vector.
    pub fn rdp(&self, event: &DpEvent) -> Result<Vec<f64>, AccountingError> {
        match event {
            DpEvent::RepeatAndSelect { event, mean, shape } => {
                let inner = self.rdp(event)?;
                super::selection::repeat_and_select_rdp(&self.orders, &inner, *mean, *shape)
            }
            DpEvent::SelfComposed { event, count } => {
                if *count == 0 {
                    return Ok(vec![0.0; self.orders.len()]);
                }
                Ok(self.rdp(event)?.into_iter().map(|r| r * *count as f64).collect())
            }
            DpEvent::Composed { events } => {
                let mut total = vec![0.0; self.orders.len()];
                for e in events {
                    for (t, r) in total.iter_mut().zip(self.rdp(e)?) {
                        *t += r;
                    }
                }
                Ok(total)
            }
            DpEvent::Mixture { events } => {
                if events.is_empty() {
                    return Err(AccountingError::InvalidParameter("a mixture of no events".into()));
                }
                let mut most = vec![0.0f64; self.orders.len()];
                for e in events {
                    for (m, r) in most.iter_mut().zip(self.rdp(e)?) {
                        *m = m.max(r);
                    }
                }
                Ok(most)
            }
            _ => self.orders.iter().map(|&a| rdp_at_order(event, a)).collect(),
        }
    }

    /// ε at `delta` for `event`.
    pub fn epsilon(&self, event: &DpEvent, delta: f64) -> Result<RdpEpsilon, AccountingError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountingError::InvalidParameter(format!("delta must be in (0, 1), got {delta}")));
        }
        let rdp = self.rdp(event)?;
        if rdp.iter().all(|&r| r == 0.0) {
            // Nothing data-dependent was released (q = 0 or no steps): ε = 0 exactly. The
            // conversion formula alone would report a small positive ε.
            return Ok(RdpEpsilon { epsilon: 0.0, optimal_order: self.orders[0], order_at_grid_edge: false });
        }
        let mut best = (f64::INFINITY, self.orders[0], 0usize);
        for (i, (&a, &r)) in self.orders.iter().zip(&rdp).enumerate() {
            let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
            if eps < best.0 {
                best = (eps, a, i);
            }
        }
        let at_edge = best.0.is_finite() && (best.2 == 0 || best.2 == self.orders.len() - 1);
        Ok(RdpEpsilon { epsilon: best.0.max(0.0), optimal_order: best.1, order_at_grid_edge: at_edge })
    }
}

/// RDP of an event at one order α > 1.
pub fn rdp_at_order(event: &DpEvent, alpha: f64) -> Result<f64, AccountingError> {
    match event {
        DpEvent::Gaussian { sigma } => {
            check_sigma(*sigma)?;
            Ok(if *sigma == 0.0 { f64::INFINITY } else { alpha / (2.0 * sigma * sigma) })
        }
        DpEvent::PoissonSampled { q, event } => match event.as_ref() {
            DpEvent::Gaussian { sigma } => sampled_gaussian_rdp(*q, *sigma, alpha),
            other => Err(AccountingError::Unsupported(format!(
                "Poisson sampling of {other:?} (only the Gaussian mechanism is supported)"
            ))),
        },
        DpEvent::SelfComposed { event, count } => {
            if *count == 0 {
                return Ok(0.0);
            }
            Ok(rdp_at_order(event, alpha)? * *count as f64)
        }
        DpEvent::Composed { events } => events.iter().map(|e| rdp_at_order(e, alpha)).sum::<Result<f64, _>>(),
        DpEvent::RepeatAndSelect { .. } => Err(AccountingError::Unsupported(
            "private selection is accounted over a whole order grid (RdpAccountant::rdp), not at one order".into(),
        )),
        DpEvent::Mixture { events } if events.is_empty() => {
            Err(AccountingError::InvalidParameter("a mixture of no events".into()))
        }
        DpEvent::Mixture { events } => {
            events.iter().map(|e| rdp_at_order(e, alpha)).try_fold(0.0f64, |m, r| Ok(m.max(r?)))
        }
    }
}

fn check_sigma(sigma: f64) -> Result<(), AccountingError> {
    if sigma.is_nan() || sigma < 0.0 {
        return Err(AccountingError::InvalidParameter(format!("noise multiplier must be ≥ 0, got {sigma}")));
    }
    Ok(())
}

/// RDP at order α of one step of the Gaussian mechanism (noise multiplier σ) on a Poisson sample
/// with rate q.
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> Result<f64, AccountingError> {
    check_sigma(sigma)?;
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountingError::InvalidParameter(format!("sampling rate must be in [0, 1], got {q}")));
    }
    if alpha <= 1.0 {
        return Err(AccountingError::InvalidParameter(format!("RDP order must be > 1, got {alpha}")));
    }
    if q == 0.0 {
        return Ok(0.0);
    }
    if sigma == 0.0 {
        return Ok(f64::INFINITY);
    }
    if q == 1.0 {
        return Ok(alpha / (2.0 * sigma * sigma));
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 1e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    Ok(log_a / (alpha - 1.0))
}

/// ln(e^a + e^b), stable.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln(e^a − e^b) for a ≥ b.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        // The series can cancel to (numerically) zero: ln 0.
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// ln Γ-free binomial coefficient ln C(n, k) for integers.
fn log_binom(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// ln A_α for integer α: ln Σ_i C(α,i) q^i (1−q)^(α−i) exp((i² − i)/(2σ²)).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    for i in 0..=alpha {
        let fi = i as f64;
        let term = log_binom(alpha, i) + fi * lq + (alpha - i) as f64 * l1q + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// ln A_α for fractional α: the two convergent series with signed binomial coefficients.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut coef = 1.0f64; // C(alpha, i), built by recurrence
    let mut i = 0u64;
    loop {
        let fi = i as f64;
        if i > 0 {
            coef *= (alpha - fi + 1.0) / fi;
        }
        if coef == 0.0 {
            break;
        }
        let log_coef = coef.abs().ln();
        let j = alpha - fi;
        let log_t0 = log_coef + fi * lq + j * l1q;
        let log_t1 = log_coef + j * lq + fi * l1q;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        i += 1;
        if log_s0.max(log_s1) < -30.0 || i > 100_000 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// ln erfc(x), accurate also where erfc(x) underflows.
pub fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        // Asymptotic expansion: erfc(x) = e^{−x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) …)
        let r = 1.0 / (x * x);
        -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + (-0.5 * r + 0.75 * r * r - 1.875 * r * r * r).ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_rdp_is_alpha_over_two_sigma_squared() {
        let e = DpEvent::Gaussian { sigma: 2.0 };
        assert_eq!(rdp_at_order(&e, 3.0).unwrap(), 3.0 / 8.0);
        // q = 1 sampling is the plain Gaussian.
        assert!((sampled_gaussian_rdp(1.0, 2.0, 3.5).unwrap() - 3.5 / 8.0).abs() < 1e-15);
    }

    #[test]
    fn integer_and_fractional_series_agree_near_integer_orders() {
        for &(q, s) in &[(0.01, 1.0), (0.1, 0.8), (0.003, 2.0)] {
            for a in [2u64, 3, 5, 8] {
                let int = log_a_int(q, s, a);
                let frac = log_a_frac(q, s, a as f64 + 1e-9);
                assert!((int - frac).abs() < 1e-6 * int.abs().max(1e-9), "q={q} s={s} a={a}: {int} vs {frac}");
            }
        }
    }

    #[test]
    fn opacus_golden_value_reproduced() {
        // Opacus's own test golden: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5 → ε = 7.32911117143.
        let eps = RdpAccountant::default().epsilon(&DpEvent::dp_sgd(0.04, 1.5, 2250), 1e-5).unwrap();
        assert!((eps.epsilon - 7.32911117143).abs() < 1e-8, "{}", eps.epsilon);
    }

    #[test]
    fn log_erfc_is_continuous_at_the_asymptotic_switch() {
        let below = libm::erfc(24.999_999).ln();
        let above = log_erfc(25.000_001);
        assert!((below - above).abs() < 1e-4 * below.abs());
    }

    #[test]
    fn a_mixture_is_accounted_by_its_largest_component_which_bounds_its_true_divergence() {
        let acc = RdpAccountant::default();
        let (a, b) = (DpEvent::Gaussian { sigma: 3.0 }, DpEvent::dp_sgd(0.01, 0.6, 10));
        let m = acc.rdp(&DpEvent::Mixture { events: vec![a.clone(), b.clone()] }).unwrap();
        let (ra, rb) = (acc.rdp(&a).unwrap(), acc.rdp(&b).unwrap());
        assert!(ra.iter().zip(&rb).any(|(x, y)| x > y) && ra.iter().zip(&rb).any(|(x, y)| x < y));
        for i in 0..m.len() {
            assert_eq!(m[i], ra[i].max(rb[i]));
            assert_eq!(
                rdp_at_order(&DpEvent::Mixture { events: vec![a.clone(), b.clone()] }, acc.orders[i]).unwrap(),
                m[i]
            );
        }
        // The claim behind it (joint quasi-convexity): a data-independent coin choosing between two
        // Gaussian mechanisms (σ 0.8 and 2.5, sensitivity 1) has Rényi divergence, computed by
        // quadrature, at most the larger of the two α/(2σ²) (at high orders even below the smaller:
        // the observer does not know which one ran).
        let (s1, s2) = (0.8f64, 2.5f64);
        let phi = |x: f64, s: f64| (-(x * x) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt());
        for alpha in [1.5f64, 2.0, 4.0, 8.0, 16.0] {
            let (mut integral, h) = (0.0f64, 1e-3);
            let mut x = -60.0;
            while x < 60.0 {
                let p = 0.5 * phi(x - 1.0, s1) + 0.5 * phi(x - 1.0, s2);
                let q = 0.5 * phi(x, s1) + 0.5 * phi(x, s2);
                if p > 0.0 && q > 0.0 {
                    integral += (alpha * p.ln() + (1.0 - alpha) * q.ln()).exp() * h;
                }
                x += h;
            }
            let d = integral.ln() / (alpha - 1.0);
            let (hi, lo) = (alpha / (2.0 * s1 * s1), alpha / (2.0 * s2 * s2));
            assert!(d <= hi * (1.0 + 1e-9) && d > 0.0, "α {alpha}: D {d}, components {lo} and {hi}");
        }
        assert!(crate::accounting::PldAccountant::default()
            .epsilon(&DpEvent::Mixture { events: vec![a] }, 1e-5)
            .is_err());
        assert!(acc.rdp(&DpEvent::Mixture { events: vec![] }).is_err());
    }
}
