//! LoRA linear layers: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ with s = alpha / r.
//!
//! The frozen W and b are plain tensors (never `Var`s), so no gradient is ever computed for them.
//! B starts at zero, so a fresh adapter gives exactly the base output. With a `Tape`, the scaling
//! by s of the LoRA branch is done by a tap that holds the input X and U = X Aᵀ; when the backward
//! reaches it with G = dL/dy (= dL/d(branch), as y = base + branch), the tap computes the
//! per-example gradients dB_i = s G_iᵀ U_i and dA_i = s (G_i B)ᵀ X_i at once and keeps only those
//! ([b, r·in] and [b, out·r], much smaller than G's [b, T, out]), so G is freed as the backward
//! moves on instead of living until the end of the step. Because the tap *is* the scaling op, the
//! DP forward keeps exactly as many [b, T, out] activations as the non-private one.
//!
//! On the CPU in f32 the same DP forward and backward run as one op, `FusedLora`: y computed in
//! one buffer (base GEMM, then the branch accumulated into it), and in the backward G B computed
//! once for the per-example parts and for dL/dx = G W + s (G B) A, itself one buffer. The
//! composed form above is its slow twin (tested against it on random inputs) and the form
//! everywhere else (GPU, bf16/f16 frozen weights).

/// LoRA settings applied when building the model.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Module names (`config::BERT_LORA_MODULES`, `model::llama::LLAMA_LORA_MODULES`).
    pub targets: Vec<String>,
    /// Encoder layers that get adapters (PEFT `layers_to_transform`); `None` = all.
    pub layers: Option<Vec<usize>>,
}

pub mod peft;

use crate::model::fused::tensor_f32;
use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, Var};
use std::sync::{Arc, Mutex};

/// The trainable part of one adapted layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: A [r, in] Kaiming-uniform, U(±1/√in), drawn from
    /// `rng` row by row; B [out, r] zero (so the layer starts as the base layer); scale α/r.
    pub fn init(
        spec: &LoraSpec,
        out: usize,
        inp: usize,
        rng: &mut rand_chacha::ChaCha20Rng,
        device: &candle_core::Device,
    ) -> Result<Self> {
        use rand::Rng;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..spec.rank * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
        Ok(LoraAdapter {
            a: Tensor::from_vec(a, (spec.rank, inp), device)?,
            b: Tensor::zeros((out, spec.rank), DType::F32, device)?,
            scale: spec.alpha / spec.rank as f64,
        })
    }
}

/// A frozen base weight [out, in]: a dense tensor (f32, bf16 or f16), or GGML blocks kept
/// quantized and dequantized to f32 for each product (`model::quant`).
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        FrozenWeight::Dense(t)
    }
}

impl FrozenWeight {
    /// (out, in).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(t) => t.dims2(),
            FrozenWeight::Quantized(q) => q.shape().dims2(),
        }
    }

    /// The dense tensor; an error naming `what` for a quantized weight.
    pub fn dense(&self, what: &str) -> Result<&Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t),
            FrozenWeight::Quantized(q) => candle_core::bail!("{what}: the weight is quantized ({:?})", q.dtype()),
        }
    }

    /// The weight as a dense tensor: itself, or a fresh f32 dequantization on its device.
    pub fn dequantized(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.clone()),
            FrozenWeight::Quantized(q) => crate::model::quant::dequantize(q, &q.device()),
        }
    }

    /// The dtype the layer's products run in: the dense weight's, f32 for a quantized one.
    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Dense(t) => t.dtype(),
            FrozenWeight::Quantized(_) => DType::F32,
        }
    }

    /// Converted to `dtype` if dense; a quantized weight stays as it is.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        match self {
            FrozenWeight::Dense(t) => Ok(FrozenWeight::Dense(t.to_dtype(dtype)?)),
            FrozenWeight::Quantized(_) => Ok(self.clone()),
        }
    }

    /// Bytes of the stored weight.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

/// A linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Module path in the base model, e.g. `encoder.layer.0.attention.self.query`.
    pub name: String,
    /// [out, in], frozen: dense, or kept quantized (`model::quant`).
    pub weight: FrozenWeight,
    /// [out], frozen.
    pub bias: Option<Tensor>,
    pub adapter: Option<LoraAdapter>,
}

/// What the forward of one adapted layer recorded for the per-example gradients.
pub struct LoraRecord {
    pub name: String,
    /// Receives (dA [b, r·in], dB [b, out·r]) per example during the backward pass.
    pub parts: PartsSlot,
    /// dL/dy [b, T, out] itself, only when the tape was asked to keep it (tests).
    pub grad: Option<GradSlot>,
}

/// Where a LoRA tap leaves the per-example gradients of A and B.
#[derive(Clone, Default)]
pub struct PartsSlot(Arc<Mutex<Option<(Tensor, Tensor)>>>);

impl PartsSlot {
    /// (dA, dB) per example, flattened: [b, r·in], [b, out·r] (None if no backward reached it).
    pub fn get(&self) -> Option<(Tensor, Tensor)> {
        self.0.lock().expect("parts slot lock").clone()
    }
}

/// What a LoRA tap needs to turn G = dL/dy into per-example gradients.
struct LoraTapData {
    /// [b, T, in]
    x: Tensor,
    /// [b, T, r]
    u: Tensor,
    /// [out, r]
    b: Tensor,
    scale: f64,
    parts: PartsSlot,
}

impl LoraTapData {
    /// dA_i = s (G_i B)ᵀ X_i and dB_i = s G_iᵀ U_i, as batched products, flattened per example.
    /// Both products read G as it is: only the small [b, r, T] factors Uᵀ and (G B)ᵀ are
    /// transposed (copied, so every GEMM gets plain row-major operands), never G [b, T, out].
    fn parts(&self, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let g = g.contiguous()?;
        let gb = linear_nd(&g, &self.b.t()?)?; // G B: [b, T, r]
        per_example_parts(&self.x, &self.u, &g, &gb, self.scale)
    }
}

/// dA_i = s (G_i B)ᵀ X_i and dB_i = s G_iᵀ U_i for every example i, flattened: [b, r·in] and
/// [b, out·r], from X [b, T, in], U [b, T, r], a contiguous G [b, T, out] and G B [b, T, r].
fn per_example_parts(x: &Tensor, u: &Tensor, g: &Tensor, gb: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let n = g.dim(0)?;
    let ut_g = u.transpose(1, 2)?.contiguous()?.matmul(g)?; // U_iᵀ G_i: [b, r, out]
    let d_b = (ut_g.transpose(1, 2)?.contiguous()? * scale)?; // [b, out, r]
    let d_a = (gb.transpose(1, 2)?.contiguous()?.matmul(x)? * scale)?; // [b, r, in]
    Ok((d_a.reshape((n, ()))?, d_b.reshape((n, ()))?))
}

/// Adds a backward's (dA, dB) to what the slot holds (a second backward through the same graph
/// adds up, as gradients do).
fn add_parts(slot: &PartsSlot, d_a: Tensor, d_b: Tensor) -> Result<()> {
    let mut slot = slot.0.lock().expect("parts slot lock");
    *slot = Some(match slot.take() {
        Some((a, b)) => ((a + d_a)?, (b + d_b)?),
        None => (d_a, d_b),
    });
    Ok(())
}

/// Adds dL/dy to what the slot holds.
fn add_grad(slot: &GradSlot, g: &Tensor) -> Result<()> {
    let mut slot = slot.0.lock().expect("grad slot lock");
    *slot = Some(match slot.take() {
        Some(prev) => (prev + g)?,
        None => g.clone(),
    });
    Ok(())
}

/// What the classification head recorded.
pub struct HeadRecord {
    /// [b, H] pooled features.
    pub h: Tensor,
    /// Receives dL/dlogits [b, C] during the backward pass.
    pub grad: GradSlot,
}

/// Where a `grad_tap` leaves the gradient that flowed through it.
#[derive(Clone, Default)]
pub struct GradSlot(Arc<Mutex<Option<Tensor>>>);

impl GradSlot {
    /// The recorded gradient (None if no backward pass reached the tap).
    pub fn get(&self) -> Option<Tensor> {
        self.0.lock().expect("grad slot lock").clone()
    }
}

/// The identity on `y` whose backward records dL/dy in `slot` (and passes it on unchanged).
/// This is how the tape sees the output gradients of adapted layers and of the head. The op also
/// takes a one-element `Var` it ignores: that makes candle track the graph from here on even when
/// nothing below is trainable (so the backward stops at the lowest tap, as it should), without
/// the [b, T, out] zero "probe" tensors and additions a `Var` added to y would cost.
pub fn grad_tap(y: &Tensor, slot: &GradSlot) -> Result<Tensor> {
    let tracker = Var::zeros(1, DType::F32, y.device())?;
    y.apply_op2(tracker.as_tensor(), GradTap { scale: 1.0, slot: Some(slot.clone()), lora: None })
}

/// y ↦ scale · y (a fresh contiguous tensor), whose backward hands dL/d(output) to the slot and
/// the LoRA parts and returns scale · dL/d(output) for y.
struct GradTap {
    /// 1 for a plain tap; the LoRA scaling s = alpha / r for the tap on a LoRA branch.
    scale: f64,
    /// Keeps dL/dy itself.
    slot: Option<GradSlot>,
    /// Turns dL/dy into per-example LoRA gradients.
    lora: Option<LoraTapData>,
}

impl CustomOp2 for GradTap {
    fn name(&self) -> &'static str {
        "dptrain-grad-tap"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        // y · scale + 0: candle's own affine, so the result is bit-identical to `y * scale`.
        Ok((s.affine(l, self.scale, 0.0)?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s.affine(l, self.scale, 0.0)?, l.shape().clone()))
    }
    fn bwd(
        &self,
        y: &Tensor,
        _tracker: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A second backward through the same graph adds up, as gradients do (both are linear in G).
        if let Some(slot) = &self.slot {
            add_grad(slot, grad_res)?;
        }
        if let Some(lora) = &self.lora {
            // Inside the backward: this tap's per-example work is timed apart from the rest.
            crate::profile::mark(grad_res.device(), "backward")?;
            let (d_a, d_b) = lora.parts(grad_res)?;
            crate::profile::mark(grad_res.device(), "per-example")?;
            add_parts(&lora.parts, d_a, d_b)?;
        }
        // Nothing for an input outside the tracked graph (the lowest adapted layer's branch):
        // candle would keep such a gradient in its store, never read, until the backward ends.
        let grad_y = if !y.track_op() {
            None
        } else if self.scale == 1.0 {
            Some(grad_res.clone())
        } else {
            Some(grad_res.affine(self.scale, 0.0)?)
        };
        Ok((grad_y, None))
    }
}

/// Records of one forward pass, in model order.
#[derive(Default)]
pub struct Tape {
    pub lora: Vec<LoraRecord>,
    pub head: Option<HeadRecord>,
    /// Also keep every adapted layer's dL/dy (for tests; costs [b, T, out] per layer).
    pub keep_output_grads: bool,
}

/// x [.., in] · Wᵀ [in, out] as one GEMM over the flattened leading dimensions.
pub fn linear_nd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    x.reshape((lead, inner))?.matmul(&w.t()?)?.reshape(out_dims)
}

/// The frozen product x Wᵀ as a custom op whose backward returns only dL/dx = G W: candle's own
/// matmul backward would also compute dL/dW for the frozen weights, wasted work on every layer.
/// W may be stored in bf16/f16 (the GPU default): x is cast to W's dtype for the product and the
/// result back to f32, so activations, LoRA branches and everything per-example stay in f32.
/// Its slow twin is the plain matmul (test `frozen_linear_matches_plain_matmul`).
/// The bias, when given, is added inside the op (`model::ops::const_binary`, the same storage add
/// as candle's broadcast add), so no gradient of a [b, T, out] broadcast bias is ever computed.
/// An input outside the tracked graph (the lowest adapted layer's) gets no gradient either.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// x Wᵀ (+ b) for a weight (and bias) that get no gradient; see `FrozenLinear`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear { weight: weight.clone(), bias: bias.cloned() })
}

/// `frozen_matmul`, then the bias (f32) broadcast over the rows.
fn frozen_affine<S: BackendStorage>(
    x: &S,
    l: &Layout,
    w: &S,
    wl: &Layout,
    bias: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (y, shape) = frozen_matmul(x, l, w, wl)?;
    match bias {
        None => Ok((y, shape)),
        Some((b, bl)) => crate::model::ops::const_binary(&y, &Layout::contiguous(&shape), b, bl, false),
    }
}

/// x Wᵀ + b for f32 CPU storage as one GEMM that starts from the bias rows (so the bias costs no
/// pass of its own and the output no zero-fill), or None where that does not apply (other dtypes,
/// a non-contiguous weight or bias: `frozen_affine` then). The slow twin is `frozen_affine` (test
/// `cpu_gemm_affine_matches_the_storage_level_twin`).
fn cpu_f32_affine(
    x: &CpuStorage,
    l: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) else { return Ok(None) };
    let dims = l.dims();
    let k = *dims.last().expect("rank ≥ 1");
    let m = l.shape().elem_count() / k.max(1);
    let n = wl.dims()[0];
    let (Some((x0, x1)), Some((w0, w1))) = (l.contiguous_offsets(), wl.contiguous_offsets()) else {
        return Ok(None);
    };
    if wl.dims() != [n, k] || x1 - x0 != m * k || w1 - w0 != n * k {
        return Ok(None);
    }
    let (xs, ws) = (&xs[x0..x1], &ws[w0..w1]);
    let mut y = match bias {
        None => vec![0f32; m * n],
        Some((CpuStorage::F32(b), bl)) => match bl.contiguous_offsets() {
            Some((b0, b1)) if b1 - b0 == n => {
                let b = &b[b0..b1];
                let mut y = Vec::with_capacity(m * n);
                for _ in 0..m {
                    y.extend_from_slice(b);
                }
                y
            }
            _ => return Ok(None),
        },
        Some(_) => return Ok(None),
    };
    sgemm((m, n, k), &mut y, bias.is_some(), 1.0, xs, ws, true);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = n;
    Ok(Some((CpuStorage::F32(y), Shape::from(out_dims))))
}

/// x Wᵀ (+ b) on the CPU: one bias-initialised GEMM where `cpu_f32_affine` applies, else
/// `frozen_affine`.
fn cpu_frozen_affine(
    x: &CpuStorage,
    l: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let (ws, wl) = weight.storage_and_layout();
    let bias = bias.map(|b| b.storage_and_layout());
    let bias = match &bias {
        None => None,
        Some((bs, bl)) => match &**bs {
            Storage::Cpu(b) => Some((b, *bl)),
            _ => candle_core::bail!("frozen linear: bias and input on different devices"),
        },
    };
    match &*ws {
        Storage::Cpu(w) => match cpu_f32_affine(x, l, w, wl, bias)? {
            Some(out) => Ok(out),
            None => frozen_affine(x, l, w, wl, bias),
        },
        _ => candle_core::bail!("frozen linear: weight and input on different devices"),
    }
}

/// dst [m, n] = (dst if `accumulate`, else 0) + beta · lhs · rhs with the gemm crate on all of
/// rayon's threads. Every operand is row-major and exactly as long as its shape: lhs [m, k]; rhs
/// [k, n], or with `rhs_transposed` a [n, k] read as its transpose (a weight W read as Wᵀ).
fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    beta: f32,
    lhs: &[f32],
    rhs: &[f32],
    rhs_transposed: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n, "sgemm: operand lengths");
    let (rhs_cs, rhs_rs) = if rhs_transposed { (k as isize, 1) } else { (1, n as isize) };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every slice is exactly as long as the extents and strides address (asserted above);
    // dst is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// y [m, n] = x [m, k] · Wᵀ on any backend's storage, in W's dtype, returned in f32.
fn frozen_matmul<S: BackendStorage>(x: &S, l: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let dims = l.dims();
    let k = *dims.last().expect("rank ≥ 1");
    let m = l.shape().elem_count() / k.max(1);
    let n = wl.dims()[0];
    if wl.dims() != [n, k] {
        candle_core::bail!("frozen linear: input [.., {k}] does not match weight {:?}", wl.dims());
    }
    let converted;
    let (xs, xl) = if x.dtype() == w.dtype() {
        (x, Layout::contiguous_with_offset((m, k), l.start_offset()))
    } else {
        converted = x.to_dtype(l, w.dtype())?;
        (&converted, Layout::contiguous((m, k)))
    };
    let y = xs.matmul(w, (1, m, n, k), &xl, &wl.transpose(0, 1)?)?;
    let y = if y.dtype() == DType::F32 { y } else { y.to_dtype(&Layout::contiguous((m, n)), DType::F32)? };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = n;
    Ok((y, Shape::from(out_dims)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "dptrain-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_frozen_affine(s, l, &self.weight, self.bias.as_ref())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias {
            None => None,
            Some((bs, bl)) => match &**bs {
                Storage::Cuda(b) => Some((b, *bl)),
                _ => candle_core::bail!("frozen linear: bias and input on different devices"),
            },
        };
        match &*ws {
            Storage::Cuda(w) => frozen_affine(s, l, w, wl, bias),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            // Nothing below is trainable: dL/dx would be computed and never read.
            return Ok(None);
        }
        let g = grad_res.to_dtype(self.weight.dtype())?;
        Ok(Some(linear_nd(&g, &self.weight.t()?)?.to_dtype(DType::F32)?))
    }
}

/// x deq(W)ᵀ (+ b) for a weight kept quantized: `FrozenLinear` on the weight dequantized to f32
/// for this product only (forward, and again in the backward for dL/dx = G deq(W)), so no
/// dequantized copy outlives one op and the result is exactly the dense f32 layer's on the
/// dequantized values (tests/quantized.rs). Its slow twin is `FrozenLinear` on a dense deq(W).
struct QuantFrozenLinear {
    weight: Arc<QTensor>,
    bias: Option<Tensor>,
}

impl QuantFrozenLinear {
    fn dense(&self, device: &candle_core::Device) -> Result<FrozenLinear> {
        Ok(FrozenLinear { weight: crate::model::quant::dequantize(&self.weight, device)?, bias: self.bias.clone() })
    }
}

/// x deq(W)ᵀ (+ b) for a quantized weight; see `QuantFrozenLinear`.
pub fn quant_frozen_linear(x: &Tensor, weight: &Arc<QTensor>, bias: Option<&Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuantFrozenLinear { weight: weight.clone(), bias: bias.cloned() })
}

impl CustomOp1 for QuantFrozenLinear {
    fn name(&self) -> &'static str {
        "dptrain-quantized-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.dense(&candle_core::Device::Cpu)?.cpu_fwd(s, l)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.dense(&candle_core::Device::Cuda(s.device().clone()))?.cuda_fwd(s, l)
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        self.dense(arg.device())?.bwd(arg, res, grad_res)
    }
}

/// The DP forward of an adapted layer as one op (CPU, f32): y = x Wᵀ + b + s · U Bᵀ with
/// U = x Aᵀ, in one buffer (one bias-initialised GEMM, then the branch accumulated into it), and a
/// backward that from G = dL/dy computes G B once for both uses: the per-example parts
/// dA_i = s (G_i B)ᵀ X_i, dB_i = s G_iᵀ U_i, and dL/dx = G W + s (G B) A, again in one buffer.
/// The composed form (`LoraLinear::forward_composed`: frozen products, the scaling tap, an add)
/// writes y's size three more times in the forward and G's and dL/dx's sizes twice more in the
/// backward; it is this op's slow twin (tests `fused_lora_*`) and what runs wherever this op does
/// not apply (other devices or dtypes: `FusedLora::applies`).
struct FusedLora {
    weight: Tensor,
    bias: Option<Tensor>,
    /// [r, in]
    a: Tensor,
    /// [out, r]
    b: Tensor,
    scale: f64,
    /// U = x Aᵀ [b, T, r], a constant.
    u: Tensor,
    parts: PartsSlot,
    grad: Option<GradSlot>,
}

impl FusedLora {
    /// Does the fused op apply to this layer and input (CPU, everything f32, x [b, T, in])?
    fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, ad: &LoraAdapter) -> bool {
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        x.rank() == 3
            && [x, weight, &ad.a, &ad.b].into_iter().all(f32_cpu)
            && bias.is_none_or(f32_cpu)
            && weight.is_contiguous()
            && ad.a.is_contiguous()
            && ad.b.is_contiguous()
            && bias.is_none_or(|b| b.is_contiguous())
    }
}

impl CustomOp2 for FusedLora {
    fn name(&self) -> &'static str {
        "dptrain-fused-lora-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = cpu_frozen_affine(s, l, &self.weight, self.bias.as_ref())?;
        let CpuStorage::F32(mut y) = y else { candle_core::bail!("fused LoRA linear: f32 only") };
        let (n, r) = self.b.dims2()?;
        let m = y.len() / n.max(1);
        tensor_f32(&self.u, "fused LoRA linear", |u| {
            tensor_f32(&self.b, "fused LoRA linear", |b| {
                sgemm((m, n, r), &mut y, true, self.scale as f32, u, b, true);
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(y), shape))
    }
    fn bwd(
        &self,
        x: &Tensor,
        _tracker: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if let Some(slot) = &self.grad {
            add_grad(slot, grad_res)?;
        }
        let g = grad_res.contiguous()?;
        let gb = linear_nd(&g, &self.b.t()?)?; // G B: [b, T, r]
        crate::profile::mark(g.device(), "backward")?;
        // x is the tracked input: read through a detached handle, so the parts (kept until the
        // step ends) hold no graph that would keep activations alive.
        let (d_a, d_b) = per_example_parts(&x.detach(), &self.u, &g, &gb, self.scale)?;
        crate::profile::mark(g.device(), "per-example")?;
        add_parts(&self.parts, d_a, d_b)?;
        if !x.track_op() {
            // Nothing below is trainable: dL/dx would be computed and never read.
            return Ok((None, None));
        }
        let (n, k) = self.weight.dims2()?;
        let r = self.a.dim(0)?;
        let m = g.elem_count() / n.max(1);
        let mut dx = vec![0f32; m * k];
        tensor_f32(&g, "fused LoRA linear", |g| {
            tensor_f32(&self.weight, "fused LoRA linear", |w| {
                sgemm((m, k, n), &mut dx, false, 1.0, g, w, false);
                Ok(())
            })
        })?;
        tensor_f32(&gb, "fused LoRA linear", |gb| {
            tensor_f32(&self.a, "fused LoRA linear", |a| {
                sgemm((m, k, r), &mut dx, true, self.scale as f32, gb, a, false);
                Ok(())
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}

impl LoraLinear {
    /// x Wᵀ + b, back-propagating only to x (computed in W's dtype, returned in f32).
    fn frozen(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => frozen_linear(x, w, self.bias.as_ref()),
            FrozenWeight::Quantized(q) => quant_frozen_linear(x, q, self.bias.as_ref()),
        }
    }

    pub fn forward(&self, x: &Tensor, tape: Option<&mut Tape>) -> Result<Tensor> {
        let Some(ad) = &self.adapter else { return self.frozen(x) };
        match tape {
            None => {
                let y = self.frozen(x)?;
                let u = linear_nd(x, &ad.a)?;
                // branch + y: where y is a constant (nothing below is trainable), no gradient
                // of y's size is computed for it (`add_const`).
                crate::model::ops::add_const(&(linear_nd(&u, &ad.b)? * ad.scale)?, &y)
            }
            Some(tape) => match &self.weight {
                FrozenWeight::Dense(w) if FusedLora::applies(x, w, self.bias.as_ref(), ad) => {
                    self.forward_fused(x, w, ad, tape)
                }
                _ => self.forward_composed(x, ad, tape),
            },
        }
    }

    /// The DP forward as one `FusedLora` op (CPU, f32).
    fn forward_fused(&self, x: &Tensor, weight: &Tensor, ad: &LoraAdapter, tape: &mut Tape) -> Result<Tensor> {
        let x = x.contiguous()?;
        let u = frozen_linear(&x.detach(), &ad.a, None)?;
        let parts = PartsSlot::default();
        let grad = tape.keep_output_grads.then(GradSlot::default);
        let op = FusedLora {
            weight: weight.clone(),
            bias: self.bias.clone(),
            a: ad.a.clone(),
            b: ad.b.clone(),
            scale: ad.scale,
            u,
            parts: parts.clone(),
            grad: grad.clone(),
        };
        // The tracker (as in `grad_tap`) makes y part of the tracked graph even when x is not,
        // so the backward reaches the op for the per-example parts.
        let tracker = Var::zeros(1, DType::F32, x.device())?;
        let y = x.apply_op2(tracker.as_tensor(), op)?;
        tape.lora.push(LoraRecord { name: self.name.clone(), parts, grad });
        Ok(y)
    }

    /// The DP forward as composed ops: the fused op's slow twin, and the form on devices and
    /// dtypes it does not cover.
    fn forward_composed(&self, x: &Tensor, ad: &LoraAdapter, tape: &mut Tape) -> Result<Tensor> {
        let y = self.frozen(x)?;
        // A and B are constants here, entered as frozen weights (candle's matmul backward would
        // compute gradients for them, and the one for Bᵀ, Uᵀ G, would keep each layer's G alive
        // in the gradient store until the backward ends); the tap turns dL/dy into per-example
        // gradients. The branch still uses the tracked x, so upstream layers get the gradient
        // through both paths.
        let u = frozen_linear(x, &ad.a, None)?;
        let ub = frozen_linear(&u, &ad.b, None)?;
        let parts = PartsSlot::default();
        let grad = tape.keep_output_grads.then(GradSlot::default);
        let data = LoraTapData {
            x: x.detach().contiguous()?,
            u: u.detach(),
            b: ad.b.clone(),
            scale: ad.scale,
            parts: parts.clone(),
        };
        let tracker = Var::zeros(1, DType::F32, y.device())?;
        let tap = GradTap { scale: ad.scale, slot: grad.clone(), lora: Some(data) };
        let branch = ub.apply_op2(tracker.as_tensor(), tap)?;
        tape.lora.push(LoraRecord { name: self.name.clone(), parts, grad });
        crate::model::ops::add_const(&branch, &y)
    }
}

/// (PEFT name, tensor) of lora_A then lora_B for each adapted layer, in the given order.
pub fn adapter_tensors(layers: &[&LoraLinear]) -> Vec<(String, Tensor)> {
    let mut out = Vec::with_capacity(2 * layers.len());
    for l in layers {
        let ad = l.adapter.as_ref().expect("adapted layer");
        let (na, nb) = peft_names(&l.name);
        out.push((na, ad.a.clone()));
        out.push((nb, ad.b.clone()));
    }
    out
}

/// `tensors` has the count and shapes of `expected` (for `set_trainable`).
pub fn check_shapes(expected: &[(String, Tensor)], tensors: &[Tensor]) -> Result<()> {
    if tensors.len() != expected.len() {
        candle_core::bail!("set_trainable: {} tensors given, {} expected", tensors.len(), expected.len());
    }
    for ((name, old), new) in expected.iter().zip(tensors) {
        if old.dims() != new.dims() {
            candle_core::bail!("set_trainable: {name}: shape {:?}, expected {:?}", new.dims(), old.dims());
        }
    }
    Ok(())
}

/// PEFT tensor names of one adapted module.
pub fn peft_names(module: &str) -> (String, String) {
    (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{Device, IndexOp};

    fn layer(b_zero: bool) -> LoraLinear {
        LoraLinear {
            name: "m".into(),
            weight: rand(&[3, 4], 1).into(),
            bias: Some(rand(&[3], 2)),
            adapter: Some(LoraAdapter {
                a: rand(&[2, 4], 3),
                b: if b_zero {
                    Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap()
                } else {
                    rand(&[3, 2], 4)
                },
                scale: 2.5,
            }),
        }
    }

    #[test]
    fn frozen_linear_matches_plain_matmul() {
        let l = LoraLinear { adapter: None, ..layer(false) };
        let x = Var::from_tensor(&rand(&[2, 5, 4], 21)).unwrap();
        let c = rand(&[2, 5, 3], 22);
        let fast = l.frozen(x.as_tensor()).unwrap();
        let slow = linear_nd(x.as_tensor(), l.weight.dense("test").unwrap())
            .unwrap()
            .broadcast_add(l.bias.as_ref().unwrap())
            .unwrap();
        let d = (&fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6);
        let gf = fast.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = slow.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gs) = (gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
        let d = (gf - gs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "input gradient differs by {d}");
    }

    #[test]
    fn cpu_gemm_affine_matches_the_storage_level_twin() {
        for (m, k, n, bias) in
            [(7usize, 5usize, 3usize, true), (1, 1, 1, true), (64, 33, 17, false), (130, 384, 96, true)]
        {
            let x = rand(&[m, k], 40 + m as u64);
            let w = rand(&[n, k], 41);
            let b = rand(&[n], 42);
            let b = bias.then_some(&b);
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let bs = b.map(|b| b.storage_and_layout());
            let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else { panic!("cpu") };
            let bias = bs.as_ref().map(|(s, l)| match &**s {
                Storage::Cpu(s) => (s, *l),
                _ => panic!("cpu"),
            });
            let (fast, fs) = cpu_f32_affine(xs, xl, ws, wl, bias).unwrap().expect("the GEMM path applies");
            let (slow, ss) = frozen_affine(xs, xl, ws, wl, bias).unwrap();
            assert_eq!(fs.dims(), ss.dims());
            let (CpuStorage::F32(f), CpuStorage::F32(s)) = (fast, slow) else { panic!("f32") };
            let top = s.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = f.iter().zip(&s).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-6 * top, "{m}x{k}x{n}: {err} of {top}");
        }
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let top = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30);
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / top
    }

    /// Everything one DP backward through an adapted layer yields: dL/dx (if x is tracked), the
    /// per-example (dA, dB) and the recorded dL/dy, for L = Σ y ⊙ c.
    fn dp_backward(
        l: &LoraLinear,
        x: &Tensor,
        c: &Tensor,
        fused: bool,
    ) -> (Tensor, Option<Tensor>, Tensor, Tensor, Tensor) {
        let xv = Var::from_tensor(x).unwrap();
        let ad = l.adapter.as_ref().unwrap();
        let mut tape = Tape { keep_output_grads: true, ..Tape::default() };
        let y = if fused {
            assert!(FusedLora::applies(x, l.weight.dense("test").unwrap(), l.bias.as_ref(), ad));
            l.forward_fused(xv.as_tensor(), l.weight.dense("test").unwrap(), ad, &mut tape).unwrap()
        } else {
            l.forward_composed(xv.as_tensor(), ad, &mut tape).unwrap()
        };
        let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        let (d_a, d_b) = tape.lora[0].parts.get().unwrap();
        let gy = tape.lora[0].grad.as_ref().unwrap().get().unwrap();
        (y, g.get(xv.as_tensor()).cloned(), d_a, d_b, gy)
    }

    #[test]
    fn fused_lora_forward_and_backward_match_the_composed_twin_on_random_inputs() {
        for (i, &(b, t, k, n, r, bias)) in [
            (2usize, 5usize, 4usize, 3usize, 2usize, true),
            (3, 17, 64, 48, 8, false),
            (4, 33, 96, 160, 8, true),
            (1, 1, 7, 5, 1, true),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 * i as u64;
            let l = LoraLinear {
                name: "m".into(),
                weight: rand(&[n, k], seed + 1).into(),
                bias: bias.then(|| rand(&[n], seed + 2)),
                adapter: Some(LoraAdapter { a: rand(&[r, k], seed + 3), b: rand(&[n, r], seed + 4), scale: 2.0 }),
            };
            let x = rand(&[b, t, k], seed + 5);
            let c = rand(&[b, t, n], seed + 6);
            let (yf, dxf, daf, dbf, gf) = dp_backward(&l, &x, &c, true);
            let (yc, dxc, dac, dbc, gc) = dp_backward(&l, &x, &c, false);
            let tol = 1e-5;
            for (what, f, c) in [
                ("y", &yf, &yc),
                ("dx", &dxf.unwrap(), &dxc.unwrap()),
                ("dA", &daf, &dac),
                ("dB", &dbf, &dbc),
                ("dL/dy", &gf, &gc),
            ] {
                assert_eq!(f.dims(), c.dims(), "{what}");
                let d = max_rel_diff(f, c);
                assert!(d < tol, "case {i}: {what} differs from the composed twin by {d} (relative)");
            }
        }
    }

    #[test]
    fn fused_lora_with_an_untracked_input_records_the_parts_and_stores_no_large_gradient() {
        let l = layer(false);
        let x = rand(&[2, 5, 4], 31);
        let mut tape = Tape::default();
        let y = l.forward(&x, Some(&mut tape)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        for id in g.get_ids() {
            let t = g.get_id(*id).unwrap();
            assert!(t.elem_count() < 10, "a gradient of shape {:?} was stored", t.dims());
        }
        let mut tape_c = Tape::default();
        let yc = l.forward_composed(&x, l.adapter.as_ref().unwrap(), &mut tape_c).unwrap();
        yc.sum_all().unwrap().backward().unwrap();
        let ((a, b), (ac, bc)) = (tape.lora[0].parts.get().unwrap(), tape_c.lora[0].parts.get().unwrap());
        assert!(max_rel_diff(&a, &ac) < 1e-5 && max_rel_diff(&b, &bc) < 1e-5);
    }

    #[test]
    fn fused_lora_applies_to_f32_cpu_only_and_other_dtypes_take_the_composed_form() {
        let l = layer(false);
        let ad = l.adapter.as_ref().unwrap();
        let x = rand(&[2, 5, 4], 31);
        assert!(FusedLora::applies(&x, l.weight.dense("test").unwrap(), l.bias.as_ref(), ad));
        assert!(!FusedLora::applies(
            &x.reshape((10, 4)).unwrap(),
            l.weight.dense("test").unwrap(),
            l.bias.as_ref(),
            ad
        ));
        let w16 = l.weight.dense("test").unwrap().to_dtype(DType::BF16).unwrap();
        assert!(!FusedLora::applies(&x, &w16, l.bias.as_ref(), ad));
        // A bf16 frozen weight (the GPU default) runs the composed form: same as the composed
        // form of the f32 model up to the bf16 rounding of W and x.
        let l16 = LoraLinear { weight: w16.clone().into(), ..l.clone() };
        let mut tape = Tape::default();
        let y16 = l16.forward(&x, Some(&mut tape)).unwrap();
        let mut tape = Tape::default();
        let y = l.forward_composed(&x, ad, &mut tape).unwrap();
        let d = max_rel_diff(&y16, &y);
        assert!(d > 0.0 && d < 2e-2, "{d}");
    }

    #[test]
    fn taped_forward_equals_plain_forward_and_frozen_input_gets_no_gradient() {
        // The composed DP forward (A, B as frozen weights, the scaling as the tap) computes the
        // same y as the plain one, bit for bit; the fused one to f32 rounding.
        let l = layer(false);
        let x = rand(&[2, 5, 4], 31);
        let plain = l.forward(&x, None).unwrap();
        let mut tape = Tape::default();
        let composed = l.forward_composed(&x, l.adapter.as_ref().unwrap(), &mut tape).unwrap();
        let (p, t) = (plain.flatten_all().unwrap(), composed.flatten_all().unwrap());
        assert_eq!(p.to_vec1::<f32>().unwrap(), t.to_vec1::<f32>().unwrap());
        let mut tape = Tape::default();
        let taped = l.forward(&x, Some(&mut tape)).unwrap();
        assert!(max_rel_diff(&taped, &plain) < 1e-6);
        // x is not tracked (nothing below is trainable): the backward reaches the tap, which
        // records the per-example parts, and stores no gradient for x or anything of its size.
        let g = taped.sum_all().unwrap().backward().unwrap();
        assert!(tape.lora[0].parts.get().is_some());
        for id in g.get_ids() {
            let t = g.get_id(*id).unwrap();
            assert!(t.elem_count() < 10, "a gradient of shape {:?} was stored", t.dims());
        }
        // With a tracked x, its gradient is the plain forward's.
        let xv = Var::from_tensor(&x).unwrap();
        let gp = l.forward(xv.as_tensor(), None).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let mut tape = Tape::default();
        let gt =
            l.forward(xv.as_tensor(), Some(&mut tape)).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (gp.get(xv.as_tensor()).unwrap(), gt.get(xv.as_tensor()).unwrap());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "input gradient differs by {d}");
    }

    #[test]
    fn lora_b_zero_init_gives_base_output() {
        let l = layer(true);
        let x = rand(&[2, 5, 4], 9);
        let y = l.forward(&x, None).unwrap();
        let base = LoraLinear { adapter: None, ..l.clone() }.forward(&x, None).unwrap();
        let d = (y - base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn lora_forward_and_backward_match_hand_computation() {
        let l = layer(false);
        let x = rand(&[1, 1, 4], 11);
        let (w, bias) = (
            l.weight.dense("test").unwrap().to_vec2::<f32>().unwrap(),
            l.bias.clone().unwrap().to_vec1::<f32>().unwrap(),
        );
        let ad = l.adapter.clone().unwrap();
        let (a, b) = (ad.a.to_vec2::<f32>().unwrap(), ad.b.to_vec2::<f32>().unwrap());
        let xv = x.i((0, 0)).unwrap().to_vec1::<f32>().unwrap();
        // Hand forward: y_o = Σ_k W_ok x_k + bias_o + s Σ_j B_oj Σ_k A_jk x_k (NOT s·(Wx + BAx)).
        let u: Vec<f64> = (0..2).map(|j| (0..4).map(|k| a[j][k] as f64 * xv[k] as f64).sum()).collect();
        let y_hand: Vec<f64> = (0..3)
            .map(|o| {
                (0..4).map(|k| w[o][k] as f64 * xv[k] as f64).sum::<f64>()
                    + bias[o] as f64
                    + 2.5 * (0..2).map(|j| b[o][j] as f64 * u[j]).sum::<f64>()
            })
            .collect();
        // Backward of L = Σ_o c_o y_o with c = (1, -2, 0.5): dB_oj = s c_o u_j, dA_jk = s (Σ_o c_o B_oj) x_k.
        let c = [1.0f64, -2.0, 0.5];
        let a_var = Var::from_tensor(&ad.a).unwrap();
        let b_var = Var::from_tensor(&ad.b).unwrap();
        let lv = LoraLinear {
            adapter: Some(LoraAdapter { a: a_var.as_tensor().clone(), b: b_var.as_tensor().clone(), scale: 2.5 }),
            ..l.clone()
        };
        let y = lv.forward(&x, None).unwrap();
        let yv = y.i((0, 0)).unwrap().to_vec1::<f32>().unwrap();
        for o in 0..3 {
            assert!((yv[o] as f64 - y_hand[o]).abs() < 1e-5, "y[{o}]");
        }
        let ct = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let loss = y.broadcast_mul(&ct).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gb = g.get(b_var.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let ga = g.get(a_var.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for o in 0..3 {
            for j in 0..2 {
                assert!((gb[o][j] as f64 - 2.5 * c[o] * u[j]).abs() < 1e-5);
            }
        }
        for j in 0..2 {
            let cb: f64 = (0..3).map(|o| c[o] * b[o][j] as f64).sum();
            for k in 0..4 {
                assert!((ga[j][k] as f64 - 2.5 * cb * xv[k] as f64).abs() < 1e-5);
            }
        }
    }
}
