//! Gradient canaries inside a training run (`dptrain audit --mode white-box`).

/// What a white-box audit asks of a training run (`train::RunOptions::gradient_canaries`):
/// `count` gradient canaries of norm `norm` · C, each inserted with probability ½.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CanarySpec {
    pub count: usize,
    pub norm: f64,
}

/// The gradient canaries of a white-box audit of a training run. Canary k (of m) is inserted
/// with probability ½ (a CSPRNG); the inserted ones join the training set as records
/// N, N + 1, … (so the run's Poisson sampling, its N and q, and its accounting cover them like
/// any record), and a sampled canary contributes a Dirac gradient of `norm` · C on coordinate k
/// of a block appended to the model's coordinates, through the step's own clipping and noise
/// (`train::step::private_gradient_audited`). The auditor sees the privatised block of every
/// step and scores each canary by the log-likelihood ratio of "sampled with probability q each
/// step" against "absent" under the certified mechanism (the most powerful test of one step;
/// without noise, the plain sum).
#[derive(Debug, Clone)]
pub struct GradientCanaries {
    inserted: Vec<bool>,
    /// Canary id of the j-th inserted canary (training record N + j).
    members: Vec<usize>,
    norm: f64,
    clip_norm: f64,
    sample_rate: f64,
    noise_multiplier: f64,
    expected_batch_size: usize,
    sums: Vec<f64>,
    log_ratios: Vec<f64>,
}

impl GradientCanaries {
    pub fn new(spec: &CanarySpec, coins: &mut impl rand::Rng) -> Result<GradientCanaries, String> {
        if spec.count < 2 {
            return Err(format!("--canaries {}: at least 2 are needed", spec.count));
        }
        if !(spec.norm.is_finite() && spec.norm > 0.0) {
            return Err(format!("canary norm {} must be positive", spec.norm));
        }
        let inserted: Vec<bool> = (0..spec.count).map(|_| coins.random_bool(0.5)).collect();
        let members = (0..spec.count).filter(|&k| inserted[k]).collect();
        Ok(GradientCanaries {
            inserted,
            members,
            norm: spec.norm,
            clip_norm: 1.0,
            sample_rate: 0.0,
            noise_multiplier: 0.0,
            expected_batch_size: 1,
            sums: vec![0.0; spec.count],
            log_ratios: vec![0.0; spec.count],
        })
    }

    /// How many canaries joined the training set.
    pub fn inserted_count(&self) -> usize {
        self.members.len()
    }

    pub fn inserted(&self) -> &[bool] {
        &self.inserted
    }

    /// The mechanism the run calibrated (q, σ, C, L): what the scores assume.
    pub fn configure(&mut self, sample_rate: f64, noise_multiplier: f64, clip_norm: f64, expected_batch_size: usize) {
        self.sample_rate = sample_rate;
        self.noise_multiplier = noise_multiplier;
        self.clip_norm = clip_norm;
        self.expected_batch_size = expected_batch_size;
    }

    /// A step's sample over N records + the inserted canaries, split into the records' indices
    /// and the sampled canaries' ids.
    pub fn split(&self, indices: &[usize], records: usize) -> (Vec<usize>, Vec<usize>) {
        let (real, canary): (Vec<usize>, Vec<usize>) = indices.iter().partition(|&&i| i < records);
        (real, canary.iter().map(|&i| self.members[i - records]).collect())
    }

    /// The step's canary block for the sampled canary ids.
    pub fn block<'a>(&self, sampled: &'a [usize]) -> crate::train::step::CanaryBlock<'a> {
        crate::train::step::CanaryBlock {
            sampled,
            count: self.inserted.len(),
            value: (self.norm * self.clip_norm) as f32,
        }
    }

    /// Scores one step's privatised canary block ([count], already ÷ L).
    pub fn observe(&mut self, block: &candle_core::Tensor) -> candle_core::Result<()> {
        let g: Vec<f32> = block.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if g.len() != self.inserted.len() {
            candle_core::bail!("canary block of {} values for {} canaries", g.len(), self.inserted.len());
        }
        let (q, s) = (self.sample_rate, self.noise_multiplier);
        for (k, &v) in g.iter().enumerate() {
            // In units of C: an honest sampled canary adds exactly 1 (its clipped Dirac).
            let x = v as f64 * self.expected_batch_size as f64 / self.clip_norm;
            self.sums[k] += x;
            if s > 0.0 && q > 0.0 && q < 1.0 {
                // ln(1 − q + q·exp((x − ½)/σ²)), as a log-sum-exp.
                let (a, b) = ((1.0 - q).ln(), q.ln() + (x - 0.5) / (s * s));
                let hi = a.max(b);
                self.log_ratios[k] += hi + ((a - hi).exp() + (b - hi).exp()).ln();
            } else if s > 0.0 {
                self.log_ratios[k] += x / (s * s);
            }
        }
        Ok(())
    }

    /// Each canary's score (higher: more likely inserted): the summed log-likelihood ratios,
    /// or without noise the sum of its coordinate.
    pub fn scores(&self) -> Vec<f64> {
        if self.noise_multiplier > 0.0 {
            self.log_ratios.clone()
        } else {
            self.sums.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{best_bound, default_grid, AuditBound};
    use crate::train::step::faults::{self, Fault};
    use crate::train::step::{private_gradient_audited, ClipImpl, Mechanism};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// The white-box audit of DP training steps, as `train::run` takes them (sample over records +
    /// inserted canaries, split, one `private_gradient_audited` call per step, observe the canary
    /// block), on a small real model: the linear probe over 200 records of random features. ε = 2
    /// at δ = 1e-6 over 12 steps with q ≈ ½ (L = 640 of ~1,200), C = 1, 2,000 canaries.
    fn audited_steps(fault: Fault, seed: u64) -> (f64, AuditBound) {
        let dev = candle_core::Device::Cpu;
        let stream = |k: u64| ChaCha20Rng::seed_from_u64(seed * 16 + k);
        let (n, h, classes, steps, delta, clip) = (200usize, 8usize, 2usize, 12u64, 1e-6, 1.0);
        let mut data = stream(0);
        let hidden: Vec<Vec<f32>> = (0..n).map(|_| (0..h).map(|_| data.random_range(-3.0..3.0)).collect()).collect();
        let examples: Vec<crate::data::Example> =
            (0..n).map(|i| crate::data::Example::classification(vec![0], i % classes)).collect();
        let cache = crate::data::FeatureCache { start_layer: 0, hidden_size: h, hidden };
        let w = candle_core::Tensor::zeros((classes, h), candle_core::DType::F32, &dev).unwrap();
        let b = candle_core::Tensor::zeros(classes, candle_core::DType::F32, &dev).unwrap();
        let probe = crate::model::probe::LinearProbe::new(w, b).unwrap();
        let params = classes * h + classes;
        let mut c = GradientCanaries::new(&CanarySpec { count: 2000, norm: 4.0 }, &mut stream(1)).unwrap();
        let total = n + c.inserted_count();
        let l = 640;
        let q = l as f64 / total as f64;
        let (sigma, _) =
            crate::accounting::calibrate(crate::accounting::AccountantKind::Pld, 2.0, delta, q, steps, 1e-4).unwrap();
        c.configure(q, sigma, clip, l);
        let mech = Mechanism {
            clip: Some(clip),
            clip_kind: crate::privacy::ClipKind::Flat,
            noise_multiplier: sigma,
            expected_batch_size: l,
        };
        let mut sampler = crate::data::PoissonSampler::new(q, stream(2));
        let noise = crate::privacy::GaussianNoise::new(stream(3));
        faults::with(fault, || {
            for t in 0..steps {
                let (real, sampled) = c.split(&sampler.sample(total), n);
                let (grad, block, rep) = private_gradient_audited(
                    &probe,
                    &examples,
                    Some(&cache),
                    &real,
                    32,
                    params,
                    &mech,
                    &noise,
                    t,
                    ClipImpl::Fused,
                    Some(c.block(&sampled)),
                )
                .unwrap();
                assert_eq!((grad.elem_count(), rep.batch_size, rep.canaries), (params, real.len(), sampled.len()));
                c.observe(&block.unwrap()).unwrap();
            }
        });
        let event = crate::accounting::DpEvent::SelfComposed {
            event: Box::new(crate::accounting::DpEvent::dp_sgd_step(q, sigma)),
            count: steps,
        };
        let certified = crate::accounting::epsilon(crate::accounting::AccountantKind::Pld, &event, delta).unwrap();
        (certified, best_bound(&c.scores(), c.inserted(), &default_grid(2000), delta, 0.05))
    }

    #[test]
    fn the_white_box_audit_of_honest_dp_steps_stays_below_the_certificate_over_seeds() {
        for seed in 0..3 {
            let (certified, b) = audited_steps(Fault::None, seed);
            assert!((certified - 2.0).abs() < 0.01, "{certified}");
            assert!(b.epsilon <= certified, "seed {seed}: {b:?} above the certified {certified}");
        }
    }

    #[test]
    fn the_white_box_audit_catches_noise_scaled_down_four_times() {
        let (certified, b) = audited_steps(Fault::NoiseQuarter, 11);
        assert!(b.epsilon > certified, "{b:?} not above the certified {certified}");
    }

    #[test]
    fn the_white_box_audit_catches_skipped_clipping() {
        let (certified, b) = audited_steps(Fault::SkipClipping, 12);
        assert!(b.epsilon > certified, "{b:?} not above the certified {certified}");
    }

    #[test]
    fn the_white_box_audit_catches_examples_leaking_into_each_other() {
        let (certified, b) = audited_steps(Fault::MixedExamples, 13);
        assert!(b.epsilon > certified, "{b:?} not above the certified {certified}");
    }

    #[test]
    fn the_split_maps_sampled_canary_records_to_their_canary_ids() {
        let mut c =
            GradientCanaries::new(&CanarySpec { count: 50, norm: 4.0 }, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
        c.configure(0.5, 1.0, 2.0, 10);
        let members: Vec<usize> = (0..50).filter(|&k| c.inserted()[k]).collect();
        let indices = vec![0, 3, 7, 7 + 1, 7 + members.len()];
        let (real, ids) = c.split(&indices, 8);
        assert_eq!(real, vec![0, 3, 7]);
        assert_eq!(ids, vec![members[0], members[members.len() - 1]]);
        assert_eq!(c.block(&ids).value, 8.0);
    }
}
