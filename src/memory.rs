//! Device memory: what is available, the high-water mark of what a computation used, and the
//! memory plan a run prints before training (with the micro-batch size it implies).
//!
//! CPU: bytes in use and their peak are the live heap bytes counted by
//! `allocator::CountingAlloc` (installed by the `dptrain` binary; elsewhere the peak resident set
//! where it can be reset, else nothing); available memory is the kernel's `MemAvailable`. GPU:
//! the device's default stream-ordered memory pool, which candle's CUDA allocations come from
//! (cuBLAS workspaces are outside it), and the driver's free memory.

use crate::data::{Batch, Example};
use crate::model::{DpModel, Task};
use crate::train::step::{clipped_sum_micro_batch_kind, ClipImpl};
use candle_core::{Device, Result};

#[cfg(feature = "cuda")]
fn pool(device: &Device) -> Result<Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return Ok(None) };
    device.synchronize()?;
    let ordinal = d.cuda_stream().context().ordinal() as i32;
    let mut dev = 0;
    let mut pool = std::ptr::null_mut();
    // SAFETY: plain driver queries with out-pointers to live locals.
    unsafe {
        check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
        check(sys::cuDeviceGetDefaultMemPool(&mut pool, dev), "cuDeviceGetDefaultMemPool")?;
    }
    Ok(Some(pool))
}

#[cfg(feature = "cuda")]
fn check(r: candle_core::cuda_backend::cudarc::driver::sys::CUresult, what: &str) -> Result<()> {
    if r == candle_core::cuda_backend::cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("{what} failed: {r:?}")
    }
}

/// Whether the last CPU `reset_peak` worked.
static RSS_RESET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Restart the high-water mark of `device`'s memory: the live heap bytes, and with `rss` also
/// the CPU process's resident set (after returning free heap memory to the kernel).
pub fn reset_peak(device: &Device, rss: bool) -> Result<()> {
    match device {
        Device::Cpu => {
            if rss {
                // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0). Where
                // that fails, `peak_rss` reports nothing rather than the process's lifetime
                // peak. Free heap memory kept by the allocator settings is returned first, so
                // that it does not count towards this step's peak.
                crate::allocator::release_free_memory();
                let ok = std::fs::write("/proc/self/clear_refs", "5").is_ok();
                RSS_RESET.store(ok, std::sync::atomic::Ordering::Relaxed);
            }
            crate::allocator::reset_heap_peak();
            Ok(())
        }
        _ => gpu_pool_attribute(device, Some(0), true).map(|_| ()),
    }
}

/// The high-water mark since `reset_peak`, in bytes (None where it cannot be read): CPU live
/// heap bytes where counted, else the peak resident set; the CUDA pool's mark on a GPU.
pub fn peak(device: &Device) -> Result<Option<u64>> {
    match device {
        Device::Cpu => Ok(crate::allocator::heap_peak().or_else(|| peak_rss(device))),
        _ => gpu_pool_attribute(device, None, true),
    }
}

/// Bytes in use now, on the same scale as `peak` (None where they cannot be read, or where
/// `peak` would be the resident set, whose scale differs).
pub fn in_use(device: &Device) -> Result<Option<u64>> {
    match device {
        Device::Cpu => Ok(crate::allocator::heap_in_use()),
        _ => gpu_pool_attribute(device, None, false),
    }
}

/// The CPU process's peak resident set since `reset_peak` (None on a GPU, off Linux, or where
/// it could not be reset).
pub fn peak_rss(device: &Device) -> Option<u64> {
    if !matches!(device, Device::Cpu) || !RSS_RESET.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn kind(device: &Device) -> &'static str {
    match device {
        Device::Cpu if crate::allocator::heap_peak().is_some() => {
            "most live heap bytes (counting allocator); RSS = process peak resident set (VmHWM)"
        }
        Device::Cpu => "process peak resident set (VmHWM)",
        _ => "CUDA default memory pool high-water mark",
    }
}

/// Memory a run may still take on `device`: the kernel's `MemAvailable` on the CPU (Linux), the
/// driver's free memory on a GPU; None where it cannot be read.
pub fn available(device: &Device) -> Result<Option<u64>> {
    match device {
        Device::Cpu => {
            let Ok(s) = std::fs::read_to_string("/proc/meminfo") else { return Ok(None) };
            Ok(s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|kb| kb * 1024))
        }
        _ => gpu_free(device),
    }
}

/// The pool's used-memory high-water mark (`high`) or current use; with `set`, sets that
/// attribute instead (the high-water mark can only be reset to 0, which restarts it).
#[cfg(feature = "cuda")]
fn gpu_pool_attribute(device: &Device, set: Option<u64>, high: bool) -> Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = pool(device)? else { return Ok(None) };
    let attr = if high {
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH
    } else {
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT
    };
    let mut v: u64 = set.unwrap_or(0);
    // SAFETY: both attributes are u64s; setting USED_MEM_HIGH to 0 restarts the mark.
    unsafe {
        match set {
            Some(_) => check(
                sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void),
                "cuMemPoolSetAttribute",
            )?,
            None => check(
                sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void),
                "cuMemPoolGetAttribute",
            )?,
        }
    }
    Ok(Some(v))
}

#[cfg(feature = "cuda")]
fn gpu_free(device: &Device) -> Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if !matches!(device, Device::Cuda(_)) {
        return Ok(None);
    }
    device.synchronize()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: out-pointers to live locals; the device's context is current on this thread
    // (candle made it so when it created the device).
    unsafe { check(sys::cuMemGetInfo_v2(&mut free, &mut total), "cuMemGetInfo")? };
    Ok(Some(free as u64))
}

#[cfg(not(feature = "cuda"))]
fn gpu_pool_attribute(_device: &Device, _set: Option<u64>, _high: bool) -> Result<Option<u64>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn gpu_free(_device: &Device) -> Result<Option<u64>> {
    Ok(None)
}

/// The share of the available memory a run plans to fill (the rest is headroom for the
/// allocator's fragmentation, the feature cache's own growth and other processes).
pub const HEADROOM: f64 = 0.8;

/// The micro-batch size when the config fixes none and memory allows it (the size runs used
/// before the plan existed, so nothing changes where memory is plentiful).
pub const DEFAULT_MICRO_BATCH: usize = 32;

/// How the run's micro-batch size was chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum MicroBatchChoice {
    /// `training.max-physical-batch` in the config.
    Configured,
    /// The largest size up to `DEFAULT_MICRO_BATCH` whose planned peak fits in `HEADROOM` of the
    /// available memory.
    Automatic,
    /// The size a resumed run's checkpoint recorded (a resumed run keeps its micro-batches, so
    /// that it sums per-example gradients in the same groups as the uninterrupted run would).
    Resumed,
}

/// What a run will hold in memory, printed before training.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub device: String,
    /// Available when the plan was made (after the model was loaded).
    pub available: Option<u64>,
    /// Taken by loading the base model (None where bytes in use cannot be read).
    pub weights: Option<u64>,
    pub trainable_params: usize,
    /// Trainable parameters, their privatised gradient and AdamW's two f64 moments.
    pub optimizer: u64,
    /// Upper bound of the frozen-prefix feature cache: N records × T tokens × H f32.
    pub cache: u64,
    /// A DP micro-batch's measured peak above what was in use before it: `step_fixed` +
    /// `step_per_example` × examples, each of `tokens` tokens (None where unmeasurable).
    pub step: Option<StepFit>,
    /// The step measured at the chosen micro-batch size itself (automatic choice above 4).
    pub at_choice: Option<u64>,
    pub tokens: usize,
    pub micro_batch: usize,
    pub choice: MicroBatchChoice,
}

/// Human-readable bytes.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

impl MemoryPlan {
    /// Planned memory beyond what was in use when the plan was made, for micro-batches of `b`.
    pub fn planned(&self, b: usize) -> Option<u64> {
        let step = match self.at_choice {
            Some(m) if b == self.micro_batch => Some(m),
            _ => self.step.map(|s| s.fixed + s.per_example * b as u64),
        };
        step.map(|m| self.optimizer + self.cache + m)
    }

    /// The plan as the run's private record keeps it, with the steps' measured peak beyond the
    /// model and the feature cache (`steps_peak`).
    pub fn to_json(&self, steps_peak: Option<u64>) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "available_bytes": self.available,
            "base_model_bytes": self.weights,
            "trainable_parameters": self.trainable_params,
            "optimizer_bytes": self.optimizer,
            "feature_cache_bytes_bound": self.cache,
            "step_fixed_bytes": self.step.map(|s| s.fixed),
            "step_per_example_bytes": self.step.map(|s| s.per_example),
            "step_measured_at_one_example_only": self.step.map(|s| s.one_example_only),
            "step_bytes_at_micro_batch": self.at_choice,
            "tokens": self.tokens,
            "micro_batch": self.micro_batch,
            "micro_batch_choice": match self.choice {
                MicroBatchChoice::Configured => "configured",
                MicroBatchChoice::Automatic => "automatic",
                MicroBatchChoice::Resumed => "resumed",
            },
            "headroom": HEADROOM,
            "planned_steps_bytes": self.planned(self.micro_batch).map(|p| p - self.cache),
            "steps_peak_bytes": steps_peak,
        })
    }

    pub fn render(&self) -> String {
        let mut s = format!("memory plan ({}):\n", self.device);
        let line = |s: &mut String, what: &str, v: String| s.push_str(&format!("  {what:<22} {v}\n"));
        line(
            &mut s,
            "available",
            self.available.map_or("unknown".into(), |a| format!("{} (after loading the model)", bytes(a))),
        );
        line(&mut s, "base model", self.weights.map_or("not measured".into(), bytes));
        line(
            &mut s,
            "trainable + AdamW",
            format!("{} ({} parameters: values, gradient, 2 moments)", bytes(self.optimizer), self.trainable_params),
        );
        if self.cache > 0 {
            line(&mut s, "feature cache", format!("≤ {} (N × T × H f32, frozen lower layers)", bytes(self.cache)));
        }
        match self.step {
            Some(f) => line(
                &mut s,
                "per micro-batch",
                format!(
                    "{} + {} per example of {} tokens (measured: forward, backward, per-example gradients, clipping{})",
                    bytes(f.fixed),
                    bytes(f.per_example),
                    self.tokens,
                    if f.one_example_only { "; at one example only, as four might not fit" } else { "" }
                ),
            ),
            None => line(&mut s, "per micro-batch", "not measured on this device".into()),
        }
        if let Some(m) = self.at_choice {
            line(&mut s, "", format!("{} measured at {} examples", bytes(m), self.micro_batch));
        }
        let how = match self.choice {
            MicroBatchChoice::Configured => "training.max-physical-batch".to_string(),
            MicroBatchChoice::Automatic => format!(
                "automatic: the largest ≤ {DEFAULT_MICRO_BATCH} whose plan fits in {:.0}% of the available memory",
                HEADROOM * 100.0
            ),
            MicroBatchChoice::Resumed => "kept from the checkpoint being resumed".to_string(),
        };
        line(&mut s, "micro-batch", format!("{} examples ({how})", self.micro_batch));
        if let Some(p) = self.planned(self.micro_batch) {
            line(&mut s, "planned", format!("{} beyond the model", bytes(p)));
        }
        s
    }
}

/// The largest micro-batch ≤ `cap` whose planned memory (`fixed` + `per_example` × b) fits in
/// `HEADROOM` × `available`; 0 when not even one example fits.
pub fn fitting_micro_batch(fixed: u64, per_example: u64, available: u64, cap: usize) -> usize {
    let budget = (available as f64 * HEADROOM) as u64;
    if fixed >= budget {
        return 0;
    }
    let room = (budget - fixed) / per_example.max(1);
    (room as usize).min(cap)
}

/// `b` synthetic examples of `tokens` tokens for `task` (ids 4..43, a public pattern: the plan
/// depends on no record's content or length).
pub fn synthetic_examples(task: Task, tokens: usize, b: usize) -> Vec<Example> {
    (0..b)
        .map(|e| Example {
            ids: (0..tokens).map(|i| ((i * 7 + e * 3) % 40 + 4) as u32).collect(),
            label: 0,
            target_start: match task {
                Task::CausalLm => Some(1),
                Task::Classification => None,
            },
        })
        .collect()
}

/// The peak memory above what is in use of one DP micro-batch of `b` synthetic examples of
/// `tokens` tokens (through the frozen-prefix cache when the model has frozen lower layers, as
/// training runs it): the per-example gradients and their clipping included. None where the
/// device's memory in use cannot be read.
pub fn measure_micro_batch(
    model: &dyn DpModel,
    clip: Option<f64>,
    kind: crate::privacy::ClipKind,
    tokens: usize,
    b: usize,
) -> Result<Option<u64>> {
    let device = model.device().clone();
    let examples = synthetic_examples(model.task(), tokens, b);
    let all: Vec<usize> = (0..b).collect();
    let cache = crate::train::eval::feature_cache(model, &examples, b)?;
    let batch = Batch::gather(&examples, &all, cache.as_ref(), &device)?;
    drop(cache);
    device.synchronize()?;
    let Some(base) = in_use(&device)? else { return Ok(None) };
    reset_peak(&device, false)?;
    let sum = clipped_sum_micro_batch_kind(model, &batch, clip, kind, ClipImpl::Fused)?;
    device.synchronize()?;
    drop(sum);
    Ok(peak(&device)?.map(|p| p.saturating_sub(base)))
}

/// The step's memory as `fixed` + `per_example` × b, from micro-batches of 1 and 4 examples.
/// When 4 times the one-example step exceeds `room` (the memory the steps may use), four examples
/// are not tried — on a GPU that could fail with out-of-memory before the plan can refuse — and
/// the step is planned as the one-example step per example (`one_example_only`: no fixed part,
/// an over-estimate for more than one example).
pub fn measure_step(
    model: &dyn DpModel,
    clip: Option<f64>,
    kind: crate::privacy::ClipKind,
    tokens: usize,
    room: Option<u64>,
) -> Result<Option<StepFit>> {
    // What stays allocated once made is not per-step memory, so it is made before the
    // measurements: the GEMM's per-thread packing buffer on every thread that may run a product
    // (a worker thread allocates it the first time the scheduler hands it one, which a warm-up
    // pass does not guarantee: seen on a 2-core machine, a one-example step measured at 606 KiB
    // instead of about 95 KiB, and a tight budget refused), then one pass for the rest (caches).
    if device_is_cpu(model) {
        warm_gemm_thread_buffers();
    }
    measure_micro_batch(model, clip, kind, tokens, 1)?;
    let Some(one) = measure_micro_batch(model, clip, kind, tokens, 1)? else { return Ok(None) };
    if room.is_some_and(|r| one.saturating_mul(4) > r) {
        return Ok(Some(StepFit { fixed: 0, per_example: one.max(1), one_example_only: true }));
    }
    let Some(four) = measure_micro_batch(model, clip, kind, tokens, 4)? else { return Ok(None) };
    let per = four.saturating_sub(one).div_ceil(3).max(1);
    Ok(Some(StepFit { fixed: one.saturating_sub(per), per_example: per, one_example_only: false }))
}

fn device_is_cpu(model: &dyn DpModel) -> bool {
    matches!(model.device(), Device::Cpu)
}

/// Allocates the GEMM's thread-local packing buffer (`gemm_common::gemm::L2_SLAB`, one L2 cache
/// in size, kept for the thread's life) on this thread and on every thread of rayon's global
/// pool, the threads candle's and our CPU products run on. Afterwards no product allocates it.
pub fn warm_gemm_thread_buffers() {
    fn touch() {
        gemm_common::gemm::L2_SLAB.with(|slab| drop(slab.borrow()));
    }
    touch();
    rayon::broadcast(|_| touch());
}

/// A DP micro-batch's measured memory: `fixed` + `per_example` × examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFit {
    pub fixed: u64,
    pub per_example: u64,
    /// Measured at one example only (four might not have fitted).
    pub one_example_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fitting_micro_batch_is_the_largest_within_the_headroom() {
        // 1000 available → budget 800; fixed 200 leaves 600 = 6 × 100.
        assert_eq!(fitting_micro_batch(200, 100, 1000, 32), 6);
        assert_eq!(fitting_micro_batch(200, 100, 1000, 4), 4);
        assert_eq!(fitting_micro_batch(200, 601, 1000, 32), 0);
        assert_eq!(fitting_micro_batch(800, 1, 1000, 32), 0);
    }

    #[test]
    fn synthetic_examples_have_the_requested_length_and_no_data() {
        let e = synthetic_examples(Task::CausalLm, 7, 3);
        assert_eq!(e.len(), 3);
        assert!(e
            .iter()
            .all(|e| e.ids.len() == 7 && e.target_start == Some(1) && e.ids.iter().all(|&i| (4..44).contains(&i))));
        assert!(synthetic_examples(Task::Classification, 2, 1)[0].target_start.is_none());
    }
}
