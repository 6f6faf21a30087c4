//! The DP-specific kernels behind device-independent functions.
//!
//! Each function is a candle custom op: on a CUDA tensor it launches the kernel of
//! `kernels/dp.cu` (built into PTX by build.rs with the `cuda` feature); on a CPU tensor it runs
//! the Rust twin, a plain loop with the same arithmetic (f64 accumulation in the same order where
//! the order is defined). `dptrain selftest --device cuda` compares the two on random inputs.
//!
//! | function | shapes | kernel |
//! |---|---|---|
//! | `per_example_sq_norms` | parts [b, n_k] f32 → [b] f64 | `dp_sq_norms_accumulate` (one launch per part) |
//! | `clip_factors` | [b] f64 → [b] f32 | `dp_clip_factors` |
//! | `clipped_sum` | parts [b, n_k] f32, factors [b] f32 → [Σ n_k] f32 | `dp_clipped_sum` |
//! | `add_gaussian_noise` | [n] f32, in place | `dp_add_gaussian_noise` |
//! | `chacha20_blocks` | → [n, 16] u32 | `dp_chacha20_blocks` (tests only) |
//! | `FusedAdamW::step` | p [n] f32 in place, g [n] f32, moments [n] f64 | `dp_adamw_step` |
//!
//! Why fused: with candle ops the clip of a [b, P] per-example matrix costs a concatenation, a
//! squared copy, a reduction, a scaled copy and a second reduction (five passes over b·P floats,
//! three of them writes); here it is two reads per part and no [b, P] temporaries.

pub mod chacha;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use std::cell::RefCell;

/// Threads per block of every kernel (`DP_THREADS` in kernels/dp.cu).
pub const THREADS: u32 = 256;

/// Loads `$name` from our PTX on `$dev` (a `&CudaDevice`), pushes the arguments in order and
/// launches with `$cfg`; the launch's result is checked.
#[cfg(feature = "cuda")]
macro_rules! gpu_launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        #[allow(unused_imports)]
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let func = $dev.get_or_load_custom_func($name, gpu::MODULE, gpu::PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        // SAFETY: every kernel of kernels/dp.cu bounds-checks its index against the sizes passed,
        // and the views given cover exactly the elements those sizes describe.
        let launched = unsafe { builder.launch($cfg) };
        launched.map(|_| ()).map_err(|e| candle_core::Error::Msg(format!("CUDA kernel {}: launch failed: {e}", $name)))
    }};
}

fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = contiguous(l, what)?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected f32, got {:?}", s.dtype()),
    }
}

fn cpu_f64<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f64]> {
    let (a, b) = contiguous(l, what)?;
    match s {
        CpuStorage::F64(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected f64, got {:?}", s.dtype()),
    }
}

fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let (a, b) = contiguous(l, what)?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

fn cpu_f64_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f64]> {
    let (a, b) = contiguous(l, what)?;
    match s {
        CpuStorage::F64(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expected f64"),
    }
}

/// Checks that every part is a 2-D f32 tensor with `b` rows; returns (b, total columns).
fn check_parts(parts: &[Tensor], what: &str) -> Result<(usize, usize)> {
    let Some(first) = parts.first() else { candle_core::bail!("{what}: no per-example gradient tensors") };
    let b = first.dims2()?.0;
    let mut p = 0;
    for (k, t) in parts.iter().enumerate() {
        let (rows, n) = t.dims2().map_err(|_| candle_core::Error::Msg(format!("{what}: part {k} is not 2-D")))?;
        if rows != b || t.dtype() != DType::F32 || !t.device().same_device(first.device()) {
            candle_core::bail!(
                "{what}: part {k} is [{rows}, {n}] {:?}, expected [{b}, _] f32 on one device",
                t.dtype()
            );
        }
        p += n;
    }
    Ok((b, p))
}

// ------------------------------------------------------------------------------------------------
// Per-example squared norms.

struct SqNormsAccumulate;

impl InplaceOp2 for SqNormsAccumulate {
    fn name(&self) -> &'static str {
        "dptrain-sq-norms"
    }
    fn cpu_fwd(&self, acc: &mut CpuStorage, la: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let g = cpu_f32(g, lg, self.name())?;
        let acc = cpu_f64_mut(acc, la, self.name())?;
        let n = lg.dims()[1];
        for (i, a) in acc.iter_mut().enumerate() {
            let row = &g[i * n..(i + 1) * n];
            *a += row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        la: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let (b, n) = (lg.dims()[0] as u64, lg.dims()[1] as u64);
        if b == 0 {
            return Ok(());
        }
        let dev = g.device().clone();
        let gv = gpu::view::<f32>(g, lg, self.name())?;
        let mut av = gpu::view_mut::<f64>(acc, la, self.name())?;
        gpu_launch!(&dev, "dp_sq_norms_accumulate", gpu::blocks(b as u32); &gv, &mut av, &b, &n)
    }
}

/// Squared L2 norm of each example's gradient over all `parts` ([b, n_k] f32 each): [b] f64.
pub fn per_example_sq_norms(parts: &[Tensor]) -> Result<Tensor> {
    let (b, _) = check_parts(parts, "per-example norms")?;
    let acc = Tensor::zeros(b, DType::F64, parts[0].device())?;
    for part in parts {
        acc.inplace_op2(&part.contiguous()?, &SqNormsAccumulate)?;
    }
    Ok(acc)
}

// ------------------------------------------------------------------------------------------------
// Clip factors.

struct ClipFactors {
    clip: Option<f64>,
    kind: crate::privacy::ClipKind,
}

/// min(1, C·CLIP_MARGIN / (‖g‖ + 1e-6)); 0 for a non-finite norm (the example is dropped); 1 without clipping.
pub fn clip_factor_from_sq(sq: f64, clip: Option<f64>) -> f32 {
    clip_factor_from_sq_kind(sq, clip, crate::privacy::ClipKind::Flat)
}

/// The factor of `kind` (`ClipKind::factor`); 0 for a non-finite norm; 1 without clipping.
pub fn clip_factor_from_sq_kind(sq: f64, clip: Option<f64>, kind: crate::privacy::ClipKind) -> f32 {
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return 0.0;
    }
    clip.map_or(1.0, |c| kind.factor(norm, c).expect("per-layer refused by clip_factors_kind")) as f32
}

impl candle_core::CustomOp1 for ClipFactors {
    fn name(&self) -> &'static str {
        "dptrain-clip-factors"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let sq = cpu_f64(s, l, self.name())?;
        let f: Vec<f32> = sq.iter().map(|&q| clip_factor_from_sq_kind(q, self.clip, self.kind)).collect();
        Ok((CpuStorage::F32(f), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        if self.kind != crate::privacy::ClipKind::Flat {
            candle_core::bail!("automatic clipping has no CUDA kernel yet: use privacy.clipping = \"flat\" on a GPU");
        }
        let b = l.shape().elem_count();
        let dev = s.device().clone();
        let out = dev.alloc_zeros::<f32>(b)?;
        if b > 0 {
            let sv = gpu::view::<f64>(s, l, self.name())?;
            let (b64, clip, has) =
                (b as u64, self.clip.unwrap_or(0.0) * crate::privacy::clip::CLIP_MARGIN, self.clip.is_some() as i32);
            gpu_launch!(&dev, "dp_clip_factors", gpu::grid(b64); &sv, &out, &b64, &clip, &has)?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

/// Clip factors [b] f32 from squared norms [b] f64 (`clip = None`: 1 for every finite norm).
pub fn clip_factors(sq: &Tensor, clip: Option<f64>) -> Result<Tensor> {
    clip_factors_kind(sq, clip, crate::privacy::ClipKind::Flat)
}

/// The same with a chosen `ClipKind`.
pub fn clip_factors_kind(sq: &Tensor, clip: Option<f64>, kind: crate::privacy::ClipKind) -> Result<Tensor> {
    if kind == crate::privacy::ClipKind::PerLayer {
        candle_core::bail!(
            "per-layer clipping has one factor per group of tensors, not per example: the DP step computes it group by group (flat factors at C/√G)"
        );
    }
    if let crate::privacy::ClipKind::Automatic { stability } = kind {
        if !(stability > 0.0 && stability.is_finite()) {
            candle_core::bail!("automatic clipping's stability γ must be positive and finite, got {stability}");
        }
    }
    if let Some(c) = clip {
        if !(c > 0.0 && c.is_finite()) {
            candle_core::bail!("clip norm must be positive and finite, got {c}");
        }
    }
    if sq.dtype() != DType::F64 || sq.rank() != 1 {
        candle_core::bail!("clip factors: expected [b] f64 squared norms, got {:?} {:?}", sq.dims(), sq.dtype());
    }
    sq.contiguous()?.apply_op1_no_bwd(&ClipFactors { clip, kind })
}

// ------------------------------------------------------------------------------------------------
// Clipped, weighted sum.

/// Adds Σ_i f_i · g_i (rows with f_i = 0 skipped) into `out` (a contiguous slice of the flat
/// gradient). Arguments of the in-place op: (out; g [b, n], f [b]).
struct ClippedSumInto;

impl candle_core::InplaceOp3 for ClippedSumInto {
    fn name(&self) -> &'static str {
        "dptrain-clipped-sum"
    }
    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        lo: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        f: &CpuStorage,
        lf: &Layout,
    ) -> Result<()> {
        let g = cpu_f32(g, lg, self.name())?;
        let f = cpu_f32(f, lf, self.name())?;
        let out = cpu_f32_mut(out, lo, self.name())?;
        let n = out.len();
        let mut acc = vec![0f64; n];
        for (i, &fi) in f.iter().enumerate() {
            if fi == 0.0 {
                continue;
            }
            for (a, &v) in acc.iter_mut().zip(&g[i * n..(i + 1) * n]) {
                *a += fi as f64 * v as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = (*o as f64 + a) as f32;
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        lo: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        f: &candle_core::CudaStorage,
        lf: &Layout,
    ) -> Result<()> {
        let (b, n) = (lg.dims()[0] as u64, lg.dims()[1] as u64);
        if n == 0 {
            return Ok(());
        }
        let dev = g.device().clone();
        let gv = gpu::view::<f32>(g, lg, self.name())?;
        let fv = gpu::view::<f32>(f, lf, self.name())?;
        let mut ov = gpu::view_mut::<f32>(out, lo, self.name())?;
        gpu_launch!(&dev, "dp_clipped_sum", gpu::grid(n); &gv, &fv, &mut ov, &b, &n)
    }
}

/// Σ_i f_i · g_i over the batch, for the concatenation of `parts` ([b, n_k] f32 each, in
/// canonical order): the clipped gradient sum [Σ n_k] f32. No [b, P] concatenation is built.
pub fn clipped_sum(parts: &[Tensor], factors: &Tensor) -> Result<Tensor> {
    let (b, p) = check_parts(parts, "clipped sum")?;
    if factors.dims() != [b] || factors.dtype() != DType::F32 {
        candle_core::bail!("clipped sum: factors are {:?} {:?}, expected [{b}] f32", factors.dims(), factors.dtype());
    }
    let out = Tensor::zeros(p, DType::F32, factors.device())?;
    let factors = factors.contiguous()?;
    let mut offset = 0;
    for part in parts {
        let n = part.dim(1)?;
        out.narrow(0, offset, n)?.inplace_op3(&part.contiguous()?, &factors, &ClippedSumInto)?;
        offset += n;
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Gaussian noise.

/// The secret key of the noise generator: noise of step t, coordinate j is a fixed function of
/// (key, t, j), so the GPU (one thread per coordinate pair) and the CPU produce the same draws.
#[derive(Clone)]
pub struct NoiseKey([u8; 32]);

impl NoiseKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        NoiseKey(bytes)
    }
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(<secret>)")
    }
}

struct AddNoise<'a> {
    key: &'a NoiseKey,
    stream: u64,
    std: f64,
}

impl InplaceOp1 for AddNoise<'_> {
    fn name(&self) -> &'static str {
        "dptrain-gaussian-noise"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let v = cpu_f32_mut(s, l, self.name())?;
        crate::privacy::noise::add_noise_cpu(v, self.key, self.stream, self.std);
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let n = l.shape().elem_count() as u64;
        if n == 0 {
            return Ok(());
        }
        let dev = s.device().clone();
        let k = chacha::key_words(self.key.bytes());
        let mut v = gpu::view_mut::<f32>(s, l, self.name())?;
        gpu_launch!(&dev, "dp_add_gaussian_noise", gpu::grid(n.div_ceil(2));
            &mut v, &n, &self.stream, &self.std, &k[0], &k[1], &k[2], &k[3])
    }
}

/// Adds N(0, std²) to every coordinate of `v` ([n] f32, contiguous), in place, with the noise of
/// stream `stream` (the step number: never reuse one with the same key).
pub fn add_gaussian_noise(v: &Tensor, key: &NoiseKey, stream: u64, std: f64) -> Result<()> {
    if !(std >= 0.0 && std.is_finite()) {
        candle_core::bail!("noise standard deviation must be finite and ≥ 0, got {std}");
    }
    if v.dtype() != DType::F32 || !v.is_contiguous() {
        candle_core::bail!("noise: expected a contiguous f32 tensor");
    }
    v.inplace_op1(&AddNoise { key, stream, std })
}

struct ChaChaBlocks<'a> {
    key: &'a NoiseKey,
    stream: u64,
    first: u64,
}

impl InplaceOp1 for ChaChaBlocks<'_> {
    fn name(&self) -> &'static str {
        "dptrain-chacha20-blocks"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        use rand::{RngCore, SeedableRng};
        let (a, b) = contiguous(l, self.name())?;
        let CpuStorage::U32(out) = s else { candle_core::bail!("chacha blocks: expected u32") };
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(*self.key.bytes());
        rng.set_stream(self.stream);
        rng.set_word_pos(self.first as u128 * 16);
        out[a..b].iter_mut().for_each(|w| *w = rng.next_u32());
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let nblocks = (l.shape().elem_count() / 16) as u64;
        if nblocks == 0 {
            return Ok(());
        }
        let dev = s.device().clone();
        let k = chacha::key_words(self.key.bytes());
        let mut v = gpu::view_mut::<u32>(s, l, self.name())?;
        gpu_launch!(&dev, "dp_chacha20_blocks", gpu::grid(nblocks);
            &mut v, &nblocks, &self.first, &self.stream, &k[0], &k[1], &k[2], &k[3])
    }
}

/// Raw keystream blocks `first .. first + n` of `stream`: [n, 16] u32 (to test the generator).
pub fn chacha20_blocks(device: &Device, key: &NoiseKey, stream: u64, first: u64, n: usize) -> Result<Tensor> {
    let t = Tensor::zeros((n, 16), DType::U32, device)?;
    t.inplace_op1(&ChaChaBlocks { key, stream, first })?;
    Ok(t)
}

// ------------------------------------------------------------------------------------------------
// Fused AdamW.

/// Hyper-parameters of one AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 − β1^t and 1 − β2^t for the 1-based step t.
    pub bc1: f64,
    pub bc2: f64,
}

/// One coordinate of AdamW (the CPU twin of `dp_adamw_step`; same operation order).
#[inline]
pub fn adamw_coordinate(p: &mut f32, g: f32, m: &mut f64, v: &mut f64, h: &AdamWHyper) {
    let g = g as f64;
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
    let mhat = *m / h.bc1;
    let vhat = *v / h.bc2;
    let pj = *p as f64;
    *p = (pj - h.lr * (mhat / (vhat.sqrt() + h.eps) + h.weight_decay * pj)) as f32;
}

/// AdamW moments, on the device of the parameters (allocated at the first step).
pub enum Moments {
    Host {
        m: Vec<f64>,
        v: Vec<f64>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        m: candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
        v: candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
    },
}

impl Moments {
    /// The moments as host vectors (m, v).
    pub fn to_host(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        match self {
            Moments::Host { m, v } => Ok((m.clone(), v.clone())),
            #[cfg(feature = "cuda")]
            Moments::Cuda { m, v } => {
                let stream = m.stream();
                let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
                    candle_core::Error::Msg(format!("copying AdamW moments to the host: {e}"))
                };
                Ok((stream.clone_dtoh(m).map_err(err)?, stream.clone_dtoh(v).map_err(err)?))
            }
        }
    }
}

struct AdamWOp<'a> {
    moments: RefCell<&'a mut Option<Moments>>,
    hyper: AdamWHyper,
}

impl InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "dptrain-fused-adamw"
    }
    fn cpu_fwd(&self, p: &mut CpuStorage, lp: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let g = cpu_f32(g, lg, self.name())?;
        let p = cpu_f32_mut(p, lp, self.name())?;
        let mut slot = self.moments.borrow_mut();
        let moments = (**slot).get_or_insert_with(|| Moments::Host { m: vec![0.0; p.len()], v: vec![0.0; p.len()] });
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let Moments::Host { m, v } = moments
        else {
            candle_core::bail!("AdamW moments live on another device")
        };
        if m.len() != p.len() {
            candle_core::bail!("AdamW: {} parameters, moments for {}", p.len(), m.len());
        }
        for j in 0..p.len() {
            adamw_coordinate(&mut p[j], g[j], &mut m[j], &mut v[j], &self.hyper);
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        lp: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let n = lp.shape().elem_count();
        let mut slot = self.moments.borrow_mut();
        if slot.is_none() {
            let dev = p.device();
            **slot = Some(Moments::Cuda { m: dev.alloc_zeros::<f64>(n)?, v: dev.alloc_zeros::<f64>(n)? });
        }
        let Some(Moments::Cuda { m, v }) = (**slot).as_mut() else {
            candle_core::bail!("AdamW moments live on another device")
        };
        if m.len() != n {
            candle_core::bail!("AdamW: {n} parameters, moments for {}", m.len());
        }
        if n == 0 {
            return Ok(());
        }
        let dev = g.device().clone();
        let gv = gpu::view::<f32>(g, lg, self.name())?;
        let mut pv = gpu::view_mut::<f32>(p, lp, self.name())?;
        let h = self.hyper;
        let n64 = n as u64;
        gpu_launch!(&dev, "dp_adamw_step", gpu::grid(n64);
            &mut pv, &gv, m, v, &n64, &h.lr, &h.beta1, &h.beta2, &h.eps, &h.weight_decay, &h.bc1, &h.bc2)
    }
}

/// AdamW moments (m, v) on the host, as checkpointed.
pub type HostMoments = (Vec<f64>, Vec<f64>);

/// AdamW over the flat parameter vector, one fused pass per step on the parameters' device.
/// Moments are kept in f64; parameters are updated in f64 and stored in f32.
pub struct FusedAdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    moments: Option<Moments>,
    /// Moments restored from a checkpoint, moved to the parameters' device at the next step.
    pending: Option<HostMoments>,
    t: u64,
}

impl FusedAdamW {
    pub fn new(weight_decay: f64, eps: f64) -> Self {
        FusedAdamW { beta1: 0.9, beta2: 0.999, eps, weight_decay, moments: None, pending: None, t: 0 }
    }

    /// The state to checkpoint: steps taken and the moments (m, v) on the host (None before the
    /// first step).
    pub fn state(&self) -> Result<(u64, Option<HostMoments>)> {
        let moments = match (&self.moments, &self.pending) {
            (Some(m), _) => Some(m.to_host()?),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        Ok((self.t, moments))
    }

    /// Continue from a checkpointed state (as returned by `state`), bit for bit.
    pub fn restore(&mut self, steps: u64, moments: Option<HostMoments>) -> Result<()> {
        if let Some((m, v)) = &moments {
            if m.len() != v.len() {
                candle_core::bail!("AdamW state: {} first and {} second moments", m.len(), v.len());
            }
        }
        if steps > 0 && moments.is_none() {
            candle_core::bail!("AdamW state: {steps} steps but no moments");
        }
        self.t = steps;
        self.moments = None;
        self.pending = moments;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    pub fn moments(&self) -> Option<&Moments> {
        self.moments.as_ref()
    }

    /// Updates `params` ([n] f32, contiguous) in place from `grad` ([n] f32) with learning rate `lr`.
    pub fn step(&mut self, params: &Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        if params.dims() != grad.dims() || params.rank() != 1 {
            candle_core::bail!(
                "AdamW: params {:?} and gradient {:?} must be equal-length vectors",
                params.dims(),
                grad.dims()
            );
        }
        if params.dtype() != DType::F32 || grad.dtype() != DType::F32 || !params.is_contiguous() {
            candle_core::bail!("AdamW: expected contiguous f32 parameters and an f32 gradient");
        }
        if let Some((m, v)) = self.pending.take() {
            if m.len() != params.elem_count() {
                candle_core::bail!("AdamW state has moments for {} parameters, not {}", m.len(), params.elem_count());
            }
            self.moments = Some(match params.device() {
                #[cfg(feature = "cuda")]
                Device::Cuda(d) => Moments::Cuda { m: d.clone_htod(&m)?, v: d.clone_htod(&v)? },
                _ => Moments::Host { m, v },
            });
        }
        self.t += 1;
        let hyper = AdamWHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bc1: 1.0 - self.beta1.powi(self.t as i32),
            bc2: 1.0 - self.beta2.powi(self.t as i32),
        };
        let op = AdamWOp { moments: RefCell::new(&mut self.moments), hyper };
        params.inplace_op2(&grad.contiguous()?, &op)
    }
}

// ------------------------------------------------------------------------------------------------
// CUDA plumbing.

/// Runs the element-wise kernel `name(in_1, …, in_k, out, n)` over contiguous f32 inputs and
/// returns the new f32 output (used by the model's GELU custom ops).
#[cfg(feature = "cuda")]
pub fn gpu_elementwise(
    name: &str,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
    shape: &candle_core::Shape,
) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
    let n = shape.elem_count();
    let dev = inputs[0].0.device().clone();
    let out = dev.alloc_zeros::<f32>(n)?;
    if n > 0 {
        let views = inputs.iter().map(|(s, l)| gpu::view::<f32>(s, l, name)).collect::<Result<Vec<_>>>()?;
        let n64 = n as u64;
        match views.as_slice() {
            [a] => gpu_launch!(&dev, name, gpu::grid(n64); a, &out, &n64)?,
            [a, b] => gpu_launch!(&dev, name, gpu::grid(n64); a, b, &out, &n64)?,
            _ => candle_core::bail!("{name}: 1 or 2 inputs expected"),
        }
    }
    Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape.clone()))
}

#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout, Result};

    mod ptx {
        include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
    }
    /// Our PTX and the module name it is registered under in candle's CUDA device.
    pub const PTX: &str = ptx::DP;
    pub const MODULE: &str = "dptrain_dp";

    /// One thread per element, `THREADS` per block.
    pub fn grid(n: u64) -> LaunchConfig {
        let blocks = n.div_ceil(super::THREADS as u64);
        assert!(blocks <= i32::MAX as u64, "kernel grid too large: {n} elements");
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (super::THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block per row.
    pub fn blocks(rows: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (super::THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let (a, b) = super::contiguous(l, what)?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    pub fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, T>> {
        let (a, b) = super::contiguous(l, what)?;
        Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::clip_and_sum_reference;

    fn rand_matrix(b: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..b * n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The sensitivity bound in floating point: each example's clipped gradient, as the f32 values
    /// the sum receives, has an exactly computed (f64) norm ≤ C — for gradients far larger than C,
    /// many clip norms and sizes. Without the clip margin about half of these exceed C by ~2⁻²⁴.
    #[test]
    fn every_clipped_gradient_has_norm_at_most_c_in_floating_point() {
        let mut worst = 0f64;
        for case in 0..400u64 {
            let n = 1 + (case as usize * 37) % 700;
            let scale = [1.0f32, 7.5, 1e3, 3e5][case as usize % 4];
            let g: Vec<f32> = rand_matrix(1, n, case + 11).iter().map(|x| x * scale).collect();
            let c = [1.0, 0.1, 2.0, 0.7318, 1e-3][case as usize % 5];
            let part = Tensor::from_vec(g, (1, n), &Device::Cpu).unwrap();
            let f = clip_factors(&per_example_sq_norms(std::slice::from_ref(&part)).unwrap(), Some(c)).unwrap();
            let out: Vec<f32> = clipped_sum(&[part], &f).unwrap().to_vec1().unwrap();
            let norm = out.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            assert!(norm <= c, "case {case}: clipped norm {norm} > C = {c} (relative excess {:e})", norm / c - 1.0);
            worst = worst.max(norm / c);
        }
        // The margin costs almost nothing: clipped examples still reach within 2e-6 of C.
        assert!(worst > 1.0 - 2e-6, "{worst}");
    }

    #[test]
    fn fused_clip_matches_f64_reference_across_parts_with_a_nan_row() {
        let (b, widths) = (7usize, [5usize, 300, 1]);
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut parts = Vec::new();
        for (k, &n) in widths.iter().enumerate() {
            let mut m = rand_matrix(b, n, k as u64 + 1);
            if k == 1 {
                m[3 * n + 7] = f32::NAN; // example 3 is not finite
            }
            for (i, row) in rows.iter_mut().enumerate() {
                row.extend_from_slice(&m[i * n..(i + 1) * n]);
            }
            parts.push(Tensor::from_vec(m, (b, n), &Device::Cpu).unwrap());
        }
        let sq = per_example_sq_norms(&parts).unwrap();
        let f = clip_factors(&sq, Some(0.5)).unwrap();
        let got: Vec<f32> = clipped_sum(&parts, &f).unwrap().to_vec1().unwrap();
        let (want, nonfinite) = clip_and_sum_reference(&rows, 0.5);
        assert_eq!(nonfinite, 1);
        assert_eq!(f.to_vec1::<f32>().unwrap()[3], 0.0);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn unclipped_factors_are_one_and_nonfinite_zero() {
        let sq = Tensor::new(&[4.0f64, f64::INFINITY, 0.0, f64::NAN], &Device::Cpu).unwrap();
        assert_eq!(clip_factors(&sq, None).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 1.0, 0.0]);
        let f = clip_factors(&sq, Some(1.0)).unwrap().to_vec1::<f32>().unwrap();
        assert!((f[0] - 0.5).abs() < 1e-6 && f[2] == 1.0);
    }

    #[test]
    fn empty_batch_gives_zero_sum() {
        let parts = vec![Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap()];
        let sq = per_example_sq_norms(&parts).unwrap();
        let f = clip_factors(&sq, Some(1.0)).unwrap();
        assert_eq!(clipped_sum(&parts, &f).unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 4]);
    }

    #[test]
    fn fused_adamw_matches_textbook_adamw_over_steps() {
        let n = 37;
        let p0 = rand_matrix(1, n, 9);
        let params = Tensor::from_vec(p0.clone(), n, &Device::Cpu).unwrap();
        let mut opt = FusedAdamW::new(0.01, 1e-8);
        let (mut p, mut m, mut v) = (p0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
        for t in 1..=5 {
            let g = rand_matrix(1, n, 100 + t);
            opt.step(&params, &Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap(), 0.1).unwrap();
            for j in 0..n {
                // Textbook AdamW (Loshchilov & Hutter), all in f64.
                m[j] = 0.9 * m[j] + 0.1 * g[j] as f64;
                v[j] = 0.999 * v[j] + 0.001 * (g[j] as f64).powi(2);
                let mh = m[j] / (1.0 - 0.9f64.powi(t as i32));
                let vh = v[j] / (1.0 - 0.999f64.powi(t as i32));
                p[j] -= 0.1 * (mh / (vh.sqrt() + 1e-8) + 0.01 * p[j]);
            }
        }
        let got: Vec<f32> = params.to_vec1().unwrap();
        for (g, w) in got.iter().zip(&p) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }
}
