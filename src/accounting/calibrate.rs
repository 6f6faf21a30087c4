//! Calibration: the smallest noise multiplier whose ε stays within a target.
//!
//! Invariant: the returned σ always satisfies ε(σ) ≤ target — bisection returns the safe (upper)
//! end of its final bracket, never the midpoint.

use super::AccountingError;

/// Find the smallest σ (to relative precision `rel_tol`) with `epsilon_of(σ) ≤ target`, where
/// `epsilon_of` must be non-increasing in σ. Returns (σ, ε(σ)).
pub fn calibrate_noise_multiplier<F>(target: f64, rel_tol: f64, epsilon_of: F) -> Result<(f64, f64), AccountingError>
where
    F: FnMut(f64) -> Result<f64, AccountingError>,
{
    calibrate_noise_multiplier_from(target, rel_tol, 1.0, epsilon_of)
}

/// The same, starting the search at `start` (e.g. the σ a looser accountant needs, which is an
/// upper bound for a tighter one: the bracket then starts just below it and no evaluation is spent
/// at the small σ where the PLD is most expensive).
pub fn calibrate_noise_multiplier_from<F>(
    target: f64,
    rel_tol: f64,
    start: f64,
    mut epsilon_of: F,
) -> Result<(f64, f64), AccountingError>
where
    F: FnMut(f64) -> Result<f64, AccountingError>,
{
    if !(target > 0.0 && target.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!("target ε must be a positive number, got {target}")));
    }
    if !(start > 0.0 && start.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!("calibration start must be positive, got {start}")));
    }
    const MAX_SIGMA: f64 = 1e4;
    let mut hi = start;
    let mut eps_hi = epsilon_of(hi)?;
    while eps_hi > target {
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(AccountingError::Unreachable { target, max: MAX_SIGMA });
        }
        eps_hi = epsilon_of(hi)?;
    }
    let mut lo = hi * 0.6;
    // Shrink lo until it fails the target (or is tiny), so [lo, hi] brackets the answer.
    let mut eps_lo = epsilon_of(lo)?;
    while lo > 1e-6 && eps_lo <= target {
        hi = lo;
        eps_hi = eps_lo;
        lo /= 2.0;
        eps_lo = epsilon_of(lo)?;
    }
    while (hi - lo) > rel_tol * hi {
        let mid = 0.5 * (lo + hi);
        let eps_mid = epsilon_of(mid)?;
        if eps_mid <= target {
            hi = mid;
            eps_hi = eps_mid;
        } else {
            lo = mid;
        }
    }
    debug_assert!(eps_hi <= target);
    Ok((hi, eps_hi))
}
