//! Optimisers over the flat parameter vector (AdamW; SGD with momentum). They only ever see the
//! privatised gradient, so the update is post-processing and costs no privacy.

use crate::config::LrSchedule;
use crate::kernels::FusedAdamW;
use candle_core::{DType, Result, Tensor};

/// SGD with heavy-ball momentum and decoupled weight decay: v ← μv + g; p ← p − lr·(v + wd·p).
/// Velocity in f64 on the parameters' device; candle ops (a few passes over a small vector).
pub struct SgdMomentum {
    pub momentum: f64,
    pub weight_decay: f64,
    velocity: Option<Tensor>,
}

impl SgdMomentum {
    pub fn new(momentum: f64, weight_decay: f64) -> Self {
        SgdMomentum { momentum, weight_decay, velocity: None }
    }

    /// Returns the updated parameters (a new tensor).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor, lr: f64) -> Result<Tensor> {
        let g = grad.to_dtype(DType::F64)?;
        let v = match &self.velocity {
            Some(v) => ((v * self.momentum)? + g)?,
            None => g,
        };
        let p = params.to_dtype(DType::F64)?;
        let new = (&p - ((&v + (&p * self.weight_decay)?)? * lr)?)?.to_dtype(DType::F32)?;
        self.velocity = Some(v);
        Ok(new)
    }
}

impl SgdMomentum {
    /// The velocity to checkpoint (None before the first step).
    pub fn state(&self) -> Result<Option<Vec<f64>>> {
        self.velocity.as_ref().map(|v| v.to_vec1::<f64>()).transpose()
    }

    /// Continue from a checkpointed velocity on `device`.
    pub fn restore(&mut self, velocity: Option<Vec<f64>>, device: &candle_core::Device) -> Result<()> {
        self.velocity = velocity.map(|v| Tensor::from_vec(v.clone(), v.len(), device)).transpose()?;
        Ok(())
    }
}

/// The configured optimiser, over the flat [P] f32 parameter tensor.
pub enum Optimizer {
    AdamW(FusedAdamW),
    Sgd(SgdMomentum),
}

impl Optimizer {
    /// One update with learning rate `lr` (after any schedule). `params` is updated in place
    /// (it must be contiguous and not shared with the model's tensors).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(params, grad, lr),
            Optimizer::Sgd(o) => {
                let new = o.step(params, grad, lr)?;
                params.slice_set(&new, 0, 0)
            }
        }
    }
}

/// Exponential moving average of the flat parameters over the LoRA-phase steps
/// (`training.ema-decay`). It reads only the iterates, which are functions of the privatised
/// gradients, so releasing it is post-processing. Kept in f64 on the parameters' device.
pub struct ParamEma {
    decay: f64,
    average: Option<Tensor>,
}

impl ParamEma {
    pub fn new(decay: f64) -> Self {
        ParamEma { decay, average: None }
    }

    /// The weight of the old average after 0-based LoRA step `k`: min(decay, (1 + k)/(10 + k)),
    /// so the first steps are not dominated by the starting point.
    pub fn beta(&self, k: u64) -> f64 {
        self.decay.min((1 + k) as f64 / (10 + k) as f64)
    }

    /// Starts the average at the parameters the LoRA phase starts from (before its first step).
    pub fn start(&mut self, params: &Tensor) -> Result<()> {
        self.average = Some(params.to_dtype(DType::F64)?);
        Ok(())
    }

    /// Folds in the parameters after 0-based LoRA step `k`.
    pub fn update(&mut self, params: &Tensor, k: u64) -> Result<()> {
        let Some(avg) = &self.average else {
            candle_core::bail!("the parameter average was not started before LoRA step {k}")
        };
        let b = self.beta(k);
        self.average = Some(((avg * b)? + (params.to_dtype(DType::F64)? * (1.0 - b))?)?);
        Ok(())
    }

    /// The average as f32 parameters (None before the LoRA phase started).
    pub fn average(&self) -> Result<Option<Tensor>> {
        self.average.as_ref().map(|a| a.to_dtype(DType::F32)).transpose()
    }

    /// The average to checkpoint (None before the LoRA phase started).
    pub fn state(&self) -> Result<Option<Vec<f64>>> {
        self.average.as_ref().map(|v| v.to_vec1::<f64>()).transpose()
    }

    /// Continue from a checkpointed average on `device`.
    pub fn restore(&mut self, average: Option<Vec<f64>>, device: &candle_core::Device) -> Result<()> {
        self.average = average.map(|v| Tensor::from_vec(v.clone(), v.len(), device)).transpose()?;
        Ok(())
    }
}

/// Learning rate at 0-based `step` of `total`: linear warm-up over `warmup` steps, then the
/// schedule (constant, or linear decay reaching 0 after the last step).
pub fn learning_rate(base: f64, step: u64, warmup: u64, total: u64, schedule: LrSchedule) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Linear => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            base * (1.0 - (step - warmup) as f64 / span).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn first_adamw_step_moves_each_coordinate_by_lr_against_the_gradient_sign() {
        // With bias correction, the first Adam step is lr · g/|g| (up to eps).
        let mut opt = Optimizer::AdamW(FusedAdamW::new(0.0, 1e-8));
        let p = t(&[1.0, -2.0, 0.5]);
        opt.step(&p, &t(&[0.3, -4.0, 1e-3]), 0.1).unwrap();
        let p = p.to_vec1::<f32>().unwrap();
        let want = [0.9f32, -1.9, 0.4];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn schedules_warm_up_then_hold_or_decay_linearly() {
        assert_eq!(learning_rate(1.0, 0, 4, 10, LrSchedule::Constant), 0.25);
        assert_eq!(learning_rate(1.0, 3, 4, 10, LrSchedule::Linear), 1.0);
        assert_eq!(learning_rate(1.0, 4, 4, 10, LrSchedule::Linear), 1.0);
        assert_eq!(learning_rate(1.0, 7, 4, 10, LrSchedule::Linear), 0.5);
        assert_eq!(learning_rate(1.0, 9, 4, 10, LrSchedule::Constant), 1.0);
        assert!(learning_rate(1.0, 9, 4, 10, LrSchedule::Linear) > 0.0);
    }

    #[test]
    fn parameter_average_is_the_warmed_up_exponential_average_of_the_iterates() {
        // Slow twin: the recurrence written out per coordinate in f64 on random iterates.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let iterates: Vec<Vec<f32>> =
            (0..40).map(|_| (0..7).map(|_| rng.random_range(-2.0f32..2.0)).collect()).collect();
        for decay in [0.5, 0.9, 0.99] {
            let mut ema = ParamEma::new(decay);
            ema.start(&t(&iterates[0])).unwrap();
            let mut want: Vec<f64> = iterates[0].iter().map(|&x| x as f64).collect();
            for (k, it) in iterates[1..].iter().enumerate() {
                ema.update(&t(it), k as u64).unwrap();
                let b = decay.min((1 + k) as f64 / (10 + k) as f64);
                for (w, &x) in want.iter_mut().zip(it) {
                    *w = b * *w + (1.0 - b) * x as f64;
                }
            }
            let got = ema.state().unwrap().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "decay {decay}: {g} vs {w}");
            }
            // And it is not simply the last iterate.
            let last = iterates.last().unwrap();
            assert!(got.iter().zip(last).any(|(g, &x)| (g - x as f64).abs() > 1e-3), "decay {decay}");
        }
        // The warm-up caps early steps: after step 0 the old average keeps weight 0.1.
        assert_eq!(ParamEma::new(0.99).beta(0), 0.1);
        assert_eq!(ParamEma::new(0.9).beta(1000), 0.9);
        assert!(ParamEma::new(0.9).update(&t(&[1.0]), 0).is_err(), "an average that was never started");
    }

    #[test]
    fn sgd_momentum_accumulates_velocity() {
        let mut opt = Optimizer::Sgd(SgdMomentum::new(0.5, 0.0));
        let p = t(&[1.0]);
        opt.step(&p, &t(&[2.0]), 0.1).unwrap(); // v = 2, p = 1 − 0.2
        opt.step(&p, &t(&[2.0]), 0.1).unwrap(); // v = 3, p = 0.8 − 0.3
        assert!((p.to_vec1::<f32>().unwrap()[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = Optimizer::AdamW(FusedAdamW::new(0.5, 1e-8));
        let p = t(&[2.0]);
        opt.step(&p, &t(&[0.0]), 0.1).unwrap();
        // zero gradient: only decay, p − lr·wd·p = 2 − 0.1
        assert!((p.to_vec1::<f32>().unwrap()[0] - 1.9).abs() < 1e-6);
    }
}
