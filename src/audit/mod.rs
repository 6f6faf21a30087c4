//! Empirical privacy auditing (issue 20): the one-run lower bound of Steinke, Nasr and Jagielski
//! ("Privacy Auditing with One (1) Training Run", NeurIPS 2023).
//!
//! m canaries are each inserted with probability ½; after one training run an auditor scores
//! them, guesses "in" for the k⁺ highest scores and "out" for the k⁻ lowest (abstaining on the
//! rest), and counts v correct of r = k⁺ + k⁻ guesses. For an (ε, δ)-DP mechanism the paper's
//! Theorem 5.2 bounds the chance of v or more correct guesses:
//!
//!   P[W ≥ v] ≤ β + 2 m δ α,  q = e^ε / (1 + e^ε),  β = P[Binomial(r, q) ≥ v],
//!   α = max_{i = 1..v} P[v − i ≤ Binomial(r, q) < v] / i,
//!
//! so observing v correct guesses refutes (ε, δ)-DP at confidence 1 − p whenever that bound is
//! below p. `epsilon_lower_bound` is the largest such ε: evidence that the mechanism is *not*
//! better than ε-DP, never a proof that it is as private as certified. Searching several guess
//! counts (`best_bound`) spends the confidence across them (Bonferroni), so the reported bound
//! holds at the stated confidence for the whole search.
//!
//! What is audited: `mechanism` (the DP-SGD mechanism alone, no model), `canaries` (gradient
//! canaries inside a training run's own steps: the white-box mode), `command` (`dptrain audit`).

mod canaries;
pub mod command;
mod input;
mod mechanism;

pub use canaries::{CanarySpec, GradientCanaries};
pub use mechanism::{mechanism_of, MechanismAudit};

/// ln k! for k = 0..=n.
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n + 1];
    for k in 1..=n {
        t[k] = t[k - 1] + (k as f64).ln();
    }
    t
}

/// P[Binomial(r, q) = k] for k = 0..=r, from logarithms (no overflow for any r).
fn binomial_pmf(r: usize, q: f64) -> Vec<f64> {
    let lf = ln_factorials(r);
    let (lq, lp) = (q.ln(), (1.0 - q).ln());
    (0..=r)
        .map(|k| {
            let ln_c = lf[r] - lf[k] - lf[r - k];
            // 0 · ln 0 = 0 at q ∈ {0, 1}.
            let a = if k == 0 { 0.0 } else { k as f64 * lq };
            let b = if k == r { 0.0 } else { (r - k) as f64 * lp };
            (ln_c + a + b).exp()
        })
        .collect()
}

/// The p-value of v or more correct guesses out of r (m canaries) under the hypothesis that the
/// mechanism is (ε, δ)-DP (the bound above, capped at 1).
pub fn p_value(m: usize, r: usize, v: usize, eps: f64, delta: f64) -> f64 {
    assert!(v <= r && r <= m, "audit: {v} correct of {r} guesses of {m} canaries");
    assert!(eps >= 0.0 && (0.0..=1.0).contains(&delta));
    let q = 1.0 / (1.0 + (-eps).exp());
    let pmf = binomial_pmf(r, q);
    let beta: f64 = pmf[v..].iter().sum();
    let (mut alpha, mut acc) = (0.0f64, 0.0f64);
    for i in 1..=v {
        acc += pmf[v - i];
        alpha = alpha.max(acc / i as f64);
    }
    (beta + 2.0 * m as f64 * delta * alpha).min(1.0)
}

/// The largest ε (to 1e-9, at most 100) such that v correct guesses out of r refute
/// (ε, δ)-DP at confidence 1 − p: 0 when they do not refute even ε = 0.
pub fn epsilon_lower_bound(m: usize, r: usize, v: usize, delta: f64, p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "audit: confidence level p = {p}");
    if r == 0 || p_value(m, r, v, 0.0, delta) >= p {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 100.0f64);
    if p_value(m, r, v, hi, delta) < p {
        return hi;
    }
    while hi - lo > 1e-9 {
        let mid = 0.5 * (lo + hi);
        if p_value(m, r, v, mid, delta) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The audit's outcome for one choice of guess counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditBound {
    /// ε lower bound at the stated confidence (for the whole search).
    pub epsilon: f64,
    pub k_plus: usize,
    pub k_minus: usize,
    /// Guesses made (k⁺ + k⁻) and how many were correct.
    pub guesses: usize,
    pub correct: usize,
    /// How many (k⁺, k⁻) pairs were searched (the confidence is split across them).
    pub searched: usize,
}

/// The best one-run bound over the guess counts `grid` (pairs k⁺, k⁻ with k⁺ + k⁻ ≤ m), at
/// confidence 1 − p overall (each pair is tested at p / |grid|). `scores[i]` is the auditor's
/// score of canary i (higher: more likely inserted), `inserted[i]` whether it was. Ties in the
/// scores are broken by canary index (a fixed, score-independent order).
pub fn best_bound(scores: &[f64], inserted: &[bool], grid: &[(usize, usize)], delta: f64, p: f64) -> AuditBound {
    let m = scores.len();
    assert_eq!(m, inserted.len(), "audit: one membership bit per score");
    let mut order: Vec<usize> = (0..m).collect();
    // Descending score; NaN scores last (never a confident guess).
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan())).then(a.cmp(&b))
    });
    let per = p / grid.len().max(1) as f64;
    let mut best = AuditBound { epsilon: 0.0, k_plus: 0, k_minus: 0, guesses: 0, correct: 0, searched: grid.len() };
    for &(kp, km) in grid {
        if kp + km > m || kp + km == 0 {
            continue;
        }
        let correct = order[..kp].iter().filter(|&&i| inserted[i]).count()
            + order[m - km..].iter().filter(|&&i| !inserted[i]).count();
        let eps = epsilon_lower_bound(m, kp + km, correct, delta, per);
        if eps > best.epsilon || best.guesses == 0 {
            best =
                AuditBound { epsilon: eps, k_plus: kp, k_minus: km, guesses: kp + km, correct, searched: grid.len() };
        }
    }
    best
}

/// The paper's style of search: k⁺ = k⁻ = k for k in a doubling sequence from 1 to m / 2, and
/// one-sided guesses, k⁺ alone and k⁻ alone (abstaining on the rest: a black-box score with
/// random labels is reliable at the bottom, where a canary's label is one the model rejects).
pub fn default_grid(m: usize) -> Vec<(usize, usize)> {
    let mut ks = Vec::new();
    let mut k = 1;
    while k <= m / 2 {
        ks.push(k);
        k *= 2;
    }
    if m / 2 > 0 && ks.last() != Some(&(m / 2)) {
        ks.push(m / 2);
    }
    ks.iter().flat_map(|&k| [(k, k), (k, 0), (0, k)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binomial_pmf_sums_to_one_and_has_the_binomial_mean() {
        for (r, q) in [(1usize, 0.3), (10, 0.5), (1000, 0.73), (5000, 0.999)] {
            let p = binomial_pmf(r, q);
            let total: f64 = p.iter().sum();
            let mean: f64 = p.iter().enumerate().map(|(k, x)| k as f64 * x).sum();
            assert!((total - 1.0).abs() < 1e-9, "{r} {q}: {total}");
            assert!((mean - r as f64 * q).abs() < 1e-6 * r as f64, "{r} {q}: {mean}");
        }
    }

    #[test]
    fn perfect_guesses_give_a_bound_that_grows_with_their_number() {
        let e = |r: usize| epsilon_lower_bound(1000, r, r, 0.0, 0.05);
        // With δ = 0, r correct of r refutes ε when q^r < p: ε < logit(p^(1/r)).
        for r in [10usize, 100, 1000] {
            let q: f64 = 0.05f64.powf(1.0 / r as f64);
            assert!((e(r) - (q / (1.0 - q)).ln()).abs() < 1e-6, "{r}: {} vs {}", e(r), (q / (1.0 - q)).ln());
        }
        assert!(e(10) < e(100) && e(100) < e(1000));
        // Chance-level guessing refutes nothing.
        assert_eq!(epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.05), 0.0);
    }

    #[test]
    fn well_separated_scores_give_a_positive_bound_and_independent_ones_none() {
        use rand::{Rng, SeedableRng};
        let m = 1000;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(20);
        // Fair coins, as the audit inserts canaries.
        let inserted: Vec<bool> = (0..m).map(|_| rng.random_bool(0.5)).collect();
        let separated: Vec<f64> =
            inserted.iter().map(|&b| if b { 10.0 } else { 0.0 } + rng.random_range(0.0..1.0)).collect();
        let b = best_bound(&separated, &inserted, &default_grid(m), 1e-5, 0.05);
        assert!(b.epsilon > 3.0 && b.correct == b.guesses, "{b:?}");
        // Scores independent of membership refute nothing, over many draws.
        for _ in 0..20 {
            let blind: Vec<f64> = (0..m).map(|_| rng.random_range(0.0..1.0)).collect();
            let b = best_bound(&blind, &inserted, &default_grid(m), 1e-5, 0.05);
            assert!(b.epsilon < 0.5, "{b:?}");
        }
    }
}
