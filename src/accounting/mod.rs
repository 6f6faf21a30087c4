//! Privacy accounting: DP events as data, and accountants that turn a ledger of events into an
//! (ε, δ) guarantee.
//!
//! Invariant: every function here is pure (no I/O, no global state), so the ε in a certificate
//! can be recomputed from the stored ledger alone.

pub mod calibrate;
pub mod event;
pub mod rdp;

pub use calibrate::calibrate_noise_multiplier;
pub use event::DpEvent;
pub use rdp::{RdpAccountant, RdpEpsilon};

/// Errors of the accountants.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("invalid privacy parameter: {0}")]
    InvalidParameter(String),
    #[error("the RDP accountant does not support this event: {0}")]
    Unsupported(String),
    #[error("no noise multiplier up to {max} reaches ε ≤ {target} for this plan")]
    Unreachable { target: f64, max: f64 },
}
