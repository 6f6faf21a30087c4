//! Next-token negative log-likelihood over the vocabulary, fused on the CPU: −log softmax(h Wᵀ)[y]
//! per row, computed in vocabulary slices so that the [n, vocabulary] logits never exist whole.
//!
//! Composed from candle ops (`vocab_nll_composed`: head product, log-softmax, gather — the slow
//! twin, and the form used off the CPU), a language model's loss materialises the logits, their
//! log-softmax and, in the backward, gradients of the same [n, V] f32 size, several times over
//! (SmolLM2 at 8 × 128 tokens: 1,016 × 49,152 × 4 B = 191 MiB each), each a fresh allocation the
//! kernel must fault in and zero. The fused op takes slices of the vocabulary whose logits for
//! all n rows fit in a few MiB (slices, not row chunks: every GEMM then packs each head row once,
//! where row chunks would re-pack the whole [V, H] head per chunk) and folds each slice into
//! running per-row sums, rescaled when a row's max grows, as flash attention does: Σ exp(logit −
//! max) for the log-sum-exp and, when the input is tracked, Σ exp(logit − max) · W_v, so that the
//! forward ends with each row's NLL and its gradient factor d nll_r / d h_r = softmax_r · W −
//! W[y_r] ([n, H]). The backward only scales those rows by dL/dnll: two head products in all
//! (logits, and probabilities times W), as an unfused backward has, and one exponential per logit.
//! Rows are independent: no example's loss or gradient depends on another's.

use super::ops::log_softmax_last;
use crate::lora::FrozenWeight;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Logit values per chunk: 4 Mi f32 = 16 MiB (below glibc's mmap threshold as dptrain sets it,
/// so chunks reuse heap memory instead of faulting fresh pages in).
const CHUNK_VALUES: usize = 1 << 22;

/// −log softmax(z)[targets] for every row, with z = h Wᵀ or, with a soft cap c (Gemma's
/// final_logit_softcapping), z = c · tanh(h Wᵀ / c): `h` [n, H], `w` [V, H] (frozen), `targets`
/// [n] (u32, each < V). Returns [n] f32. Fused on the CPU when h and W are f32 (`VocabNll`),
/// composed of candle ops elsewhere (`vocab_nll_composed`).
pub fn vocab_nll(h: &Tensor, w: &Tensor, targets: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    let fusable =
        h.device().is_cpu() && h.dtype() == DType::F32 && w.dtype() == DType::F32 && !w.track_op() && h.rank() == 2;
    if !fusable {
        return vocab_nll_composed(h, w, targets, cap);
    }
    let (n, hidden) = h.dims2()?;
    let (vocab, wh) = w.dims2()?;
    if wh != hidden {
        candle_core::bail!("vocabulary NLL: rows of {hidden} against a head of shape [{vocab}, {wh}]");
    }
    let targets = checked_targets(targets, n, vocab)?;
    fused(h, Head::Dense(w.contiguous()?), vocab, targets, cap)
}

/// [`vocab_nll`] for a frozen head that may be quantized (`model.quantize-vocab`): fused on the
/// CPU with each vocabulary slice of the head dequantized as it is needed (the [V, H] head never
/// exists in f32), composed of candle ops on the whole dequantized head elsewhere. Either way the
/// values of the dense NLL on deq(W).
pub fn vocab_nll_frozen(h: &Tensor, w: &FrozenWeight, targets: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    let q = match w {
        FrozenWeight::Dense(w) => return vocab_nll(h, w, targets, cap),
        FrozenWeight::Quantized(q) => q,
    };
    if !(h.device().is_cpu() && q.device().is_cpu() && h.dtype() == DType::F32 && h.rank() == 2) {
        return vocab_nll_composed(h, &super::quant::dequantize(q, h.device())?, targets, cap);
    }
    let (n, hidden) = h.dims2()?;
    let (vocab, wh) = q.shape().dims2()?;
    if wh != hidden {
        candle_core::bail!("vocabulary NLL: rows of {hidden} against a head of shape [{vocab}, {wh}]");
    }
    let targets = checked_targets(targets, n, vocab)?;
    fused(h, Head::Blocks(q.clone()), vocab, targets, cap)
}

fn checked_targets(targets: &Tensor, n: usize, vocab: usize) -> Result<Vec<u32>> {
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if targets.len() != n {
        candle_core::bail!("vocabulary NLL: {} targets for {n} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&y| y as usize >= vocab) {
        candle_core::bail!("vocabulary NLL: target token {bad} outside the vocabulary of {vocab}");
    }
    Ok(targets)
}

fn fused(h: &Tensor, w: Head, vocab: usize, targets: Vec<u32>, cap: Option<f64>) -> Result<Tensor> {
    let keep = h.track_op();
    let cap = cap.map(|c| c as f32);
    h.contiguous()?.apply_op1(VocabNll { w, vocab, targets, cap, keep, grad_unit: Mutex::new(None) })
}

/// The same NLL from candle's differentiable ops: the head product (`lora::frozen_linear`), the
/// soft cap if any (`llama::softcap`), the log-softmax (`ops::log_softmax_last`), the gathered
/// target column, negated.
pub fn vocab_nll_composed(h: &Tensor, w: &Tensor, targets: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    let mut logits = crate::lora::frozen_linear(h, w, None)?;
    if let Some(c) = cap {
        logits = super::llama::softcap(&logits, c)?;
    }
    let logp = log_softmax_last(&logits)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// The head W [V, H] of the fused op.
enum Head {
    /// f32, contiguous, on the CPU.
    Dense(Tensor),
    /// GGML blocks on the CPU, each row a whole number of blocks.
    Blocks(Arc<QTensor>),
}

/// The head's values as the fused op reads them.
enum HeadRows<'a> {
    Dense(&'a [f32]),
    Blocks(&'a QTensor),
}

impl HeadRows<'_> {
    /// Rows v0 .. v0 + cols of W ([cols, H] row-major): borrowed from a dense head, dequantized
    /// into `buf` from blocks.
    fn rows<'b>(&'b self, v0: usize, cols: usize, hidden: usize, buf: &'b mut Vec<f32>) -> Result<&'b [f32]> {
        match self {
            HeadRows::Dense(w) => {
                if w.len() < (v0 + cols) * hidden {
                    candle_core::bail!("vocabulary NLL: head rows {v0}..{} out of bounds", v0 + cols);
                }
                Ok(&w[v0 * hidden..(v0 + cols) * hidden])
            }
            HeadRows::Blocks(q) => {
                buf.resize(cols * hidden, 0.0);
                super::quant::dequantize_rows(q, v0, cols, &mut buf[..cols * hidden])?;
                Ok(&buf[..cols * hidden])
            }
        }
    }

    /// Vocabulary entries per slice for `n` rows of `hidden`: [`slice_width`], and for a
    /// quantized head also at most what a [`CHUNK_VALUES`] buffer of dequantized rows holds
    /// (never fewer than 256), so the head is never dequantized whole.
    fn width(&self, n: usize, hidden: usize) -> usize {
        match self {
            HeadRows::Dense(_) => slice_width(n),
            HeadRows::Blocks(_) => slice_width(n).min((CHUNK_VALUES / hidden.max(1)).max(256)),
        }
    }
}

struct VocabNll {
    w: Head,
    /// V, the head's rows.
    vocab: usize,
    targets: Vec<u32>,
    /// The soft cap c of the logits (z → c · tanh(z / c)), if any.
    cap: Option<f32>,
    /// Whether the input is tracked: the forward then also computes the backward's factor.
    keep: bool,
    /// d nll_r / d h_r = softmax_r · W − W[y_r] per row ([n, H]), kept by the forward.
    grad_unit: Mutex<Option<Vec<f32>>>,
}

/// Vocabulary entries per slice for `n` rows (at least 256, so that each GEMM stays efficient).
fn slice_width(n: usize) -> usize {
    (CHUNK_VALUES / n.max(1)).max(256)
}

/// out [n, cols] = h [n, H] · wsᵀ for ws = W[v0 .. v0 + cols] ([cols, H]), the GEMM split across
/// the thread pool.
fn slice_logits(h: &[f32], ws: &[f32], hidden: usize, cols: usize, out: &mut [f32]) {
    let n = h.len() / hidden;
    assert!(out.len() == n * cols && ws.len() == cols * hidden, "vocabulary NLL: slice bounds");
    // SAFETY: h is [n, H], out [n, cols] and ws [cols, H] row-major (asserted); ws is read as
    // its transpose: column j of wsᵀ is row j of ws.
    unsafe {
        gemm::gemm(
            n,
            cols,
            hidden,
            out.as_mut_ptr(),
            1,
            cols as isize,
            false,
            h.as_ptr(),
            1,
            hidden as isize,
            ws.as_ptr(),
            hidden as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Folds one slice of a row into its running (max, Σ exp(x − max)); with `write`, the row is
/// replaced by exp(x − max) (for the backward's accumulation). Returns the factor by which the
/// earlier sum was rescaled (1 when the max did not grow). NaN never wins the max, so a NaN logit
/// makes the sum (and the NLL) NaN, as in the composed form.
fn fold_row(state: &mut (f32, f64), row: &mut [f32], write: bool) -> f32 {
    let max = row.iter().fold(state.0, |m, &v| if v > m { v } else { m });
    let mut rescale = 1.0;
    if max > state.0 && state.1 > 0.0 {
        rescale = super::vexp::exp(state.0 - max);
        state.1 *= rescale as f64;
    }
    state.0 = max;
    state.1 += super::vexp::exp_shifted_sum(row, max, write);
    rescale
}

fn f32_of(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("{what}: f32 expected");
    }
    t.flatten_all()?.to_vec1::<f32>()
}

impl VocabNll {
    fn with_w<R>(&self, f: impl FnOnce(HeadRows<'_>) -> Result<R>) -> Result<R> {
        match &self.w {
            Head::Dense(w) => {
                let (s, l) = w.storage_and_layout();
                match &*s {
                    Storage::Cpu(s) => f(HeadRows::Dense(super::fused::f32_contiguous(s, l, "vocabulary NLL head")?)),
                    _ => candle_core::bail!("vocabulary NLL: the head is not on the CPU"),
                }
            }
            Head::Blocks(q) => f(HeadRows::Blocks(q)),
        }
    }
}

impl CustomOp1 for VocabNll {
    fn name(&self) -> &'static str {
        "dptrain-vocab-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = super::fused::f32_contiguous(s, l, "vocabulary NLL")?;
        let (n, hidden) = l.shape().dims2()?;
        let vocab = self.vocab;
        // Per row: running max, Σ exp(logit − max), the target's logit, and (for the backward)
        // acc = Σ_v exp(logit_v − max) W_v, all rescaled together when the max grows.
        let mut state = vec![(f32::NEG_INFINITY, 0f64); n];
        let mut target_logit = vec![0f32; n];
        let mut acc = vec![0f32; if self.keep { n * hidden } else { 0 }];
        // With a cap: the derivative 1 − tanh²(z / c) of each capped logit (for the backward's
        // accumulation) and of each row's target.
        let capped_grad = self.keep && self.cap.is_some();
        let mut target_deriv = vec![1f32; n];
        self.with_w(|w| {
            let width = w.width(n, hidden).min(vocab);
            let mut logits = vec![0f32; n * width];
            let mut deriv = vec![0f32; if capped_grad { n * width } else { 0 }];
            let mut buf = Vec::new();
            for v0 in (0..vocab).step_by(width) {
                let cols = width.min(vocab - v0);
                let logits = &mut logits[..n * cols];
                let ws = w.rows(v0, cols, hidden, &mut buf)?;
                slice_logits(h, ws, hidden, cols, logits);
                if let Some(c) = self.cap {
                    // z → c · tanh(z / c), as transformers computes it (f32: divide, tanh, multiply).
                    let cap_row = |i: usize, row: &mut [f32], mut d: Option<&mut [f32]>, td: &mut f32| {
                        let y = self.targets[i] as usize;
                        for (j, z) in row.iter_mut().enumerate() {
                            let t = (*z / c).tanh();
                            *z = t * c;
                            if let Some(d) = d.as_deref_mut() {
                                d[j] = 1.0 - t * t;
                            }
                            if y == v0 + j {
                                *td = 1.0 - t * t;
                            }
                        }
                    };
                    let rows = logits.par_chunks_mut(cols);
                    if capped_grad {
                        rows.zip(deriv[..n * cols].par_chunks_mut(cols))
                            .zip(target_deriv.par_iter_mut())
                            .enumerate()
                            .for_each(|(i, ((row, d), td))| cap_row(i, row, Some(d), td));
                    } else {
                        rows.zip(target_deriv.par_iter_mut())
                            .enumerate()
                            .for_each(|(i, (row, td))| cap_row(i, row, None, td));
                    }
                }
                let rows = logits.par_chunks_mut(cols).zip(state.par_iter_mut().zip(target_logit.par_iter_mut()));
                let per_row = |i: usize, row: &mut [f32], state: &mut (f32, f64), target: &mut f32| -> f32 {
                    let y = self.targets[i] as usize;
                    if (v0..v0 + cols).contains(&y) {
                        *target = row[y - v0];
                    }
                    fold_row(state, row, self.keep)
                };
                if self.keep {
                    let deriv = &deriv[..if capped_grad { n * cols } else { 0 }];
                    rows.zip(acc.par_chunks_mut(hidden)).enumerate().for_each(|(i, ((row, (state, target)), acc))| {
                        let rescale = per_row(i, row, state, target);
                        if rescale != 1.0 {
                            acc.iter_mut().for_each(|a| *a *= rescale);
                        }
                        // Capped: exp(z − max) · dz/d(hW) is what multiplies W below.
                        if capped_grad {
                            row.iter_mut().zip(&deriv[i * cols..(i + 1) * cols]).for_each(|(e, &d)| *e *= d);
                        }
                    });
                    // acc += exp(logits − max) · W[v0 .. v0 + cols].
                    // SAFETY: logits now holds the [n, cols] exponentials, ws (W's rows v0 ..
                    // v0 + cols) is [cols, H] (checked by `slice_logits`), acc is [n, H].
                    unsafe {
                        gemm::gemm(
                            n,
                            hidden,
                            cols,
                            acc.as_mut_ptr(),
                            1,
                            hidden as isize,
                            v0 > 0,
                            logits.as_ptr(),
                            1,
                            cols as isize,
                            ws.as_ptr(),
                            1,
                            hidden as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            parallelism(),
                        )
                    }
                } else {
                    rows.enumerate().for_each(|(i, (row, (state, target)))| {
                        per_row(i, row, state, target);
                    });
                }
            }
            // d nll_r / d h_r = softmax_r · W − W[y_r] = acc_r / Σ_r − W[y_r] (capped: each term
            // times the derivative of its capped logit, the target's d_y).
            if self.keep {
                acc.par_chunks_mut(hidden).zip(&state).zip(self.targets.par_iter().zip(&target_deriv)).try_for_each(
                    |((acc, &(_, sum)), (&y, &dy))| -> Result<()> {
                        let mut buf = Vec::new();
                        let wy = w.rows(y as usize, 1, hidden, &mut buf)?;
                        for (a, &wy) in acc.iter_mut().zip(wy) {
                            *a = (*a as f64 / sum - dy as f64 * wy as f64) as f32;
                        }
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })?;
        let lse: Vec<f64> = state.iter().map(|&(max, sum)| max as f64 + sum.ln()).collect();
        let nll = lse.iter().zip(&target_logit).map(|(&l, &t)| (l - t as f64) as f32).collect();
        if self.keep {
            *self.grad_unit.lock().expect("vocabulary NLL lock") = Some(acc);
        }
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !h.track_op() {
            return Ok(None);
        }
        let (n, hidden) = h.dims2()?;
        let g = f32_of(grad, "vocabulary NLL gradient")?;
        let unit = self.grad_unit.lock().expect("vocabulary NLL lock");
        let Some(unit) = unit.as_ref() else { candle_core::bail!("vocabulary NLL backward: the forward kept nothing") };
        if g.len() != n || unit.len() != n * hidden {
            candle_core::bail!("vocabulary NLL backward: shapes changed since the forward");
        }
        // dL/dh_r = g_r · (softmax_r · W − W[y_r]).
        let dh: Vec<f32> = unit.chunks(hidden).zip(&g).flat_map(|(u, &g)| u.iter().map(move |&u| g * u)).collect();
        Ok(Some(Tensor::from_vec(dh, (n, hidden), h.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Var};

    /// NLL and dL/dh for L = Σ c · nll: the fused op and the composed fallback (both f32)
    /// against the same composition in f64 (candle's matmul, log-softmax, gather).
    fn check(n: usize, hidden: usize, vocab: usize, seed: u64, cap: Option<f64>) {
        let h = (rand(&[n, hidden], seed) * 2.0).unwrap();
        let w = rand(&[vocab, hidden], seed + 1);
        let ys: Vec<u32> = (0..n).map(|i| ((i * 7919 + seed as usize) % vocab) as u32).collect();
        let y = Tensor::from_vec(ys, n, &Device::Cpu).unwrap();
        let c = rand(&[n], seed + 2);
        let run = |how: u8| {
            let dt = if how == 2 { DType::F64 } else { DType::F32 };
            let hv = Var::from_tensor(&h.to_dtype(dt).unwrap()).unwrap();
            let w = w.to_dtype(dt).unwrap();
            let nll = match how {
                0 => vocab_nll(hv.as_tensor(), &w, &y, cap).unwrap(),
                1 => vocab_nll_composed(hv.as_tensor(), &w, &y, cap).unwrap(),
                _ => {
                    let mut z = hv.as_tensor().matmul(&w.t().unwrap()).unwrap();
                    if let Some(c) = cap {
                        z = ((z / c).unwrap().tanh().unwrap() * c).unwrap();
                    }
                    let logp = log_softmax_last(&z).unwrap();
                    logp.gather(&y.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap()
                }
            };
            let g = (&nll * c.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            (flat(&nll), flat(g.get(hv.as_tensor()).unwrap()))
        };
        let (sy, sg) = run(2);
        for how in [0, 1] {
            let (fy, fg) = run(how);
            let worst = |a: &[f32], b: &[f32]| {
                let top = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top
            };
            let at = format!("{how} {n}x{hidden}x{vocab} cap {cap:?}");
            assert!(worst(&fy, &sy) < 1e-5, "{at}: NLL differs by {}", worst(&fy, &sy));
            assert!(worst(&fg, &sg) < 1e-5, "{at}: gradient differs by {}", worst(&fg, &sg));
        }
    }

    #[test]
    fn fused_vocab_nll_matches_the_composed_twin_in_value_and_gradient() {
        // Without a cap, and with Gemma's soft cap at a value that bends the logits (|h W| up to
        // ~8 here: a cap of 3 changes most of them).
        for cap in [None, Some(3.0)] {
            check(5, 8, 11, 1, cap);
            check(1, 16, 3, 2, cap);
            // A vocabulary of several slices (4,096 wide for 1,024 rows), the last one partial,
            // with rows whose running max grows in a later slice (the rescaling of the running sum).
            assert_eq!(slice_width(1024), 4096);
            check(1024, 4, 3 * 4096 + 100, 3, cap);
            // One row: a single slice as wide as the vocabulary.
            check(1, 8, 5000, 4, cap);
        }
    }

    #[test]
    fn the_soft_cap_changes_the_nll() {
        let h = (rand(&[4, 8], 5) * 4.0).unwrap();
        let w = rand(&[9, 8], 6);
        let y = Tensor::new(&[1u32, 8, 0, 3], &Device::Cpu).unwrap();
        let plain = vocab_nll(&h, &w, &y, None).unwrap().to_vec1::<f32>().unwrap();
        let capped = vocab_nll(&h, &w, &y, Some(1.0)).unwrap().to_vec1::<f32>().unwrap();
        assert!(plain.iter().zip(&capped).all(|(a, b)| (a - b).abs() > 1e-3), "{plain:?} vs {capped:?}");
    }

    /// NLL and dL/dh (L = Σ c · nll) with the head in `format` blocks: the fused op on the blocks
    /// against the fused op on the dense deq(W) and the composed form on deq(W).
    fn check_blocks(n: usize, hidden: usize, vocab: usize, format: GgmlDType, seed: u64, cap: Option<f64>) {
        let h = (rand(&[n, hidden], seed) * 2.0).unwrap();
        let q = Arc::new(QTensor::quantize(&rand(&[vocab, hidden], seed + 1), format).unwrap());
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let ys: Vec<u32> = (0..n).map(|i| ((i * 7919 + 31 * seed as usize) % vocab) as u32).collect();
        let y = Tensor::from_vec(ys, n, &Device::Cpu).unwrap();
        let c = rand(&[n], seed + 2);
        let run = |how: u8| {
            let hv = Var::from_tensor(&h).unwrap();
            let nll = match how {
                0 => vocab_nll_frozen(hv.as_tensor(), &FrozenWeight::Quantized(q.clone()), &y, cap).unwrap(),
                1 => vocab_nll(hv.as_tensor(), &deq, &y, cap).unwrap(),
                _ => vocab_nll_composed(hv.as_tensor(), &deq, &y, cap).unwrap(),
            };
            let g = (&nll * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&nll), flat(g.get(hv.as_tensor()).unwrap()))
        };
        let (qy, qg) = run(0);
        for how in [1, 2] {
            let (ty, tg) = run(how);
            let worst = |a: &[f32], b: &[f32]| {
                let top = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top
            };
            // The fused op on the dense deq(W) runs the same slices (up to the slice width) and
            // so agrees to f32 rounding; the composed form sums in another order (1e-5, as for
            // the dense op's own twin test above).
            let tol = if how == 1 { 1e-6 } else { 1e-5 };
            let at = format!("{format:?} against {how}, {n}x{hidden}x{vocab} cap {cap:?}");
            assert!(worst(&qy, &ty) < tol, "{at}: NLL differs by {}", worst(&qy, &ty));
            assert!(worst(&qg, &tg) < tol, "{at}: gradient differs by {}", worst(&qg, &tg));
        }
    }

    #[test]
    fn a_quantized_head_gives_the_nll_and_gradient_of_its_dequantization() {
        use GgmlDType::*;
        // Several 4,096-wide slices for 1,024 rows, the last partial, with and without a cap.
        check_blocks(1024, 64, 3 * 4096 + 100, Q8_0, 1, None);
        check_blocks(1024, 256, 2 * 4096 + 7, Q4K, 2, Some(3.0));
        // Few rows of a wide head: slices capped at 1,024 head rows (16 MiB dequantized), so the
        // head is dequantized in three slices instead of at once.
        assert_eq!(HeadRows::Blocks(&QTensor::quantize(&rand(&[8, 32], 0), Q8_0).unwrap()).width(3, 4096), 1024);
        check_blocks(3, 4096, 2600, Q8_0, 3, None);
    }

    #[test]
    fn vocab_nll_off_the_fused_path_is_the_composed_form_bit_for_bit() {
        // A head in another dtype (bf16 on GPUs; f64 here) takes the composed form.
        let h = rand(&[3, 4], 1).to_dtype(DType::F64).unwrap();
        let w = rand(&[7, 4], 2).to_dtype(DType::F64).unwrap();
        let y = Tensor::new(&[1u32, 6, 0], &Device::Cpu).unwrap();
        let a = vocab_nll(&h, &w, &y, None).unwrap().to_vec1::<f32>().unwrap();
        let b = vocab_nll_composed(&h, &w, &y, None).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn vocab_nll_refuses_targets_outside_the_vocabulary() {
        let h = rand(&[2, 4], 1);
        let w = rand(&[5, 4], 2);
        let y = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        let err = vocab_nll(&h, &w, &y, None).unwrap_err().to_string();
        assert!(err.contains("target token 5 outside the vocabulary of 5"), "{err}");
    }
}
