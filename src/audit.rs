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
/// one-sided k⁺ alone (abstaining on the rest).
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
    ks.iter().flat_map(|&k| [(k, k), (k, 0)]).collect()
}

/// A white-box audit of the DP-SGD mechanism itself, through the engine's own sampler
/// (`PoissonSampler`), clipping (`privacy::clip_and_sum`) and noise (`GaussianNoise`), with no
/// model: the gradient canaries of the white-box mode, on a block of coordinates nobody else
/// uses. Canary i is a Dirac vector of norm `canary_norm` · C on coordinate i; each is inserted
/// with probability ½ (CSPRNG). For each of `steps` steps every inserted canary enters the sample
/// with probability q, the sampled rows are clipped to C and summed, N(0, σ²C²) is added to every
/// coordinate and the sum divided by L. A canary's score is the sum of its coordinate over the
/// privatised gradients (what a white-box auditor sees). The certified ε of (q, σ, steps) bounds
/// what this can show; a canary norm above 1 makes clipping matter.
#[derive(Debug, Clone)]
pub struct MechanismAudit {
    pub canaries: usize,
    pub sample_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
    pub clip_norm: f64,
    pub canary_norm: f64,
    pub expected_batch_size: usize,
}

/// Deliberate defects of the mechanism, to show the audit catches them. Test builds only: the
/// release binary has no way to switch them on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    #[cfg(test)]
    NoiseQuarter,
    #[cfg(test)]
    SkipClipping,
}

impl MechanismAudit {
    /// (scores, inserted) of one audit run; `seed` seeds the insertion, sampling and noise
    /// streams (None: fresh from the operating system).
    pub fn run(&self, seed: Option<u64>) -> candle_core::Result<(Vec<f64>, Vec<bool>)> {
        self.run_with(seed, Fault::None)
    }

    fn run_with(&self, seed: Option<u64>, fault: Fault) -> candle_core::Result<(Vec<f64>, Vec<bool>)> {
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha20Rng;
        let m = self.canaries;
        let stream = |k: u64| match seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(k)),
            None => ChaCha20Rng::from_os_rng(),
        };
        let mut coin = stream(1);
        let inserted: Vec<bool> = (0..m).map(|_| coin.random_bool(0.5)).collect();
        let members: Vec<usize> = (0..m).filter(|&i| inserted[i]).collect();
        let mut sampler = crate::data::PoissonSampler::new(self.sample_rate, stream(2));
        let noise = crate::privacy::GaussianNoise::new(stream(3));
        let c = self.clip_norm;
        let (clip, std) = match fault {
            Fault::None => (Some(c), self.noise_multiplier * c),
            #[cfg(test)]
            Fault::NoiseQuarter => (Some(c), self.noise_multiplier * c / 4.0),
            #[cfg(test)]
            Fault::SkipClipping => (None, self.noise_multiplier * c),
        };
        let mut scores = vec![0f64; m];
        for step in 0..self.steps {
            let sampled = sampler.sample(members.len());
            let mut rows = vec![0f32; sampled.len() * m];
            for (r, &k) in sampled.iter().enumerate() {
                rows[r * m + members[k]] = (self.canary_norm * c) as f32;
            }
            let per_example = candle_core::Tensor::from_vec(rows, (sampled.len(), m), &candle_core::Device::Cpu)?;
            let (sum, _) = crate::privacy::clip_and_sum(&per_example, clip)?;
            let mut g: Vec<f32> = sum.to_vec1()?;
            noise.add_noise(&mut g, step, std);
            for (s, &v) in scores.iter_mut().zip(&g) {
                *s += v as f64 / self.expected_batch_size as f64;
            }
        }
        Ok((scores, inserted))
    }

    /// The certified ε of the audited mechanism (PLD accountant).
    pub fn certified_epsilon(&self, delta: f64) -> Result<f64, crate::accounting::AccountingError> {
        let event = crate::accounting::DpEvent::SelfComposed {
            event: Box::new(crate::accounting::DpEvent::dp_sgd_step(self.sample_rate, self.noise_multiplier)),
            count: self.steps,
        };
        crate::accounting::epsilon(crate::accounting::AccountantKind::Pld, &event, delta)
    }
}

/// The mechanism a run config describes, for `MechanismAudit`: q = L / N (N counted from the
/// training file's lines, not read), every planned step (linear probe and LoRA), σ as the run
/// calibrates it (σ = 0 with `non_private`), clip norm C, `canaries` gradient canaries of norm
/// 4C.
pub fn mechanism_of(plan: &crate::config::Plan, canaries: usize, non_private: bool) -> Result<MechanismAudit, String> {
    let n = crate::recipe::count_records(&plan.train_path)
        .map_err(|e| format!("cannot read {}: {e}", plan.train_path.display()))?;
    let l = plan.expected_batch_size;
    if l > n || n == 0 {
        return Err(format!(
            "training.expected-batch-size {l} exceeds the {n} records of {}",
            plan.train_path.display()
        ));
    }
    if canaries < 2 {
        return Err(format!("--canaries {canaries}: at least 2 are needed"));
    }
    let (q, steps) = (l as f64 / n as f64, plan.planned_steps(n));
    let sigma = match (non_private, &plan.noise) {
        (true, _) => 0.0,
        (false, crate::config::NoiseSpec::NoiseMultiplier(s)) => *s,
        (false, crate::config::NoiseSpec::TargetEpsilon(t)) => {
            crate::accounting::calibrate(plan.accountant, *t, plan.delta, q, steps, 1e-4).map_err(|e| e.to_string())?.0
        }
    };
    Ok(MechanismAudit {
        canaries,
        sample_rate: q,
        noise_multiplier: sigma,
        steps,
        clip_norm: plan.clip_norm,
        canary_norm: 4.0,
        expected_batch_size: l,
    })
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

    /// q = ½, σ = 16, 64 steps: a Gaussian-like separation of about q√T/σ = 0.25 between
    /// inserted and absent canaries, certified ε ≈ 0.9 at δ = 1e-5; canaries of norm 4C.
    fn mechanism() -> MechanismAudit {
        MechanismAudit {
            canaries: 4000,
            sample_rate: 0.5,
            noise_multiplier: 16.0,
            steps: 64,
            clip_norm: 1.0,
            canary_norm: 4.0,
            expected_batch_size: 1000,
        }
    }

    fn audited(fault: Fault, seed: u64) -> (f64, AuditBound) {
        let a = mechanism();
        let (scores, inserted) = a.run_with(Some(seed), fault).unwrap();
        (a.certified_epsilon(1e-5).unwrap(), best_bound(&scores, &inserted, &default_grid(a.canaries), 1e-5, 0.05))
    }

    #[test]
    fn the_mechanism_audit_stays_below_the_certified_epsilon_over_seeds() {
        for seed in 0..3 {
            let (certified, b) = audited(Fault::None, seed);
            assert!(certified > 0.5 && certified < 1.5, "{certified}");
            assert!(b.epsilon <= certified, "seed {seed}: lower bound {b:?} above certified ε {certified}");
        }
    }

    #[test]
    fn the_mechanism_audit_catches_noise_scaled_down_four_times() {
        let (certified, b) = audited(Fault::NoiseQuarter, 7);
        assert!(b.epsilon > certified, "lower bound {b:?} not above certified ε {certified}");
    }

    #[test]
    fn the_mechanism_audit_catches_skipped_clipping() {
        let (certified, b) = audited(Fault::SkipClipping, 8);
        assert!(b.epsilon > certified, "lower bound {b:?} not above certified ε {certified}");
    }
}
