//! glibc malloc settings for training on the CPU.
//!
//! A training step allocates and frees thousands of tensors of a few hundred KiB to tens of MiB.
//! With glibc's defaults the heap top is returned to the kernel whenever 128 KiB are free there
//! (`M_TRIM_THRESHOLD`), so the next step faults the same pages back in and the kernel zeroes
//! them again: on the quickstart that was about 15% of a step (`dptrain bench`, BENCHMARKS.md).
//! Keeping up to 1 GiB of freed memory in the heap, and serving blocks below 32 MiB (glibc's
//! largest allowed threshold) from it rather than from fresh mappings, removes that. The cost is
//! resident memory: freed blocks kept within a step add to the peak RSS (~50 MiB, +10%, on the
//! quickstart). A user who sets any of glibc's `MALLOC_*_` variables keeps their own settings.

/// Apply the settings above (glibc on Linux only; elsewhere nothing happens). Call once, early.
pub fn tune_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("MALLOC_") && k.ends_with('_')
        });
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; called before any other thread
            // exists (first thing in main), with valid parameter numbers. Setting either one
            // turns off glibc's adaptive mmap threshold, so the trim threshold is only raised
            // once the mmap threshold has been accepted (mallopt returns 1 on success).
            unsafe {
                if libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                }
            }
        }
    }
}

/// Hand the heap's free memory back to the kernel (glibc `malloc_trim`), so that the resident
/// set is what is in use. `dptrain bench` calls it before restarting the CPU peak-memory count:
/// with the trim threshold above, memory freed by one variant's step would otherwise stay
/// resident and count towards the next variant's peak.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
