//! Fused CPU forms of layer norm and softmax over the last dimension, each with an explicit
//! backward.
//!
//! Written with candle's primitives (`ops::layer_norm_composed`, `ops::softmax_composed`) these
//! take 8–10 tensor passes forward and more backward, each allocating a fresh tensor; on the CPU,
//! where nothing hides that traffic, one pass per row is much cheaper. They are used only where
//! their backward is complete: on the CPU, in f32, and (for layer norm) with frozen weight and
//! bias, whose gradients they do not compute. Anywhere else `ops` uses the composed forms, which
//! are also the slow twins the tests compare these against. Rows are split across threads
//! (rayon); each row is computed by one thread in a fixed order, so results do not depend on the
//! thread count.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows per parallel task: enough work per task to be worth a thread hand-off.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// out[row] = f(x[row]) for every row of `h` elements, rows split across threads.
pub(crate) fn map_rows(x: &[f32], h: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let rows = rows_per_task(h) * h;
    out.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(out, x)| {
        for (o, x) in out.chunks_mut(h).zip(x.chunks(h)) {
            f(o, x)
        }
    });
    out
}

/// out[row] = f(x[row], g[row]) for every row of `h` elements, rows split across threads.
pub(crate) fn map_row_pairs(x: &[f32], g: &[f32], h: usize, f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let rows = rows_per_task(h) * h;
    out.par_chunks_mut(rows).zip(x.par_chunks(rows).zip(g.par_chunks(rows))).for_each(|(out, (x, g))| {
        for ((o, x), g) in out.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
            f(o, x, g)
        }
    });
    out
}

/// The f32 data of a contiguous CPU tensor; an error naming `op` for anything else.
pub(crate) fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => candle_core::bail!("{op}: input must be contiguous"),
        },
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// The f32 data of a CPU tensor (made contiguous), for `f` inside a fused op's backward; an error
/// naming `what` for a tensor on another device or in another dtype.
pub(crate) fn tensor_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(s) => f(f32_contiguous(s, l, what)?),
        _ => candle_core::bail!("{what}: this fused op runs on the CPU only"),
    }
}

/// The f32 data of two contiguous CPU tensors of the same shape (an input and its gradient).
pub(crate) fn f32_pair<'a>(
    a: (&'a CpuStorage, &Layout),
    b: (&'a CpuStorage, &Layout),
    op: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    if a.1.dims() != b.1.dims() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", a.1.dims(), b.1.dims());
    }
    Ok((f32_contiguous(a.0, a.1, op)?, f32_contiguous(b.0, b.1, op)?))
}

fn last_dim(l: &Layout, op: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("{op}: needs a non-empty last dimension, got shape {:?}", l.dims()),
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Mean and 1/√(variance + eps) of one row, accumulated in f64 (two passes: exact centring).
fn row_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// y = (x − mean) / √(var + eps) · weight + bias over the last dimension; weight and bias frozen.
pub struct FrozenLayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f64,
}

impl FrozenLayerNorm {
    pub fn new(weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self { weight: host_f32(weight)?, bias: host_f32(bias)?, eps })
    }
}

impl CustomOp1 for FrozenLayerNorm {
    fn name(&self) -> &'static str {
        "dptrain-layer-norm-frozen"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "layer norm")?;
        let h = last_dim(l, "layer norm")?;
        if self.weight.len() != h || self.bias.len() != h {
            candle_core::bail!("layer norm: weight/bias of {} for rows of {h}", self.weight.len());
        }
        let y = map_rows(x, h, |y, x| {
            let (mean, rstd) = row_stats(x, self.eps);
            for (((o, &v), &w), &b) in y.iter_mut().zip(x).zip(&self.weight).zip(&self.bias) {
                *o = ((v as f64 - mean) * rstd * w as f64 + b as f64) as f32;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = LayerNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(arg.contiguous()?.apply_op2(&grad_res.contiguous()?, grad)?))
    }
}

/// dL/dx of [`FrozenLayerNorm`]: with x̂ = (x − mean)·r and d = g·weight,
/// dx = r · (d − mean(d) − x̂ · mean(d · x̂)).
struct LayerNormGrad {
    weight: Vec<f32>,
    eps: f64,
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "dptrain-layer-norm-frozen-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair((s1, l1), (s2, l2), "layer norm grad")?;
        let h = last_dim(l1, "layer norm grad")?;
        let dx = map_row_pairs(x, g, h, |dx, x, g| {
            let (mean, rstd) = row_stats(x, self.eps);
            let (mut sum_d, mut sum_dx) = (0f64, 0f64);
            for ((&v, &g), &w) in x.iter().zip(g).zip(&self.weight) {
                let d = g as f64 * w as f64;
                sum_d += d;
                sum_dx += d * (v as f64 - mean) * rstd;
            }
            let (mean_d, mean_dx) = (sum_d / h as f64, sum_dx / h as f64);
            for (((o, &v), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(&self.weight) {
                let xhat = (v as f64 - mean) * rstd;
                *o = (rstd * (g as f64 * w as f64 - mean_d - xhat * mean_dx)) as f32;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// exp(x − max) / Σ exp(x − max) over the last dimension.
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dptrain-softmax-last"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "softmax")?;
        let h = last_dim(l, "softmax")?;
        let y = map_rows(x, h, |y, x| {
            // As candle's max: NaN never wins, so a NaN input makes its row NaN below.
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let mut sum = 0f64;
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o as f64;
            }
            let inv = (1.0 / sum) as f32;
            y.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2(&grad_res.contiguous()?, SoftmaxGrad)?))
    }
}

/// dL/dx of [`Softmax`] from its output y: dx = y · (g − Σ g·y).
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "dptrain-softmax-last-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = f32_pair((s1, l1), (s2, l2), "softmax grad")?;
        let h = last_dim(l1, "softmax grad")?;
        let dx = map_row_pairs(y, g, h, |dx, y, g| {
            let dot = y.iter().zip(g).map(|(&y, &g)| y as f64 * g as f64).sum::<f64>() as f32;
            for ((o, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::{layer_norm, layer_norm_composed, softmax_composed, softmax_last};
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand_chacha::ChaCha20Rng, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    /// Largest |a − b| / (|b| + floor) over the elements.
    fn worst(a: &[f32], b: &[f32], floor: f32) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(a, b)| (a - b).abs() / (b.abs() + floor)).fold(0.0, f32::max)
    }

    /// Output and dL/dx for L = Σ c · f(x), c random: value and gradient of the op together,
    /// computed in `dtype` (the slow twins run in f64, so that they are the accurate side).
    fn value_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, c: &Tensor, dtype: DType) -> (Vec<f32>, Vec<f32>) {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let y = f(xv.as_tensor());
        let g = (&y * c.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        (flat(&y), flat(g.get(xv.as_tensor()).expect("gradient reaches x")))
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_twin_in_value_and_gradient() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for (shape, scale) in [
            (vec![1usize, 1], 1.0f32),
            (vec![3, 5], 2.0),
            (vec![2, 7, 384], 4.0),
            (vec![45, 129], 0.01),
            (vec![97, 64], 50.0),
        ] {
            let h = *shape.last().unwrap();
            let w = (random(&mut rng, &[h], 1.0) + 1.0).unwrap();
            let b = random(&mut rng, &[h], 0.5);
            // A per-row offset, so that the centring is exercised too.
            let x = (random(&mut rng, &shape, scale) + 3.0 * scale as f64).unwrap();
            let c = random(&mut rng, &shape, 1.0);
            let fused = value_and_grad(&|x| layer_norm(x, &w, &b, 1e-12).unwrap(), &x, &c, DType::F32);
            let (w64, b64) = (w.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
            let slow = value_and_grad(&|x| layer_norm_composed(x, &w64, &b64, 1e-12).unwrap(), &x, &c, DType::F64);
            assert!(worst(&fused.0, &slow.0, 1e-3) < 2e-5, "{shape:?}: value {}", worst(&fused.0, &slow.0, 1e-3));
            if h > 1 {
                // Gradients scale with 1/std: compare relative to their largest element.
                let top = slow.1.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = fused.1.iter().zip(&slow.1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top;
                assert!(err < 1e-4, "{shape:?}: gradient {err}");
            }
        }
    }

    #[test]
    fn layer_norm_with_trainable_weight_keeps_the_weight_gradient() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let x = random(&mut rng, &[4, 6], 1.0);
        let w = Var::from_tensor(&random(&mut rng, &[6], 1.0)).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[6], 1.0)).unwrap();
        let y = layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gw = flat(g.get(w.as_tensor()).expect("the weight gradient is not cut"));
        let y2 = layer_norm_composed(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(gw, flat(g2.get(w.as_tensor()).unwrap()));
    }

    #[test]
    fn fused_softmax_matches_the_composed_twin_with_masked_keys() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        for (shape, scale) in
            [(vec![1usize], 1.0f32), (vec![2, 3, 1], 3.0), (vec![4, 12, 9, 64], 8.0), (vec![33, 17], 30.0)]
        {
            let t = *shape.last().unwrap();
            let x = random(&mut rng, &shape, scale);
            // Mask the last third of the keys as the attention does (additive −1e30).
            let keep: Vec<f32> = (0..t).map(|j| if j < t.div_ceil(3) * 2 { 0.0 } else { -1e30 }).collect();
            let x = x.broadcast_add(&Tensor::from_vec(keep, t, &Device::Cpu).unwrap()).unwrap();
            let c = random(&mut rng, &shape, 1.0);
            let fused = value_and_grad(&|x| softmax_last(x).unwrap(), &x, &c, DType::F32);
            let slow = value_and_grad(&|x| softmax_composed(x).unwrap(), &x, &c, DType::F64);
            assert!(worst(&fused.0, &slow.0, 1e-6) < 1e-5, "{shape:?}: value {}", worst(&fused.0, &slow.0, 1e-6));
            let top = slow.1.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = fused.1.iter().zip(&slow.1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top.max(1e-30);
            assert!(err < 1e-5, "{shape:?}: gradient {err}");
            let masked = fused.0.iter().enumerate().filter(|(i, _)| i % t >= t.div_ceil(3) * 2);
            assert!(masked.clone().all(|(_, &p)| p == 0.0), "masked keys get exactly 0");
        }
    }

    #[test]
    fn fused_ops_propagate_nan_to_the_row() {
        let x = Tensor::new(&[[0.5f32, f32::NAN, 1.0], [0.1, 0.2, 0.3]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 1.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0f32, 0.0, 0.0], &Device::Cpu).unwrap();
        for y in [softmax_last(&x).unwrap(), layer_norm(&x, &w, &b, 1e-5).unwrap()] {
            let rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
            assert!(rows[0].iter().all(|v| v.is_nan()), "{rows:?}");
            assert!(rows[1].iter().all(|v| v.is_finite()), "{rows:?}");
        }
    }
}
