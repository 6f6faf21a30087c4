//! Calibration: the smallest noise multiplier whose ε stays within a target.
//!
//! Invariant: the returned σ always satisfies ε(σ) ≤ target — bisection returns the safe (upper)
//! end of its final bracket, never the midpoint.

use super::AccountingError;

/// Find the smallest σ (to relative precision `rel_tol`) with `epsilon_of(σ) ≤ target`, where
/// `epsilon_of` must be non-increasing in σ. Returns (σ, ε(σ)).
pub fn calibrate_noise_multiplier<F>(
    target: f64,
    rel_tol: f64,
    mut epsilon_of: F,
) -> Result<(f64, f64), AccountingError>
where
    F: FnMut(f64) -> Result<f64, AccountingError>,
{
    if !(target > 0.0 && target.is_finite()) {
        return Err(AccountingError::InvalidParameter(format!("target ε must be a positive number, got {target}")));
    }
    const MAX_SIGMA: f64 = 1e4;
    let mut hi = 1.0;
    let mut eps_hi = epsilon_of(hi)?;
    while eps_hi > target {
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(AccountingError::Unreachable { target, max: MAX_SIGMA });
        }
        eps_hi = epsilon_of(hi)?;
    }
    let mut lo = hi / 2.0;
    // Shrink lo until it fails the target (or is tiny), so [lo, hi] brackets the answer.
    while lo > 1e-6 && epsilon_of(lo)? <= target {
        hi = lo;
        eps_hi = epsilon_of(hi)?;
        lo /= 2.0;
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
