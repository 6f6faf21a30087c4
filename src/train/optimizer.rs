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
