//! Scaled dot-product attention over heads, as one fused CPU op with an explicit backward.
//!
//! Composed from candle ops (`attention_composed`, the slow twin and the form used off the CPU),
//! attention costs three head-split copies, two batched products that candle runs as one small
//! GEMM after another (each handing work to the thread pool and back), two passes for the scale
//! and the mask, the softmax and a copy back to [b, T, H]; its backward another dozen passes. The
//! fused op reads Q, K and V where the projections wrote them ([b, T, heads · d]), computes each
//! (example, head) pair as one task on one thread — scores, bias, softmax and weighted sum,
//! keeping the probabilities for the backward — and writes the context straight into [b, T, H].
//! Its backward computes dQ, dK and dV the same way (only those whose inputs are tracked), one
//! task per (example, key/value head), so that heads sharing a key/value head (grouped-query
//! attention) add into it without races. Each task runs in a fixed order on one thread, so
//! results do not depend on the thread count; no task reads another example's rows, so the op
//! mixes no examples (per-example gradients stay per example).

use super::fused::tensor_f32;
use super::ops::{add_const, softmax_last};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The heads of one attention call: `query` query heads of width `dim`, reading `kv` key/value
/// heads (query head h reads key/value head h / (query / kv)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    fn check(&self) -> Result<()> {
        if self.query == 0 || self.kv == 0 || self.dim == 0 || !self.query.is_multiple_of(self.kv) {
            candle_core::bail!("attention: {} query heads cannot share {} key/value heads", self.query, self.kv);
        }
        Ok(())
    }
}

/// softmax(scale · Q Kᵀ + bias) V for every example and head.
///
/// `q` [b, T, query·dim] and `k`, `v` [b, T, kv·dim] are the projections' outputs as they come
/// (head h is columns h·dim..(h+1)·dim); `bias` is a constant additive mask broadcast to
/// [b, heads, T, T] from [b or 1, 1, T or 1, T] (−1e30 where a query may not read a key: exp → 0).
/// Returns the context [b, T, query·dim]. Fused on the CPU in f32 (`FusedAttention`), composed of
/// candle ops elsewhere (`attention_composed`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, heads: Heads, scale: f64) -> Result<Tensor> {
    attention_capped(q, k, v, bias, heads, scale, None)
}

/// `attention` with optional soft-capping of the scores (Gemma 2):
/// softmax(c · tanh(scale · Q Kᵀ / c) + bias) V, the cap applied before the mask as transformers
/// does. Fused on the CPU in f32, composed elsewhere (`attention_composed_capped`).
pub fn attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: Heads,
    scale: f64,
    cap: Option<f64>,
) -> Result<Tensor> {
    heads.check()?;
    let fusable = q.device().is_cpu()
        && [q, k, v, bias].iter().all(|t| t.dtype() == DType::F32)
        && !bias.track_op()
        && bias.rank() == 4;
    if !fusable {
        return attention_composed_capped(q, k, v, bias, heads, scale, cap);
    }
    let (b, t, _) = q.dims3()?;
    let (bb, bh, bt, bk) = bias.dims4()?;
    if !(bb == b || bb == 1) || bh != 1 || !(bt == t || bt == 1) || bk != t {
        candle_core::bail!("attention: bias of shape {:?} for {b} examples of {t} tokens", bias.dims());
    }
    let op = FusedAttention {
        heads,
        scale: scale as f32,
        cap: cap.map(|c| c as f32),
        bias: bias.flatten_all()?.to_vec1::<f32>()?,
        bias_dims: (bb, bt),
        probs: Mutex::new(None),
        keep: q.track_op() || k.track_op() || v.track_op(),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention from candle's differentiable ops: split heads, repeat shared key/value
/// heads, batched products, softmax (`ops::softmax_last`), merge heads. The slow twin of
/// `FusedAttention`, and the form used on GPUs and in other dtypes.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: Heads,
    scale: f64,
) -> Result<Tensor> {
    attention_composed_capped(q, k, v, bias, heads, scale, None)
}

/// `attention_composed` with optional soft-capping of the scores (Gemma 2), composed of candle's
/// differentiable ops: the slow twin of the fused op with a cap, and the form off the CPU.
pub fn attention_composed_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: Heads,
    scale: f64,
    cap: Option<f64>,
) -> Result<Tensor> {
    heads.check()?;
    let (b, t, _) = q.dims3()?;
    let split =
        |y: &Tensor, n: usize| -> Result<Tensor> { y.reshape((b, t, n, heads.dim))?.transpose(1, 2)?.contiguous() };
    let group = heads.query / heads.kv;
    let q = split(q, heads.query)?;
    let (k, v) = (repeat_kv(&split(k, heads.kv)?, group)?, repeat_kv(&split(v, heads.kv)?, group)?);
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(c) = cap {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    let scores = add_const(&scores, bias)?;
    softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads.query * heads.dim))
}

/// [b, kv, T, d] → [b, kv · n, T, d]: query head j reads key/value head j / n.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n, t, d))?.contiguous()?.reshape((b, kv * n, t, d))
}

/// The fused CPU attention; see the module documentation.
struct FusedAttention {
    heads: Heads,
    scale: f32,
    /// Soft cap c of the scores: c · tanh(s / c) (Gemma 2), before the bias.
    cap: Option<f32>,
    /// The bias on the host, [bb, 1, bt, T] row-major.
    bias: Vec<f32>,
    /// (bb, bt): 1 where the bias is broadcast over examples / query positions.
    bias_dims: (usize, usize),
    /// The probabilities [b, query heads, T, T], kept by the forward for the backward.
    probs: Mutex<Option<Vec<f32>>>,
    /// Whether any input is tracked (else nothing is kept).
    keep: bool,
}

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes only its own (example, head) block (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `SharedMut`, not its field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Strides (elements) of an operand or destination of `small_gemm`.
#[derive(Clone, Copy)]
struct Mat {
    row: isize,
    col: isize,
}

/// Row-major with `row` elements between rows.
#[allow(non_snake_case)]
fn ROWS(row: usize) -> Mat {
    Mat { row: row as isize, col: 1 }
}

/// Column-major with `col` elements between columns (a row-major matrix read transposed).
#[allow(non_snake_case)]
fn COLS(col: usize) -> Mat {
    Mat { row: 1, col: col as isize }
}

/// dst [m, n] (= dst when `accumulate`, else 0) + beta · lhs [m, k] · rhs [k, n], on this thread.
///
/// # Safety
/// Every pointer with its strides must address valid f32s for the given extents, and `dst` must
/// not be written by any other thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    d: Mat,
    accumulate: bool,
    lhs: *const f32,
    l: Mat,
    rhs: *const f32,
    r: Mat,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        d.col,
        d.row,
        accumulate,
        lhs,
        l.col,
        l.row,
        rhs,
        r.col,
        r.row,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    super::fused::f32_contiguous(s, l, what)
}

impl FusedAttention {
    /// (b, T) and the row widths of q and k/v, checked against the op's heads.
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, t, qw) = lq.shape().dims3()?;
        let kw = self.heads.kv * self.heads.dim;
        if qw != self.heads.query * self.heads.dim || lk.dims() != [b, t, kw] || lv.dims() != [b, t, kw] {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.heads
            );
        }
        if self.bias_dims.0 != 1 && self.bias_dims.0 != b {
            candle_core::bail!("attention: bias for {} examples, batch of {b}", self.bias_dims.0);
        }
        Ok((b, t, qw, kw))
    }

    /// Bias row of example `i`, query position `r` ([T]).
    fn bias_row(&self, i: usize, r: usize, t: usize) -> &[f32] {
        let (bb, bt) = self.bias_dims;
        let start = ((if bb == 1 { 0 } else { i }) * bt + if bt == 1 { 0 } else { r }) * t;
        &self.bias[start..start + t]
    }
}

/// s ↦ c · tanh(s / c) in place, as the composed form computes it (f32 `tanh`, candle's).
fn soft_cap(s: &mut [f32], c: f32) {
    s.iter_mut().for_each(|x| *x = (*x / c).tanh() * c);
}

/// Row-wise softmax of `s` [T, T] in place after adding the bias rows (f32 exponentials of
/// x − max from `vexp`, summed in f64; NaN never wins the max, so it spreads to its row).
fn biased_softmax_rows(s: &mut [f32], t: usize, bias: impl Fn(usize) -> *const f32) {
    for (r, row) in s.chunks_mut(t).enumerate() {
        // SAFETY: `bias(r)` addresses T valid values (FusedAttention::bias_row).
        let b = unsafe { std::slice::from_raw_parts(bias(r), t) };
        row.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let sum = super::vexp::exp_shifted_sum(row, max, true);
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "dptrain-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, qw, kw) = self.dims(lq, lk, lv)?;
        let (q, k, v) =
            (cpu_f32(sq, lq, "attention q")?, cpu_f32(sk, lk, "attention k")?, cpu_f32(sv, lv, "attention v")?);
        let Heads { query: nh, kv: nkv, dim: d } = self.heads;
        let group = nh / nkv;
        let mut probs = vec![0f32; b * nh * t * t];
        let mut ctx = vec![0f32; b * t * qw];
        let out = SharedMut(ctx.as_mut_ptr());
        probs.par_chunks_mut(t * t).enumerate().for_each(|(task, p)| {
            let (i, h) = (task / nh, task % nh);
            let g = h / group;
            // SAFETY: q, k, v are [b, T, width] slices; head h of example i is the T rows of
            // `width` stride starting at column h·d. Each task writes only its own `p` and the
            // context block (example i, head h), which no other task touches.
            unsafe {
                let qh = q.as_ptr().add(i * t * qw + h * d);
                let kh = k.as_ptr().add(i * t * kw + g * d);
                let vh = v.as_ptr().add(i * t * kw + g * d);
                // S = scale · Q Kᵀ (Kᵀ read in place: column j of Kᵀ is row j of K).
                small_gemm((t, t, d), p.as_mut_ptr(), ROWS(t), false, qh, ROWS(qw), kh, COLS(kw), self.scale);
                if let Some(c) = self.cap {
                    soft_cap(p, c);
                }
                biased_softmax_rows(p, t, |r| self.bias_row(i, r, t).as_ptr());
                // context block = P V.
                let dst = out.at(i * t * qw + h * d);
                small_gemm((t, d, t), dst, ROWS(qw), false, p.as_ptr(), ROWS(t), vh, ROWS(kw), 1.0);
            }
        });
        if self.keep {
            *self.probs.lock().expect("attention probabilities lock") = Some(probs);
        }
        Ok((CpuStorage::F32(ctx), Shape::from((b, t, qw))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _ctx: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_q, want_k, want_v) = (q.track_op(), k.track_op(), v.track_op());
        if !(want_q || want_k || want_v) {
            return Ok((None, None, None));
        }
        let (b, t, qw) = q.dims3()?;
        let kw = self.heads.kv * self.heads.dim;
        let Heads { query: nh, kv: nkv, dim: d } = self.heads;
        let group = nh / nkv;
        let probs = self.probs.lock().expect("attention probabilities lock");
        let Some(probs) = probs.as_ref() else {
            candle_core::bail!("attention backward: the forward kept no probabilities")
        };
        let mut dq = vec![0f32; if want_q { b * t * qw } else { 0 }];
        let mut dk = vec![0f32; if want_k { b * t * kw } else { 0 }];
        let mut dv = vec![0f32; if want_v { b * t * kw } else { 0 }];
        let (dq_p, dk_p, dv_p) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let run = |qs: &[f32], ks: &[f32], vs: &[f32], gs: &[f32]| {
            (0..b * nkv).into_par_iter().for_each_init(
                // dS, and with a cap the raw scores (recomputed: cheaper than keeping them).
                || (vec![0f32; t * t], vec![0f32; if self.cap.is_some() { t * t } else { 0 }]),
                |(ds, raw), task| {
                    let (i, g) = (task / nkv, task % nkv);
                    // SAFETY: as in the forward; this task writes only example i's rows of the
                    // query heads of group g (dq) and of key/value head g (dk, dv), which no other
                    // task writes; it reads q, k, v, the gradient and the kept probabilities.
                    unsafe {
                        let kh = ks.as_ptr().add(i * t * kw + g * d);
                        let vh = vs.as_ptr().add(i * t * kw + g * d);
                        for (n, h) in (g * group..(g + 1) * group).enumerate() {
                            let p = probs.as_ptr().add((i * nh + h) * t * t);
                            let gh = gs.as_ptr().add(i * t * qw + h * d);
                            let qh = qs.as_ptr().add(i * t * qw + h * d);
                            if want_v {
                                // dV_g += Pᵀ G_h.
                                let dst = dv_p.at(i * t * kw + g * d);
                                small_gemm((t, d, t), dst, ROWS(kw), n > 0, p, COLS(t), gh, ROWS(qw), 1.0);
                            }
                            if !(want_q || want_k) {
                                continue;
                            }
                            // dP = G_h Vᵀ, then dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place;
                            // with a cap also ⊙ (1 − tanh²(S / c)), S the forward's raw scores.
                            small_gemm((t, t, d), ds.as_mut_ptr(), ROWS(t), false, gh, ROWS(qw), vh, COLS(kw), 1.0);
                            if self.cap.is_some() {
                                let raw = raw.as_mut_ptr();
                                small_gemm((t, t, d), raw, ROWS(t), false, qh, ROWS(qw), kh, COLS(kw), self.scale);
                            }
                            let p = std::slice::from_raw_parts(p, t * t);
                            for (r, (row, prow)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                                let dot = row.iter().zip(prow).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32;
                                match self.cap {
                                    None => {
                                        row.iter_mut().zip(prow).for_each(|(x, &y)| *x = y * (*x - dot) * self.scale)
                                    }
                                    Some(c) => row.iter_mut().zip(prow).zip(&raw[r * t..(r + 1) * t]).for_each(
                                        |((x, &y), &s)| {
                                            let th = (s / c).tanh();
                                            *x = y * (*x - dot) * (1.0 - th * th) * self.scale
                                        },
                                    ),
                                }
                            }
                            if want_q {
                                // dQ_h = dS K.
                                let dst = dq_p.at(i * t * qw + h * d);
                                small_gemm((t, d, t), dst, ROWS(qw), false, ds.as_ptr(), ROWS(t), kh, ROWS(kw), 1.0);
                            }
                            if want_k {
                                // dK_g += dSᵀ Q_h.
                                let dst = dk_p.at(i * t * kw + g * d);
                                small_gemm((t, d, t), dst, ROWS(kw), n > 0, ds.as_ptr(), COLS(t), qh, ROWS(qw), 1.0);
                            }
                        }
                    }
                },
            )
        };
        tensor_f32(q, "attention q", |qs| {
            tensor_f32(k, "attention k", |ks| {
                tensor_f32(v, "attention v", |vs| {
                    tensor_f32(grad, "attention gradient", |gs| {
                        let (nq, nkv) = (b * t * qw, b * t * kw);
                        if (qs.len(), ks.len(), vs.len(), gs.len()) != (nq, nkv, nkv, nq) {
                            candle_core::bail!("attention backward: shapes changed since the forward");
                        }
                        run(qs, ks, vs, gs);
                        Ok(())
                    })
                })
            })
        })?;
        let dev = q.device();
        let wrap = |x: Vec<f32>, w: usize, want: bool| -> Result<Option<Tensor>> {
            if want {
                Ok(Some(Tensor::from_vec(x, (b, t, w), dev)?))
            } else {
                Ok(None)
            }
        };
        Ok((wrap(dq, qw, want_q)?, wrap(dk, kw, want_k)?, wrap(dv, kw, want_v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{Device, Var};

    /// Values of the fused op and the composed twin (in f64) and the gradients of
    /// L = Σ c · attention(q, k, v) for each input, compared relative to the largest element.
    fn check(b: usize, t: usize, heads: Heads, bias: &Tensor, track: [bool; 3], seed: u64) {
        check_capped(b, t, heads, bias, track, seed, None)
    }

    /// `check` with a soft cap on the scores.
    fn check_capped(b: usize, t: usize, heads: Heads, bias: &Tensor, track: [bool; 3], seed: u64, cap: Option<f64>) {
        let (qw, kw) = (heads.query * heads.dim, heads.kv * heads.dim);
        let inputs = [rand(&[b, t, qw], seed), rand(&[b, t, kw], seed + 1), rand(&[b, t, kw], seed + 2)];
        // Scale the queries up so that the softmax is far from uniform.
        let inputs = [(&inputs[0] * 3.0).unwrap(), inputs[1].clone(), inputs[2].clone()];
        let c = rand(&[b, t, qw], seed + 3);
        let scale = 1.0 / (heads.dim as f64).sqrt();
        let run = |fused: bool| -> (Vec<f32>, Vec<Option<Vec<f32>>>) {
            let dtype = if fused { DType::F32 } else { DType::F64 };
            let vars: Vec<Var> =
                inputs.iter().map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()).collect();
            let ts: Vec<Tensor> = vars
                .iter()
                .zip(&inputs)
                .zip(track)
                .map(|((v, x), tr)| if tr { v.as_tensor().clone() } else { x.to_dtype(dtype).unwrap() })
                .collect();
            let bias = bias.to_dtype(dtype).unwrap();
            let y = if fused {
                attention_capped(&ts[0], &ts[1], &ts[2], &bias, heads, scale, cap).unwrap()
            } else {
                attention_composed_capped(&ts[0], &ts[1], &ts[2], &bias, heads, scale, cap).unwrap()
            };
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let grads = (&y * c.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let g = vars.iter().map(|v| grads.get(v.as_tensor()).map(flat)).collect();
            (flat(&y), g)
        };
        let (fy, fg) = run(true);
        let (sy, sg) = run(false);
        let worst = |a: &[f32], b: &[f32]| {
            let top = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top
        };
        assert!(worst(&fy, &sy) < 1e-5, "value differs by {}", worst(&fy, &sy));
        for (n, ((f, s), tr)) in fg.iter().zip(&sg).zip(track).enumerate() {
            match (f, s) {
                (Some(f), Some(s)) => assert!(worst(f, s) < 1e-5, "gradient {n} differs by {}", worst(f, s)),
                (None, None) => assert!(!tr, "gradient {n} of a tracked input is missing"),
                _ => panic!("gradient {n}: fused {} vs composed {}", f.is_some(), s.is_some()),
            }
        }
    }

    /// BERT's key mask [b, 1, 1, T]: the last `pad[i]` keys of example i masked.
    fn key_mask(b: usize, t: usize, pad: &[usize]) -> Tensor {
        let v: Vec<f32> = (0..b * t).map(|x| if x % t >= t - pad[x / t] { -1e30 } else { 0.0 }).collect();
        Tensor::from_vec(v, (b, 1, 1, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composed_twin_with_a_key_mask() {
        let heads = Heads { query: 4, kv: 4, dim: 8 };
        check(3, 9, heads, &key_mask(3, 9, &[0, 4, 8]), [true; 3], 10);
        // Untracked inputs get no gradient (the lowest adapted layer with LoRA on q and v only).
        check(2, 5, heads, &key_mask(2, 5, &[1, 0]), [true, false, true], 20);
        check(2, 5, heads, &key_mask(2, 5, &[0, 2]), [false, true, false], 30);
    }

    #[test]
    fn fused_attention_matches_the_composed_twin_causal_with_shared_kv_heads() {
        // Llama's bias [b, 1, T, T]: causal plus a key mask, with query heads sharing kv heads.
        let (b, t) = (2, 7);
        let v: Vec<f32> = (0..b * t * t)
            .map(|x| {
                let (i, r, j) = (x / (t * t), (x / t) % t, x % t);
                if j > r || (i == 1 && j >= 5) {
                    -1e30
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(v, (b, 1, t, t), &Device::Cpu).unwrap();
        check(b, t, Heads { query: 6, kv: 2, dim: 4 }, &bias, [true; 3], 40);
        check(b, t, Heads { query: 3, kv: 1, dim: 16 }, &bias, [true, true, false], 50);
        // A bias shared by all examples ([1, 1, T, T]).
        check(b, t, Heads { query: 2, kv: 2, dim: 4 }, &bias.narrow(0, 0, 1).unwrap(), [true; 3], 60);
    }

    #[test]
    fn fused_attention_with_a_soft_cap_matches_the_composed_twin() {
        // Caps that bend the scores (the queries are scaled ×3: scores reach several units), with
        // a key mask, a causal mask with shared key/value heads, and an untracked input.
        let heads = Heads { query: 4, kv: 4, dim: 8 };
        for cap in [0.7, 1.5, 50.0] {
            check_capped(3, 9, heads, &key_mask(3, 9, &[0, 4, 8]), [true; 3], 70, Some(cap));
            check_capped(2, 5, heads, &key_mask(2, 5, &[1, 0]), [true, false, true], 80, Some(cap));
        }
        let (b, t) = (2, 6);
        let v: Vec<f32> = (0..b * t * t).map(|x| if x % t > (x / t) % t { -1e30 } else { 0.0 }).collect();
        let causal = Tensor::from_vec(v, (b, 1, t, t), &Device::Cpu).unwrap();
        check_capped(b, t, Heads { query: 6, kv: 2, dim: 4 }, &causal, [true; 3], 90, Some(1.0));
        // The cap is applied: a bending cap changes the output.
        let (q, kv) = ((rand(&[1, 5, 8], 1) * 3.0).unwrap(), rand(&[1, 5, 8], 2));
        let bias = key_mask(1, 5, &[0]);
        let h = Heads { query: 2, kv: 2, dim: 4 };
        let plain = attention(&q, &kv, &kv, &bias, h, 1.0).unwrap();
        let capped = attention_capped(&q, &kv, &kv, &bias, h, 1.0, Some(0.5)).unwrap();
        let d = (plain - capped).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 1e-2, "{d}");
    }

    #[test]
    fn fused_attention_mixes_no_examples() {
        // Changing example 1's inputs changes nothing of example 0's output or gradients.
        let heads = Heads { query: 2, kv: 1, dim: 4 };
        let bias = key_mask(2, 6, &[0, 2]);
        let grads = |seed: u64| {
            let mk = |s: u64, w: usize| {
                let a = rand(&[1, 6, w], 1 + s);
                let other = rand(&[1, 6, w], seed + s);
                Var::from_tensor(&Tensor::cat(&[&a, &other], 0).unwrap()).unwrap()
            };
            let (q, k, v) = (mk(0, 8), mk(10, 4), mk(20, 4));
            let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads, 0.5).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut out = first(&y);
            for x in [&q, &k, &v] {
                out.extend(first(g.get(x.as_tensor()).unwrap()));
            }
            out
        };
        assert_eq!(grads(100), grads(200));
    }

    #[test]
    fn attention_off_the_fused_path_is_the_composed_form_bit_for_bit() {
        // Other dtypes (and every GPU tensor, by the same test in `attention`) take the
        // composed form: f64 here, the dtype the twins are checked in.
        let heads = Heads { query: 4, kv: 2, dim: 3 };
        let q = rand(&[2, 5, 12], 1).to_dtype(DType::F64).unwrap();
        let kv = rand(&[2, 5, 6], 2).to_dtype(DType::F64).unwrap();
        let bias = key_mask(2, 5, &[0, 1]).to_dtype(DType::F64).unwrap();
        let a = attention(&q, &kv, &kv, &bias, heads, 0.5).unwrap();
        let b = attention_composed(&q, &kv, &kv, &bias, heads, 0.5).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(flat(&a), flat(&b));
    }

    #[test]
    fn attention_refuses_heads_that_do_not_fit() {
        let x = rand(&[1, 2, 6], 1);
        let bias = key_mask(1, 2, &[0]);
        let err = attention(&x, &x, &x, &bias, Heads { query: 3, kv: 2, dim: 2 }, 1.0).unwrap_err();
        assert!(err.to_string().contains("3 query heads cannot share 2"), "{err}");
        let err = attention(&x, &x, &x, &bias, Heads { query: 2, kv: 2, dim: 2 }, 1.0).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}
