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

/// A global allocator that counts the bytes in use and their high-water mark, on top of the
/// system allocator. The `dptrain` binary installs it, so `dptrain bench` can report the peak of
/// live heap bytes on the CPU: what the tensors of a step really held, independent of how much
/// freed memory glibc keeps resident (the CPU analogue of the CUDA pool's used-memory mark).
/// The cost is two relaxed atomic operations per allocation (tensors are few and large).
pub struct CountingAlloc;

static IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CountingAlloc {
    fn added(size: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = IN_USE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(now, Relaxed);
    }
    fn removed(size: usize) {
        IN_USE.fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are only
// bookkeeping and never affect what is returned.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(layout);
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc_zeroed(layout);
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout);
        Self::removed(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = std::alloc::System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Count the new block before dropping the old one: a moving realloc holds both.
            Self::added(new_size);
            Self::removed(layout.size());
        }
        p
    }
}

/// Whether `CountingAlloc` is the global allocator: it has then counted the allocations made
/// before any caller can get here (a Rust program allocates before `main` returns control).
fn counting() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    IN_USE.load(Relaxed) > 0 || PEAK.load(Relaxed) > 0
}

/// Restart the high-water mark of live heap bytes at the bytes in use now.
pub fn reset_heap_peak() {
    use std::sync::atomic::Ordering::Relaxed;
    PEAK.store(IN_USE.load(Relaxed), Relaxed);
}

/// The most heap bytes in use at once since `reset_heap_peak` (None unless the counting
/// allocator is installed).
pub fn heap_peak() -> Option<u64> {
    counting().then(|| PEAK.load(std::sync::atomic::Ordering::Relaxed) as u64)
}

/// Heap bytes in use now (None unless the counting allocator is installed).
pub fn heap_in_use() -> Option<u64> {
    counting().then(|| IN_USE.load(std::sync::atomic::Ordering::Relaxed) as u64)
}
