//! Privacy-loss-distribution (PLD) accountant for Poisson-subsampled Gaussian steps.
//!
//! Add/remove-one neighbours give two dominating pairs (Zhu, Dong & Wang 2022):
//! - remove: P = (1−q)·N(0, σ²) + q·N(1, σ²) against Q = N(0, σ²);
//! - add:    P = N(0, σ²) against Q = (1−q)·N(0, σ²) + q·N(1, σ²).
//!
//! For each, the privacy profile δ(ε) = sup_A P(A) − e^ε Q(A) of one step is exact in closed form
//! (`step_delta`). It is discretised on the grid ε_i = i·Δ by "connect the dots" (Doroshenko et
//! al. 2022): the PLD whose profile, as a function of e^ε, is the piecewise-linear interpolation of
//! the true (convex) profile through the grid points and (e^ε = 0, δ = 1). A chord of a convex
//! function lies above it, so this PLD dominates the mechanism: every ε it gives is an upper bound
//! (up to floating-point rounding), with no bias that grows with the number of steps.
//!
//! Compositions multiply PLDs: their loss distributions are convolved by FFT (realfft), with
//! repeated squaring for k identical steps. After each product the negligible tails are cut
//! pessimistically: lower-tail mass (≤ `tail_mass`) moves *up* to the first kept loss, upper-tail
//! mass moves to +∞ (it then counts fully in δ). ε for a δ is solved exactly on the final discrete
//! PLD; the reported ε is the larger of the two directions, never negative.

use super::{AccountingError, DpEvent};
use realfft::RealFftPlanner;
use serde::Serialize;
use std::f64::consts::SQRT_2;

/// Standard normal survival function 1 − Φ(z), accurate in the far tail.
fn phi_bar(z: f64) -> f64 {
    0.5 * libm::erfc(z / SQRT_2)
}

/// Standard normal CDF Φ(z), accurate in the far lower tail.
fn phi(z: f64) -> f64 {
    0.5 * libm::erfc(-z / SQRT_2)
}

/// One of the two dominating pairs of add/remove-one neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Remove,
    Add,
}

/// δ(ε) of one Poisson-subsampled Gaussian step (sampling rate q, noise multiplier σ, sensitivity
/// 1) in direction `dir`: the hockey-stick divergence, exact. q = 1 is the Gaussian mechanism.
pub fn step_delta(q: f64, sigma: f64, eps: f64, dir: Direction) -> f64 {
    let t = eps.exp();
    if q == 0.0 {
        return (1.0 - t).max(0.0);
    }
    let s2 = sigma * sigma;
    let d = match dir {
        Direction::Remove => {
            // A = {x : P/Q > e^ε} = {x > x*}, P/Q = 1 − q + q·exp((2x − 1)/(2σ²)).
            if t <= 1.0 - q {
                return 1.0 - t;
            }
            let x = s2 * ((t - (1.0 - q)) / q).ln() + 0.5;
            let (a, b) = (x / sigma, (x - 1.0) / sigma);
            q * phi_bar(b) - (t - (1.0 - q)) * phi_bar(a)
        }
        Direction::Add => {
            // A = {x : P/Q > e^ε} = {x < x**}; empty once e^−ε ≤ 1 − q.
            let s = (-eps).exp();
            if s <= 1.0 - q {
                return 0.0;
            }
            let x = s2 * ((s - (1.0 - q)) / q).ln() + 0.5;
            let (a, b) = (x / sigma, (x - 1.0) / sigma);
            phi(a) * (1.0 - t * (1.0 - q)) - t * q * phi(b)
        }
    };
    d.clamp(0.0, 1.0)
}

/// A discrete privacy-loss distribution: mass `pmf[j]` at loss (lo + j)·Δ, plus mass `inf` at +∞.
#[derive(Debug, Clone)]
pub struct Pld {
    pub lo: i64,
    pub pmf: Vec<f64>,
    pub inf: f64,
}

impl Pld {
    /// No privacy loss at all (q = 0, or nothing composed).
    pub fn identity() -> Pld {
        Pld { lo: 0, pmf: vec![1.0], inf: 0.0 }
    }

    /// No privacy at all (σ = 0): all mass at +∞.
    pub fn blatant() -> Pld {
        Pld { lo: 0, pmf: vec![0.0], inf: 1.0 }
    }

    /// δ(ε) = inf + Σ_{l > ε} p(l)·(1 − e^{ε − l}).
    pub fn delta_for_epsilon(&self, eps: f64, grid: f64) -> f64 {
        let mut d = self.inf;
        for (j, &p) in self.pmf.iter().enumerate() {
            let l = (self.lo + j as i64) as f64 * grid;
            if l > eps {
                d += p * (1.0 - (eps - l).exp());
            }
        }
        d.min(1.0)
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (∞ if the mass at +∞ alone exceeds δ). Exact on the
    /// discrete PLD: between consecutive losses δ(ε) = inf + S0 − e^ε·S1 with suffix sums.
    pub fn epsilon_for_delta(&self, delta: f64, grid: f64) -> f64 {
        if self.inf > delta {
            return f64::INFINITY;
        }
        // Walk down from the largest loss: S0 = Σ p and ln S1 = ln Σ p e^{−l} over the losses
        // above ε (log-sum-exp: e^{−l} underflows for losses in the hundreds).
        let (mut s0, mut ln_s1) = (0.0f64, f64::NEG_INFINITY);
        for j in (0..self.pmf.len()).rev() {
            let l = (self.lo + j as i64) as f64 * grid;
            let p = self.pmf[j];
            if p > 0.0 {
                s0 += p;
                let t = p.ln() - l;
                ln_s1 = if ln_s1 == f64::NEG_INFINITY { t } else { ln_s1.max(t) + (-(ln_s1 - t).abs()).exp().ln_1p() };
            }
            // For ε in [l_prev, l): δ(ε) = inf + S0 − e^ε·S1.
            let l_prev = if j == 0 { f64::NEG_INFINITY } else { (self.lo + j as i64 - 1) as f64 * grid };
            let need = self.inf + s0 - delta;
            if ln_s1 > f64::NEG_INFINITY && need > 0.0 {
                let eps = need.ln() - ln_s1;
                if eps >= l_prev {
                    return eps.min(l).max(0.0);
                }
            }
        }
        0.0
    }

    /// Moves lower-tail mass up onto the first kept loss and upper-tail mass to +∞, each at most
    /// `tail` (pessimistic: losses only grow).
    fn truncate(&mut self, tail: f64) {
        for p in self.pmf.iter_mut() {
            if *p < 0.0 || !p.is_finite() {
                *p = 0.0; // FFT round-off below zero
            }
        }
        let mut acc = 0.0;
        let mut start = 0;
        while start + 1 < self.pmf.len() && acc + self.pmf[start] <= tail {
            acc += self.pmf[start];
            start += 1;
        }
        let mut up = 0.0;
        let mut end = self.pmf.len();
        while end > start + 1 && up + self.pmf[end - 1] <= tail {
            up += self.pmf[end - 1];
            end -= 1;
        }
        self.inf += up;
        let mut kept = self.pmf[start..end].to_vec();
        kept[0] += acc;
        self.lo += start as i64;
        self.pmf = kept;
    }
}

/// Most grid points of one step's PLD and of an FFT window (memory: 8 bytes each, a few copies).
pub const MAX_GRID_POINTS: usize = 1 << 26;

fn too_large(what: &str, points: f64) -> AccountingError {
    AccountingError::Unsupported(format!(
        "the PLD {what} would need {points:.3e} grid points (more than {MAX_GRID_POINTS}): σ is too small or the \
         steps too many for discretisation interval 1e-4; use the rdp accountant for this case"
    ))
}

/// Connect-the-dots PLD of one Poisson-subsampled Gaussian step on the grid ε_i = i·Δ.
pub fn step_pld(q: f64, sigma: f64, grid: f64, dir: Direction, tail: f64) -> Result<Pld, AccountingError> {
    if q == 0.0 {
        return Ok(Pld::identity());
    }
    if sigma == 0.0 {
        return Ok(Pld::blatant());
    }
    // Range of the loss that carries all but ~1e-17 of the mass: the loss is monotone in x, so take
    // it at x = −zσ and x = 1 + zσ (z = 8.3: Φ(−z) ≈ 5e-17).
    let z = 8.3;
    let s2 = sigma * sigma;
    let loss_remove = |x: f64| (1.0 - q + q * ((2.0 * x - 1.0) / (2.0 * s2)).exp()).ln();
    let (lo, hi) = match dir {
        Direction::Remove => (loss_remove(-z * sigma), loss_remove(1.0 + z * sigma)),
        Direction::Add => (-loss_remove(1.0 + z * sigma), -loss_remove(-z * sigma)),
    };
    let points = (hi - lo) / grid + 2.0;
    if points.is_nan() || points > MAX_GRID_POINTS as f64 {
        return Err(too_large("of one step", points));
    }
    let (i_lo, i_hi) = ((lo / grid).floor() as i64, ((hi / grid).ceil() as i64).max((lo / grid).floor() as i64 + 1));
    let n = (i_hi - i_lo + 1) as usize;
    let eps: Vec<f64> = (0..n).map(|j| (i_lo + j as i64) as f64 * grid).collect();
    let delta: Vec<f64> = eps.iter().map(|&e| step_delta(q, sigma, e, dir)).collect();
    let t: Vec<f64> = eps.iter().map(|e| e.exp()).collect();
    // Slopes of the interpolant in t = e^ε, starting from (t = 0, δ = 1).
    let mut slope = Vec::with_capacity(n + 1);
    slope.push((delta[0] - 1.0) / t[0]);
    for j in 1..n {
        slope.push((delta[j] - delta[j - 1]) / (t[j] - t[j - 1]));
    }
    slope.push(0.0);
    let pmf: Vec<f64> = (0..n).map(|j| (t[j] * (slope[j + 1] - slope[j])).max(0.0)).collect();
    let mut pld = Pld { lo: i_lo, pmf, inf: delta[n - 1] };
    pld.truncate(tail);
    Ok(pld)
}

/// FFT convolution of two non-negative sequences.
fn convolve(a: &[f64], b: &[f64], planner: &mut RealFftPlanner<f64>) -> Vec<f64> {
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, &x) in a.iter().enumerate() {
            if x != 0.0 {
                for (j, &y) in b.iter().enumerate() {
                    out[i + j] += x * y;
                }
            }
        }
        return out;
    }
    let n = out_len.next_power_of_two();
    let fwd = planner.plan_fft_forward(n);
    let inv = planner.plan_fft_inverse(n);
    let spectrum = |x: &[f64]| {
        let mut buf = vec![0.0; n];
        buf[..x.len()].copy_from_slice(x);
        let mut spec = fwd.make_output_vec();
        fwd.process(&mut buf, &mut spec).expect("sizes match the plan");
        spec
    };
    let fa = spectrum(a);
    let same = std::ptr::eq(a, b);
    let fb = if same { fa.clone() } else { spectrum(b) };
    let mut prod: Vec<_> = fa.iter().zip(&fb).map(|(x, y)| x * y).collect();
    let mut out = inv.make_output_vec();
    inv.process(&mut prod, &mut out).expect("sizes match the plan");
    out.truncate(out_len);
    let scale = 1.0 / n as f64;
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

fn compose(a: &Pld, b: &Pld, tail: f64, planner: &mut RealFftPlanner<f64>) -> Pld {
    let mut c = Pld { lo: a.lo + b.lo, pmf: convolve(&a.pmf, &b.pmf, planner), inf: a.inf + b.inf - a.inf * b.inf };
    c.truncate(tail);
    c
}

/// ln E[e^{μ·L}] over the finite part of a PLD given as (ln p_j, l_j) pairs (log-sum-exp).
fn log_mgf(terms: &[(f64, f64)], mu: f64) -> f64 {
    let max = terms.iter().map(|&(lp, l)| lp + mu * l).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + terms.iter().map(|&(lp, l)| (lp + mu * l - max).exp()).sum::<f64>().ln()
}

/// The k-fold composition of `p` with itself: one FFT of the single PLD over a window that holds
/// all but `tail` of the composed mass on each side (Chernoff bounds from the moment-generating
/// function), raised to the k-th power pointwise, one inverse FFT. Mass outside the window wraps
/// around into it (it can only add to δ) and the upper-tail bound is added to the mass at +∞, so
/// the result still dominates.
fn self_compose(
    p: &Pld,
    k: u64,
    tail: f64,
    grid: f64,
    planner: &mut RealFftPlanner<f64>,
) -> Result<Pld, AccountingError> {
    if k == 0 {
        return Ok(Pld::identity());
    }
    if k == 1 {
        return Ok(p.clone());
    }
    let kf = k as f64;
    let inf = 1.0 - (1.0 - p.inf).powf(kf);
    let hi_trivial = (p.lo + p.pmf.len() as i64 - 1).saturating_mul(k as i64);
    let lo_trivial = p.lo.saturating_mul(k as i64);
    // Chernoff: P(S ≥ u) ≤ exp(−μu + k ln M(μ)) for μ > 0; P(S ≤ l) likewise for μ < 0.
    let (mut upper, mut lower) = (f64::INFINITY, f64::NEG_INFINITY);
    let ln_tail = tail.ln();
    let terms: Vec<(f64, f64)> = p
        .pmf
        .iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .map(|(j, &m)| (m.ln(), (p.lo + j as i64) as f64 * grid))
        .collect();
    for i in 0..26 {
        // μ from 1e-2 to ~250 in steps of 1.5×: every μ gives a valid bound, the best one only
        // makes the window (and the FFT) smaller.
        let mu = 1e-2 * 1.5f64.powi(i);
        upper = upper.min((kf * log_mgf(&terms, mu) - ln_tail) / mu);
        lower = lower.max((kf * log_mgf(&terms, -mu) - ln_tail) / -mu);
    }
    let hi = ((upper / grid).ceil() as i64).min(hi_trivial);
    let lo = ((lower / grid).floor() as i64).max(lo_trivial);
    let width = (hi - lo + 1).max(p.pmf.len() as i64);
    if width as f64 > MAX_GRID_POINTS as f64 {
        return Err(too_large(&format!("composition of {k} steps"), width as f64));
    }
    let width = width as usize;
    let n = width.next_power_of_two();
    let fwd = planner.plan_fft_forward(n);
    let inv = planner.plan_fft_inverse(n);
    let mut buf = vec![0.0; n];
    // Position of the single PLD in the window: index j of `pmf` at j (mod n); the k-fold sum then
    // sits at (index − k·p.lo) mod n.
    for (j, &m) in p.pmf.iter().enumerate() {
        buf[j % n] += m;
    }
    let mut spec = fwd.make_output_vec();
    fwd.process(&mut buf, &mut spec).expect("sizes match the plan");
    for z in spec.iter_mut() {
        *z = if k <= u32::MAX as u64 { z.powu(k as u32) } else { z.powf(kf) };
    }
    let mut out = inv.make_output_vec();
    inv.process(&mut spec, &mut out).expect("sizes match the plan");
    let scale = 1.0 / n as f64;
    let base = lo - lo_trivial; // offset of the window start from k·p.lo
    let pmf: Vec<f64> = (0..width)
        .map(|i| {
            let m = (base + i as i64).rem_euclid(n as i64) as usize;
            (out[m] * scale).max(0.0)
        })
        .collect();
    let mut c = Pld { lo, pmf, inf: (inf + tail).min(1.0) };
    c.truncate(tail);
    Ok(c)
}

/// ε from the PLD accountant.
#[derive(Debug, Clone, Serialize)]
pub struct PldEpsilon {
    /// Upper bound on ε (the larger of the add and remove directions).
    pub epsilon: f64,
    pub epsilon_remove: f64,
    pub epsilon_add: f64,
    /// The value discretisation interval Δ used.
    pub discretization: f64,
}

/// The PLD accountant (connect-the-dots discretisation with interval Δ, FFT composition).
#[derive(Debug, Clone)]
pub struct PldAccountant {
    /// Value discretisation interval Δ of the privacy loss (default 1e-4, as dp_accounting).
    pub discretization: f64,
    /// Mass cut from each tail after each composition (moved pessimistically), as a fraction of
    /// the δ asked for: the cut can add at most a few times this to δ.
    pub tail_fraction_of_delta: f64,
}

impl Default for PldAccountant {
    fn default() -> Self {
        PldAccountant { discretization: 1e-4, tail_fraction_of_delta: 1e-7 }
    }
}

impl PldAccountant {
    fn pld(
        &self,
        event: &DpEvent,
        dir: Direction,
        tail: f64,
        planner: &mut RealFftPlanner<f64>,
    ) -> Result<Pld, AccountingError> {
        let g = self.discretization;
        match event {
            DpEvent::Gaussian { sigma } => {
                check_sigma(*sigma)?;
                step_pld(1.0, *sigma, g, dir, tail)
            }
            DpEvent::PoissonSampled { q, event } => {
                if !(0.0..=1.0).contains(q) {
                    return Err(AccountingError::InvalidParameter(format!("sampling rate must be in [0, 1], got {q}")));
                }
                match &**event {
                    DpEvent::Gaussian { sigma } => {
                        check_sigma(*sigma)?;
                        step_pld(*q, *sigma, g, dir, tail)
                    }
                    other => Err(AccountingError::Unsupported(format!(
                        "the PLD accountant supports Poisson sampling of a Gaussian only, not of {other:?}"
                    ))),
                }
            }
            DpEvent::SelfComposed { event, count } => {
                let p = self.pld(event, dir, tail, planner)?;
                self_compose(&p, *count, tail, g, planner)
            }
            DpEvent::RepeatAndSelect { .. } => Err(AccountingError::Unsupported(
                "private selection (repeat and select) has an RDP bound only: use the rdp accountant".into(),
            )),
            DpEvent::Mixture { .. } => Err(AccountingError::Unsupported(
                "a data-independent mixture of mechanisms is accounted by its largest RDP only: use the rdp accountant"
                    .into(),
            )),
            DpEvent::Composed { events } => {
                let mut acc = Pld::identity();
                for e in events {
                    let p = self.pld(e, dir, tail, planner)?;
                    acc = compose(&acc, &p, tail, planner);
                }
                Ok(acc)
            }
        }
    }

    /// An upper bound on ε at `delta` for `event`.
    pub fn epsilon(&self, event: &DpEvent, delta: f64) -> Result<PldEpsilon, AccountingError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountingError::InvalidParameter(format!("delta must be in (0, 1), got {delta}")));
        }
        if !(self.discretization > 0.0 && self.discretization.is_finite()) {
            return Err(AccountingError::InvalidParameter("PLD discretisation must be positive".into()));
        }
        let mut planner = RealFftPlanner::new();
        let mut eps = [0.0; 2];
        let tail = (delta * self.tail_fraction_of_delta).max(1e-300);
        for (k, dir) in [Direction::Remove, Direction::Add].into_iter().enumerate() {
            let pld = self.pld(event, dir, tail, &mut planner)?;
            eps[k] = pld.epsilon_for_delta(delta, self.discretization);
        }
        Ok(PldEpsilon {
            epsilon: eps[0].max(eps[1]),
            epsilon_remove: eps[0],
            epsilon_add: eps[1],
            discretization: self.discretization,
        })
    }
}

fn check_sigma(sigma: f64) -> Result<(), AccountingError> {
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!("noise multiplier must be ≥ 0 and finite, got {sigma}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Gaussian mechanism's exact profile (Balle & Wang 2018), for q = 1.
    fn gaussian_delta(sigma: f64, eps: f64) -> f64 {
        phi(0.5 / sigma - eps * sigma) - eps.exp() * phi(-0.5 / sigma - eps * sigma)
    }

    #[test]
    fn step_profile_at_q_one_is_the_gaussian_mechanism_in_both_directions() {
        for sigma in [0.5, 1.0, 3.0] {
            for eps in [0.0, 0.3, 1.0, 4.0] {
                let want = gaussian_delta(sigma, eps);
                for dir in [Direction::Remove, Direction::Add] {
                    let got = step_delta(1.0, sigma, eps, dir);
                    assert!((got - want).abs() <= 1e-12 + 1e-9 * want, "σ={sigma} ε={eps} {dir:?}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn step_profile_decreases_in_epsilon_and_is_one_minus_e_eps_below_zero_loss() {
        for dir in [Direction::Remove, Direction::Add] {
            let mut prev = 1.0;
            for i in -20..60 {
                let d = step_delta(0.05, 0.9, i as f64 * 0.1, dir);
                assert!(d <= prev + 1e-15 && d >= 0.0);
                prev = d;
            }
        }
        assert_eq!(step_delta(0.0, 1.0, 0.5, Direction::Remove), 0.0);
    }

    #[test]
    fn discrete_pld_profile_dominates_the_exact_profile() {
        let (q, sigma, g) = (0.02, 0.8, 1e-3);
        for dir in [Direction::Remove, Direction::Add] {
            let p = step_pld(q, sigma, g, dir, 1e-18).unwrap();
            let total: f64 = p.pmf.iter().sum::<f64>() + p.inf;
            assert!((total - 1.0).abs() < 1e-9, "mass {total}");
            for i in 0..40 {
                // Between grid points the chord lies above the exact profile …
                let eps = i as f64 * 0.0137;
                let exact = step_delta(q, sigma, eps, dir);
                let disc = p.delta_for_epsilon(eps, g);
                assert!(disc >= exact - 1e-12, "{dir:?} ε={eps}: discrete {disc} < exact {exact}");
                // … and on them it is the exact profile.
                let eps = i as f64 * 5.0 * g;
                let (exact, disc) = (step_delta(q, sigma, eps, dir), p.delta_for_epsilon(eps, g));
                assert!((disc - exact).abs() <= 1e-9 * exact + 1e-13, "{dir:?} ε={eps}: {disc} vs exact {exact}");
            }
        }
    }

    #[test]
    fn epsilon_for_delta_inverts_delta_for_epsilon() {
        let p = step_pld(0.1, 1.0, 1e-3, Direction::Remove, 1e-18).unwrap();
        for delta in [1e-2, 1e-4, 1e-6] {
            let eps = p.epsilon_for_delta(delta, 1e-3);
            let back = p.delta_for_epsilon(eps, 1e-3);
            assert!((back - delta).abs() <= 1e-9 * delta.max(1e-12) + 1e-15, "δ={delta}: ε={eps} gives {back}");
        }
    }

    #[test]
    fn fft_convolution_equals_direct_convolution() {
        let a: Vec<f64> = (0..300).map(|i| ((i * 37 % 101) as f64) / 101.0).collect();
        let b: Vec<f64> = (0..170).map(|i| ((i * 53 % 89) as f64) / 89.0).collect();
        let mut planner = RealFftPlanner::new();
        let fast = convolve(&a, &b, &mut planner);
        for (k, &f) in fast.iter().enumerate() {
            let slow: f64 = (0..a.len()).filter(|&i| k >= i && k - i < b.len()).map(|i| a[i] * b[k - i]).sum();
            assert!((f - slow).abs() < 1e-10 * (1.0 + slow), "k={k}: {f} vs {slow}");
        }
    }
}
