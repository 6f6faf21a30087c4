//! Privacy accounting: DP events as data, and accountants that turn a ledger of events into an
//! (ε, δ) guarantee.
//!
//! Invariant: every function here is pure (no I/O, no global state), so the ε in a certificate
//! can be recomputed from the stored ledger alone.

pub mod calibrate;
pub mod event;
pub mod pld;
pub mod rdp;
pub mod selection;

pub use calibrate::{calibrate_noise_multiplier, calibrate_noise_multiplier_from};
pub use event::DpEvent;
pub use pld::{PldAccountant, PldEpsilon};
pub use rdp::{RdpAccountant, RdpEpsilon};

/// Which accountant certifies a run (the other one is reported beside it as a cross-check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccountantKind {
    /// Privacy-loss distribution: tight upper bound (the default).
    #[default]
    Pld,
    /// Rényi DP: looser, cheap; the cross-check.
    Rdp,
}

impl AccountantKind {
    pub fn name(self) -> &'static str {
        match self {
            AccountantKind::Pld => "pld",
            AccountantKind::Rdp => "rdp",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "pld" => Ok(AccountantKind::Pld),
            "rdp" => Ok(AccountantKind::Rdp),
            other => Err(format!("unknown accountant `{other}` (supported: pld, rdp)")),
        }
    }
}

/// An upper bound on ε at `delta` for `event` from the accountant `kind`.
pub fn epsilon(kind: AccountantKind, event: &DpEvent, delta: f64) -> Result<f64, AccountingError> {
    match kind {
        AccountantKind::Pld => Ok(PldAccountant::default().epsilon(event, delta)?.epsilon),
        AccountantKind::Rdp => Ok(RdpAccountant::default().epsilon(event, delta)?.epsilon),
    }
}

/// The smallest σ (relative precision `rel_tol`, the satisfying end) whose ε by `kind` stays within
/// `target` for `steps` Poisson-sampled Gaussian steps at rate `q`. For PLD the search starts from
/// the RDP answer, an upper bound (RDP's ε is never below PLD's).
pub fn calibrate(
    kind: AccountantKind,
    target: f64,
    delta: f64,
    q: f64,
    steps: u64,
    rel_tol: f64,
) -> Result<(f64, f64), AccountingError> {
    let f = |k: AccountantKind| move |s: f64| epsilon(k, &DpEvent::dp_sgd(q, s, steps), delta);
    match kind {
        AccountantKind::Rdp => calibrate_noise_multiplier(target, rel_tol, f(AccountantKind::Rdp)),
        AccountantKind::Pld => {
            let (start, _) = calibrate_noise_multiplier(target, 1e-3, f(AccountantKind::Rdp))?;
            calibrate_noise_multiplier_from(target, rel_tol, start, f(AccountantKind::Pld))
        }
    }
}

/// Errors of the accountants.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("invalid privacy parameter: {0}")]
    InvalidParameter(String),
    #[error("the accountant does not support this event: {0}")]
    Unsupported(String),
    #[error("no noise multiplier up to {max} reaches ε ≤ {target} for this plan")]
    Unreachable { target: f64, max: f64 },
}
