//! A white-box audit of the DP-SGD mechanism alone (`dptrain audit --mode mechanism`).

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
    use crate::audit::{best_bound, default_grid, AuditBound};

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
