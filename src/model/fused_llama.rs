//! Fused CPU forms of the Llama block's elementwise chains, each with an explicit backward:
//! RMSNorm with a frozen weight, rotate-half RoPE, and the SwiGLU product silu(gate) · up.
//!
//! Composed of candle ops (`*_composed`, the slow twins and the forms used off the CPU or with
//! a trainable weight) these are 6 (RMSNorm), 6 (RoPE) and 2 (SwiGLU) passes forward, each a fresh
//! tensor and a hand-off to the thread pool and back, and more in the backward; over 30 layers
//! of SmolLM2 they cost more than the attention. Here each is one pass per row (or element) with
//! rows split across threads; each row is computed by one thread in a fixed order, so results do
//! not depend on the thread count, and no row reads another example's values.

use super::fused::{f32_contiguous, f32_pair, map_row_pairs, map_rows};
use super::ops::mul_const;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per parallel task: enough work per task to be worth a thread hand-off.
const TASK: usize = 16_384;

fn f32_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Whole rows of `row` elements per task.
fn task_len(row: usize) -> usize {
    (TASK / row.max(1)).max(1) * row
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// x / √(mean(x²) + eps) · w over the last dimension: fused on the CPU when w is a frozen f32
/// weight (`FrozenRmsNorm`), composed otherwise (`rms_norm_composed`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if f32_cpu(x) && f32_cpu(w) && !w.track_op() && x.rank() > 0 && x.dim(D::Minus1)? == w.elem_count() {
        return x.contiguous()?.apply_op1(FrozenRmsNorm { w: host(w)?, eps });
    }
    rms_norm_composed(x, w, eps)
}

/// RMSNorm from candle's differentiable ops: the slow twin of `FrozenRmsNorm`.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    mul_const(&x.broadcast_div(&(ms + eps)?.sqrt()?)?, w)
}

struct FrozenRmsNorm {
    w: Vec<f32>,
    eps: f64,
}

/// 1 / √(mean(x²) + eps) of one row, accumulated in f64.
fn rms_scale(x: &[f32], eps: f64) -> f64 {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp1 for FrozenRmsNorm {
    fn name(&self) -> &'static str {
        "dptrain-rms-norm-frozen"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "rms norm")?;
        let y = map_rows(x, self.w.len(), |y, x| {
            let r = rms_scale(x, self.eps);
            for ((o, &v), &w) in y.iter_mut().zip(x).zip(&self.w) {
                *o = (v as f64 * r * w as f64) as f32;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let op = RmsNormGrad { w: self.w.clone(), eps: self.eps };
        Ok(Some(x.contiguous()?.apply_op2(&grad.contiguous()?, op)?))
    }
}

/// dL/dx of `FrozenRmsNorm`: with x̂ = x·r and d = g·w, dx = r · (d − x̂ · mean(d · x̂)).
struct RmsNormGrad {
    w: Vec<f32>,
    eps: f64,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "dptrain-rms-norm-frozen-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair((s1, l1), (s2, l2), "rms norm grad")?;
        let h = self.w.len();
        let dx = map_row_pairs(x, g, h, |dx, x, g| {
            let r = rms_scale(x, self.eps);
            let mean_dx =
                x.iter().zip(g).zip(&self.w).map(|((&v, &g), &w)| g as f64 * w as f64 * v as f64 * r).sum::<f64>()
                    / h as f64;
            for (((o, &v), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(&self.w) {
                *o = (r * (g as f64 * w as f64 - v as f64 * r * mean_dx)) as f32;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE on x [b, T, heads, d] with tables cos, sin [T, d]:
/// x · cos + rotate_half(x) · sin, rotate_half(x) = (−x₂, x₁) on the two halves of d. Fused on
/// the CPU (`Rope`), composed elsewhere (`rope_composed`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, heads, d) = x.dims4()?;
    if cos.dims() != [t, d] || sin.dims() != [t, d] || d % 2 != 0 {
        candle_core::bail!("rope: tables {:?}, {:?} for x {:?} (even d)", cos.dims(), sin.dims(), x.dims());
    }
    if f32_cpu(x) && f32_cpu(cos) && f32_cpu(sin) {
        return x.contiguous()?.apply_op1(Rope { cos: host(cos)?, sin: host(sin)?, t, heads, d });
    }
    rope_composed(x, cos, sin)
}

/// RoPE on [b, T, heads, d] from candle's differentiable ops: the slow twin of `Rope`.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    let (cos, sin) = (cos.reshape((t, 1, d))?, sin.reshape((t, 1, d))?);
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    mul_const(x, &cos)? + mul_const(&rot, &sin)?
}

struct Rope {
    /// [T, d]
    cos: Vec<f32>,
    /// [T, d]
    sin: Vec<f32>,
    t: usize,
    heads: usize,
    d: usize,
}

impl Rope {
    /// out[row] = f(src[row], cos[pos], sin[pos]) for every row (one head at one position) of
    /// [b, T, heads, d], rows split across threads.
    fn map(&self, src: &[f32], f: impl Fn(&mut [f32], &[f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
        let d = self.d;
        let n = task_len(d);
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(n).zip(src.par_chunks(n)).enumerate().for_each(|(c, (out, src))| {
            for (k, (o, s)) in out.chunks_mut(d).zip(src.chunks(d)).enumerate() {
                let pos = ((c * n / d + k) / self.heads) % self.t;
                f(o, s, &self.cos[pos * d..(pos + 1) * d], &self.sin[pos * d..(pos + 1) * d]);
            }
        });
        out
    }

    fn check(&self, l: &Layout) -> Result<()> {
        match l.dims() {
            [_, t, h, d] if (*t, *h, *d) == (self.t, self.heads, self.d) => Ok(()),
            other => {
                candle_core::bail!("rope: input {other:?}, op built for [b, {}, {}, {}]", self.t, self.heads, self.d)
            }
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "dptrain-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let x = f32_contiguous(s, l, "rope")?;
        let half = self.d / 2;
        // y_j = x_j cos_j − x_{j+h} sin_j (j < h);  y_j = x_j cos_j + x_{j−h} sin_j (j ≥ h).
        let y = self.map(x, |y, x, cos, sin| {
            for j in 0..half {
                y[j] = x[j] * cos[j] - x[j + half] * sin[j];
                y[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let op = RopeGrad(Rope { cos: self.cos.clone(), sin: self.sin.clone(), ..*self });
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// dL/dx of `Rope` from g = dL/dy (the transposed rotation):
/// dx_j = g_j cos_j + g_{j+h} sin_{j+h} (j < h);  dx_j = g_j cos_j − g_{j−h} sin_{j−h} (j ≥ h).
struct RopeGrad(Rope);

impl CustomOp1 for RopeGrad {
    fn name(&self) -> &'static str {
        "dptrain-rope-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.check(l)?;
        let g = f32_contiguous(s, l, "rope grad")?;
        let half = self.0.d / 2;
        let dx = self.0.map(g, |dx, g, cos, sin| {
            for j in 0..half {
                dx[j] = g[j] * cos[j] + g[j + half] * sin[j + half];
                dx[j + half] = g[j + half] * cos[j + half] - g[j] * sin[j];
            }
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// silu(gate) · up, elementwise (same shapes): fused on the CPU (`SwiGlu`), composed elsewhere
/// (`swiglu_composed`).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if f32_cpu(gate) && f32_cpu(up) && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    swiglu_composed(gate, up)
}

/// silu(gate) · up from candle's differentiable ops: the slow twin of `SwiGlu`.
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "dptrain-swiglu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = f32_pair((s1, l1), (s2, l2), "swiglu")?;
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(TASK)
            .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK)))
            .for_each(|(y, (a, u))| super::vexp::swiglu_forward(a, u, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_gate, want_up) = (gate.track_op(), up.track_op());
        if !(want_gate || want_up) {
            return Ok((None, None));
        }
        let (a, u, g) = (host(gate)?, host(up)?, host(grad)?);
        if a.len() != g.len() || u.len() != g.len() {
            candle_core::bail!("swiglu backward: shapes changed since the forward");
        }
        // d gate = g · u · σ(a) (1 + a (1 − σ(a)));  d up = g · a σ(a) (`vexp::swiglu_backward`).
        let mut da = vec![0f32; a.len()];
        let mut du = vec![0f32; a.len()];
        let inputs = a.par_chunks(TASK).zip(u.par_chunks(TASK)).zip(g.par_chunks(TASK));
        da.par_chunks_mut(TASK)
            .zip(du.par_chunks_mut(TASK))
            .zip(inputs)
            .for_each(|((da, du), ((a, u), g))| super::vexp::swiglu_backward(a, u, g, da, du));
        let dev = gate.device();
        let shape = gate.shape();
        let wrap = |v: Vec<f32>, want: bool| -> Result<Option<Tensor>> {
            if want {
                Ok(Some(Tensor::from_vec(v, shape, dev)?))
            } else {
                Ok(None)
            }
        };
        Ok((wrap(da, want_gate)?, wrap(du, want_up)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::Var;

    type Op<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

    /// Value and gradients of L = Σ c · f(inputs) for the fused op (f32) and the composed twin
    /// (f64), compared relative to each result's largest element.
    fn check(name: &str, inputs: &[Tensor], fused: Op, composed: Op) {
        let run = |f: Op, dt: DType| {
            let vars: Vec<Var> = inputs.iter().map(|x| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap()).collect();
            let y = f(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
            let c = rand(y.dims(), 99).to_dtype(dt).unwrap();
            let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let mut out = vec![flat(&y)];
            out.extend(vars.iter().map(|v| flat(g.get(v.as_tensor()).expect("every input gets a gradient"))));
            out
        };
        let (f, s) = (run(fused, DType::F32), run(composed, DType::F64));
        for (k, (f, s)) in f.iter().zip(&s).enumerate() {
            let top = s.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            let err = f.iter().zip(s).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top;
            assert!(
                err < 1e-5,
                "{name}: {} differs by {err}",
                if k == 0 { "value".into() } else { format!("gradient {k}") }
            );
        }
    }

    #[test]
    fn fused_rms_norm_matches_the_composed_twin_in_value_and_gradient() {
        for (shape, scale) in [(vec![2usize, 3, 8], 1.0f32), (vec![5, 64], 30.0), (vec![1, 1], 0.01)] {
            let h = *shape.last().unwrap();
            let w = (rand(&[h], 5) + 1.5).unwrap();
            let x = (rand(&shape, 6) * scale as f64).unwrap();
            let w64 = w.to_dtype(DType::F64).unwrap();
            check(
                "rms norm",
                &[x],
                &|t| {
                    assert!(f32_cpu(&t[0]));
                    rms_norm(&t[0], &w, 1e-6).unwrap()
                },
                &|t| rms_norm_composed(&t[0], &w64, 1e-6).unwrap(),
            );
        }
    }

    #[test]
    fn fused_rope_matches_the_composed_twin_in_value_and_gradient() {
        let (t, d) = (5, 8);
        let (cos, sin) = super::super::llama::rope_tables(t, d, 10_000.0, &candle_core::Device::Cpu).unwrap();
        // Different examples and heads at one position get the same rotation; positions differ.
        let x = rand(&[3, t, 4, d], 7);
        let (c64, s64) = (cos.to_dtype(DType::F64).unwrap(), sin.to_dtype(DType::F64).unwrap());
        check("rope", &[x], &|x| rope(&x[0], &cos, &sin).unwrap(), &|x| rope_composed(&x[0], &c64, &s64).unwrap());
        let err = rope(&rand(&[1, t, 2, d], 1), &cos.narrow(0, 0, 4).unwrap(), &sin).unwrap_err();
        assert!(err.to_string().contains("tables"), "{err}");
    }

    #[test]
    fn fused_swiglu_matches_the_composed_twin_in_value_and_gradient() {
        // Large |gate| too, where σ saturates.
        let gate = (rand(&[3, 7, 40], 8) * 12.0).unwrap();
        let up = rand(&[3, 7, 40], 9);
        check("swiglu", &[gate, up], &|t| swiglu(&t[0], &t[1]).unwrap(), &|t| swiglu_composed(&t[0], &t[1]).unwrap());
    }

    #[test]
    fn fused_llama_ops_off_the_fused_path_are_the_composed_forms_bit_for_bit() {
        // Other dtypes (and GPU tensors, by the same test in each op) take the composed forms.
        let f64_of = |t: Tensor| t.to_dtype(DType::F64).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let x = f64_of(rand(&[2, 3, 2, 4], 1));
        let w = f64_of(rand(&[4], 2));
        assert_eq!(flat(rms_norm(&x, &w, 1e-6).unwrap()), flat(rms_norm_composed(&x, &w, 1e-6).unwrap()));
        let (c, s) = (f64_of(rand(&[3, 4], 3)), f64_of(rand(&[3, 4], 4)));
        assert_eq!(flat(rope(&x, &c, &s).unwrap()), flat(rope_composed(&x, &c, &s).unwrap()));
        let u = f64_of(rand(&[2, 3, 2, 4], 5));
        assert_eq!(flat(swiglu(&x, &u).unwrap()), flat(swiglu_composed(&x, &u).unwrap()));
    }

    #[test]
    fn fused_llama_ops_give_no_gradient_to_untracked_inputs() {
        let gate = Var::from_tensor(&rand(&[2, 6], 1)).unwrap();
        let up = rand(&[2, 6], 2);
        let g = swiglu(gate.as_tensor(), &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(gate.as_tensor()).is_some());
        assert!(g.get(&up).is_none());
    }
}
