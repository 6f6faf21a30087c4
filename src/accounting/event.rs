//! DP events as data (the shape of Google's dp_accounting): what a run did, in a form that can be
//! stored in checkpoints and reports and re-accounted later.

use serde::{Deserialize, Serialize};

/// One privacy-relevant event. Sensitivity is normalised to 1: a Gaussian event with noise
/// multiplier σ adds N(0, σ²C²) to a sum whose add/remove-one sensitivity is C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DpEvent {
    /// The Gaussian mechanism with noise multiplier `sigma` (σ ≥ 0; σ = 0 is no privacy).
    Gaussian { sigma: f64 },
    /// `event` applied to a Poisson sample of the data, each record included with probability `q`.
    PoissonSampled { q: f64, event: Box<DpEvent> },
    /// `event` composed with itself `count` times.
    SelfComposed { event: Box<DpEvent>, count: u64 },
    /// Sequential composition of several events.
    Composed { events: Vec<DpEvent> },
    /// Private selection (Papernot & Steinke, ICLR 2022): `event` run K times, K drawn from a
    /// truncated negative binomial distribution with this `mean` and `shape` η (0: logarithmic,
    /// 1: geometric), and only the best run's output released. Accounted by RDP only
    /// (`accounting::selection`).
    RepeatAndSelect { event: Box<DpEvent>, mean: f64, shape: f64 },
    /// One of `events`, picked at random independently of the data (a search drawing one
    /// candidate configuration per trial). Rényi divergence is jointly quasi-convex (van Erven &
    /// Harremoës 2014, Theorem 13), so at every order the mixture's RDP is at most the largest of
    /// its components'. Accounted by RDP only.
    Mixture { events: Vec<DpEvent> },
}

impl DpEvent {
    /// One DP-SGD step: the Gaussian mechanism on a Poisson sample.
    pub fn dp_sgd_step(q: f64, sigma: f64) -> Self {
        DpEvent::PoissonSampled { q, event: Box::new(DpEvent::Gaussian { sigma }) }
    }

    /// `steps` DP-SGD steps.
    pub fn dp_sgd(q: f64, sigma: f64, steps: u64) -> Self {
        DpEvent::SelfComposed { event: Box::new(Self::dp_sgd_step(q, sigma)), count: steps }
    }

    /// Total number of sampled-Gaussian steps in this event.
    pub fn step_count(&self) -> u64 {
        match self {
            DpEvent::Gaussian { .. } | DpEvent::PoissonSampled { .. } => 1,
            DpEvent::SelfComposed { event, count } => event.step_count() * count,
            DpEvent::Composed { events } => events.iter().map(|e| e.step_count()).sum(),
            // The steps of one run (the number of runs is random and not released).
            DpEvent::RepeatAndSelect { event, .. } => event.step_count(),
            // The most any one of the components takes.
            DpEvent::Mixture { events } => events.iter().map(|e| e.step_count()).max().unwrap_or(0),
        }
    }
}

/// The ordered record of everything a run spent. Consecutive identical steps are merged into one
/// `SelfComposed` entry, so a run of 10,000 identical steps stores one line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub entries: Vec<DpEvent>,
}

impl Ledger {
    /// Record one DP-SGD step with sampling rate `q` and noise multiplier `sigma`.
    pub fn record_step(&mut self, q: f64, sigma: f64) {
        let step = DpEvent::dp_sgd_step(q, sigma);
        if let Some(DpEvent::SelfComposed { event, count }) = self.entries.last_mut() {
            if **event == step {
                *count += 1;
                return;
            }
        }
        self.entries.push(DpEvent::SelfComposed { event: Box::new(step), count: 1 });
    }

    /// The whole ledger as one event. A ledger of one kind of step (every run with a fixed q and
    /// σ) is exactly `DpEvent::dp_sgd(q, σ, k)`, the event calibration and the stop rule evaluate,
    /// so the certificate is computed from the same event as the plan (no extra composition).
    pub fn as_event(&self) -> DpEvent {
        match self.entries.as_slice() {
            [one] => one.clone(),
            _ => DpEvent::Composed { events: self.entries.clone() },
        }
    }

    /// `steps` identical DP-SGD steps.
    pub fn uniform(q: f64, sigma: f64, steps: u64) -> Ledger {
        if steps == 0 {
            return Ledger::default();
        }
        Ledger { entries: vec![DpEvent::dp_sgd(q, sigma, steps)] }
    }

    /// Every step of the ledger has sampling rate `q` and noise multiplier `sigma`.
    pub fn all_steps_are(&self, q: f64, sigma: f64) -> bool {
        fn check(e: &DpEvent, q: f64, sigma: f64) -> bool {
            match e {
                DpEvent::PoissonSampled { q: eq, event } => {
                    *eq == q && matches!(**event, DpEvent::Gaussian { sigma: s } if s == sigma)
                }
                DpEvent::SelfComposed { event, .. } => check(event, q, sigma),
                DpEvent::Composed { events } => events.iter().all(|e| check(e, q, sigma)),
                DpEvent::Gaussian { .. } | DpEvent::RepeatAndSelect { .. } | DpEvent::Mixture { .. } => false,
            }
        }
        self.entries.iter().all(|e| check(e, q, sigma))
    }

    pub fn steps(&self) -> u64 {
        self.entries.iter().map(|e| e.step_count()).sum()
    }

    /// The ledger of the first `k` steps (all of it when `k` ≥ its steps).
    pub fn prefix(&self, k: u64) -> Ledger {
        let mut out = Ledger::default();
        let mut left = k;
        for e in &self.entries {
            if left == 0 {
                break;
            }
            let n = e.step_count();
            if n <= left {
                out.entries.push(e.clone());
                left -= n;
            } else {
                match e {
                    DpEvent::SelfComposed { event, .. } if event.step_count() == 1 => {
                        out.entries.push(DpEvent::SelfComposed { event: event.clone(), count: left })
                    }
                    // Not a run of single steps: it cannot be split, so the prefix keeps it whole
                    // (an over-count, never an under-count).
                    _ => out.entries.push(e.clone()),
                }
                left = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{PldAccountant, RdpAccountant};

    #[test]
    fn a_uniform_ledger_is_the_planned_event_and_certifies_the_planned_epsilon() {
        let (q, sigma, k) = (0.02, 1.1, 300);
        let mut l = Ledger::default();
        for _ in 0..k {
            l.record_step(q, sigma);
        }
        assert_eq!(l, Ledger::uniform(q, sigma, k));
        assert_eq!(l.as_event(), DpEvent::dp_sgd(q, sigma, k));
        let pld = PldAccountant::default();
        let planned = pld.epsilon(&DpEvent::dp_sgd(q, sigma, k), 1e-5).unwrap().epsilon;
        assert_eq!(pld.epsilon(&l.as_event(), 1e-5).unwrap().epsilon.to_bits(), planned.to_bits());
        let rdp = RdpAccountant::default();
        let planned = rdp.epsilon(&DpEvent::dp_sgd(q, sigma, k), 1e-5).unwrap().epsilon;
        assert_eq!(rdp.epsilon(&l.as_event(), 1e-5).unwrap().epsilon.to_bits(), planned.to_bits());
        assert!(l.all_steps_are(q, sigma));
        assert!(!l.all_steps_are(q, 1.0) && !l.all_steps_are(0.03, sigma));
        l.record_step(q, 2.0);
        assert!(!l.all_steps_are(q, sigma));
        assert!(matches!(l.as_event(), DpEvent::Composed { .. }));
        assert_eq!(Ledger::uniform(q, sigma, 0), Ledger::default());
    }
}
