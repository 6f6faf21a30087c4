//! Ctrl-C / SIGTERM during training: the first signal asks the run to stop after the current step
//! (it writes a checkpoint and exits non-zero, saying how to resume); the handler resets itself, so
//! a second signal stops the process at once (the last checkpoint is still there).
//!
//! The handler only stores an atomic flag (async-signal-safe); the run loop polls it between steps.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_signal(_signal: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM (the CLI does this before training).
pub fn install() {
    #[cfg(unix)]
    // SAFETY: sigaction with a zeroed struct, an empty mask, SA_RESETHAND (one-shot) and a handler
    // that only stores an atomic; the pointers are to live locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was requested since the handler was installed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
