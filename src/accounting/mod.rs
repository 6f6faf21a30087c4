//! Privacy accounting: DP events as data, and accountants that turn a ledger of events into an
//! (ε, δ) guarantee.
//!
//! Invariant: every function here is pure (no I/O, no global state), so the ε in a certificate
//! can be recomputed from the stored ledger alone.

pub mod calibrate;
pub mod event;
pub mod pld;
pub mod rdp;

pub use calibrate::calibrate_noise_multiplier;
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
