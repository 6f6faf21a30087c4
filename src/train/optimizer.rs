//! Optimisers over the flat parameter vector (AdamW; SGD with momentum). They only ever see the
//! privatised gradient, so the update is post-processing and costs no privacy.

use crate::config::LrSchedule;

#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: u64,
}

impl AdamW {
    pub fn new(n: usize, lr: f64, weight_decay: f64) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    /// One update with learning rate `lr` (after any schedule).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f64) {
        assert_eq!(params.len(), grad.len());
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for i in 0..params.len() {
            let g = grad[i] as f64;
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * g;
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * g * g;
            let mhat = self.m[i] / bc1;
            let vhat = self.v[i] / bc2;
            let p = params[i] as f64;
            params[i] = (p - lr * (mhat / (vhat.sqrt() + self.eps) + self.weight_decay * p)) as f32;
        }
    }
}

/// SGD with heavy-ball momentum and decoupled weight decay: v ← μv + g; p ← p − lr·(v + wd·p).
#[derive(Debug, Clone)]
pub struct SgdMomentum {
    pub momentum: f64,
    pub weight_decay: f64,
    velocity: Vec<f64>,
}

impl SgdMomentum {
    pub fn new(n: usize, momentum: f64, weight_decay: f64) -> Self {
        SgdMomentum { momentum, weight_decay, velocity: vec![0.0; n] }
    }

    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f64) {
        assert_eq!(params.len(), grad.len());
        for i in 0..params.len() {
            self.velocity[i] = self.momentum * self.velocity[i] + grad[i] as f64;
            let p = params[i] as f64;
            params[i] = (p - lr * (self.velocity[i] + self.weight_decay * p)) as f32;
        }
    }
}

/// The configured optimiser.
#[derive(Debug, Clone)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(SgdMomentum),
}

impl Optimizer {
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.step(params, grad, lr),
            Optimizer::Sgd(o) => o.step(params, grad, lr),
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

    #[test]
    fn first_adamw_step_moves_each_coordinate_by_lr_against_the_gradient_sign() {
        // With bias correction, the first Adam step is lr · g/|g| (up to eps).
        let mut opt = AdamW::new(3, 0.1, 0.0);
        let mut p = vec![1.0f32, -2.0, 0.5];
        opt.step(&mut p, &[0.3, -4.0, 1e-3], 0.1);
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
        let mut opt = SgdMomentum::new(1, 0.5, 0.0);
        let mut p = vec![1.0f32];
        opt.step(&mut p, &[2.0], 0.1); // v = 2, p = 1 − 0.2
        opt.step(&mut p, &[2.0], 0.1); // v = 3, p = 0.8 − 0.3
        assert!((p[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = AdamW::new(1, 0.1, 0.5);
        let mut p = vec![2.0f32];
        opt.step(&mut p, &[0.0], 0.1);
        // zero gradient: only decay, p − lr·wd·p = 2 − 0.1
        assert!((p[0] - 1.9).abs() < 1e-6);
    }
}
