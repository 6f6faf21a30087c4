//! Differentiable building blocks for the training forward.
//!
//! candle's fused softmax / layer-norm / RoPE kernels have no backward and silently cut the graph
//! (PITFALLS 15), so every op here is either composed of differentiable primitives or a custom op
//! with an explicit backward. The exact-erf GELU is a custom op because candle's own GeluErf
//! backward is slow on CPU and uses a 6-digit constant; its CPU numerics are in `gelu`.

use super::fused::{f32_contiguous, f32_pair};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

/// Whether the fused CPU ops of `fused` compute every gradient this call needs: CPU, f32, and
/// none of `frozen` (weights whose gradient the fused op does not compute) tracked by autograd.
fn cpu_fusable(xs: &Tensor, frozen: &[&Tensor]) -> bool {
    xs.device().is_cpu()
        && xs.dtype() == candle_core::DType::F32
        && frozen.iter().all(|t| !t.track_op() && t.dtype() == candle_core::DType::F32)
}

/// Softmax over the last dimension, differentiable: fused on the CPU (`fused::Softmax`),
/// composed of candle primitives elsewhere.
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    if cpu_fusable(xs, &[]) && xs.rank() > 0 && xs.dim(D::Minus1)? > 0 {
        return xs.contiguous()?.apply_op1(super::fused::Softmax);
    }
    softmax_composed(xs)
}

/// Softmax over the last dimension from candle's differentiable primitives (the slow twin of
/// `fused::Softmax`). The max is detached: subtracting any constant leaves softmax (and its
/// gradient) unchanged, so no gradient is lost.
/// x − max is computed as x + (−max) (the same IEEE result) through `add_const`, so no gradient of
/// x's size is computed for the constant max.
pub fn softmax_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = add_const(xs, &max.neg()?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension, differentiable. The max is a detached constant (as in
/// `softmax_composed`); without `add_const`, candle would compute and keep a gradient of the
/// whole [n, vocabulary] size for it (763 MiB for SmolLM2 at 32 × 128 tokens).
pub fn log_softmax_last(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = add_const(xs, &max.neg()?)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Layer norm over the last dimension, differentiable: fused on the CPU when weight and bias are
/// frozen (`fused::FrozenLayerNorm`), composed of candle primitives otherwise.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_fusable(xs, &[weight, bias]) && xs.rank() > 0 && xs.dim(D::Minus1)? > 0 {
        return xs.contiguous()?.apply_op1(super::fused::FrozenLayerNorm::new(weight, bias, eps)?);
    }
    layer_norm_composed(xs, weight, bias, eps)
}

/// Layer norm over the last dimension from candle's differentiable primitives (the slow twin of
/// `fused::FrozenLayerNorm`, and the form used on GPUs and for trainable weights).
pub fn layer_norm_composed(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    add_const(&mul_const(&normed, weight)?, bias)
}

/// x + c with c broadcast to x's shape. When c is a constant (not tracked by autograd), a custom
/// op whose backward returns the gradient for x only: candle's own broadcast add would also
/// compute a gradient for c, a tensor of x's full shape that nothing reads and that its gradient
/// store keeps until the end of the backward (an attention mask's gradient is [b, heads, T, T]
/// per layer). The forward is the same storage-level add candle does, so values are identical.
pub fn add_const(xs: &Tensor, c: &Tensor) -> Result<Tensor> {
    if c.track_op() {
        return xs.broadcast_add(c);
    }
    xs.apply_op1(ConstBinary { c: c.clone(), mul: false })
}

/// x · c (elementwise, c broadcast to x's shape); with a constant c, the backward computes only
/// dL/dx = g · c (see `add_const`).
pub fn mul_const(xs: &Tensor, c: &Tensor) -> Result<Tensor> {
    if c.track_op() {
        return xs.broadcast_mul(c);
    }
    xs.apply_op1(ConstBinary { c: c.clone(), mul: true })
}

/// x (+ or ·) c for a constant c broadcast to x's shape.
struct ConstBinary {
    c: Tensor,
    mul: bool,
}

/// The storage-level binary op of `ConstBinary` on any backend (c's layout broadcast to x's).
pub(crate) fn const_binary<S: candle_core::backend::BackendStorage>(
    x: &S,
    l: &Layout,
    c: &S,
    cl: &Layout,
    mul: bool,
) -> Result<(S, Shape)> {
    if x.dtype() != c.dtype() {
        candle_core::bail!("constant operand: dtype {:?} does not match {:?}", c.dtype(), x.dtype());
    }
    let cl = cl.broadcast_as(l.shape())?;
    let out = if mul {
        x.binary_impl::<candle_core::op::Mul>(c, l, &cl)?
    } else {
        x.binary_impl::<candle_core::op::Add>(c, l, &cl)?
    };
    Ok((out, l.shape().clone()))
}

impl CustomOp1 for ConstBinary {
    fn name(&self) -> &'static str {
        if self.mul {
            "dptrain-mul-const"
        } else {
            "dptrain-add-const"
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (cs, cl) = self.c.storage_and_layout();
        match &*cs {
            candle_core::Storage::Cpu(c) => const_binary(s, l, c, cl, self.mul),
            _ => candle_core::bail!("constant operand on another device than the input"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (cs, cl) = self.c.storage_and_layout();
        match &*cs {
            candle_core::Storage::Cuda(c) => const_binary(s, l, c, cl, self.mul),
            _ => candle_core::bail!("constant operand on another device than the input"),
        }
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(if self.mul { grad_res.broadcast_mul(&self.c)? } else { grad_res.clone() }))
    }
}

/// GELU with the exact erf: x · Φ(x).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1(GeluErf)
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "dptrain-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "gelu")?;
        Ok((CpuStorage::F32(super::gelu::gelu_forward(x)), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::gpu_elementwise("dp_gelu_erf_fwd", &[(s, l)], l.shape())
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2(&grad_res.contiguous()?, GeluErfGrad)?))
    }
}

/// d/dx [x Φ(x)] · g = (Φ(x) + x φ(x)) · g, in one pass.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "dptrain-gelu-erf-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair((s1, l1), (s2, l2), "gelu-grad")?;
        Ok((CpuStorage::F32(super::gelu::gelu_backward(x, g)), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("gelu-grad: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        crate::kernels::gpu_elementwise("dp_gelu_erf_bwd", &[(s1, l1), (s2, l2)], l1.shape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{Device, Var};

    #[test]
    fn gelu_erf_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let xs: Vec<f64> = vec![-3.0, -1.2, -0.3, 0.0, 0.4, 1.7, 2.5];
        let x = Var::from_vec(xs.iter().map(|&v| v as f32).collect::<Vec<_>>(), xs.len(), &dev).unwrap();
        let y = gelu_erf(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        let got: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let f = |v: f64| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
        for (i, &v) in xs.iter().enumerate() {
            let h = 1e-5;
            let fd = (f(v + h) - f(v - h)) / (2.0 * h);
            assert!((got[i] as f64 - fd).abs() < 1e-5, "x={v}: {} vs {fd}", got[i]);
        }
    }

    #[test]
    fn softmax_and_layer_norm_pass_gradients_upstream() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![0.3f32, -1.0, 2.0, 0.5, 0.1, -0.7], (2, 3), &dev).unwrap();
        let w = Tensor::new(&[1.5f32, -0.5, 2.0], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.2, 0.3], &dev).unwrap();
        let y = layer_norm(&softmax_last(x.as_tensor()).unwrap(), &w, &b, 1e-5).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx: Vec<Vec<f32>> = g.get(x.as_tensor()).expect("gradient reaches the input").to_vec2().unwrap();
        assert!(gx.iter().flatten().any(|v| v.abs() > 1e-4));
    }

    #[test]
    fn constant_ops_equal_broadcast_ops_and_compute_no_gradient_for_the_constant() {
        // x [2, 3, 4, 5] against constants of several broadcast shapes, and a strided x.
        let base = rand(&[2, 3, 4, 5], 1);
        for (k, c_shape) in
            [vec![5], vec![4, 5], vec![2, 1, 1, 5], vec![1, 3, 1, 1], vec![2, 3, 4, 5]].iter().enumerate()
        {
            let c = rand(c_shape, 10 + k as u64);
            for strided in [false, true] {
                let x = Var::from_tensor(&base).unwrap();
                let xin = if strided {
                    // The same values through a transposed view: [2, 3, 5, 4] → t → [2, 3, 4, 5].
                    let xt = x.as_tensor().transpose(2, 3).unwrap().contiguous().unwrap();
                    xt.transpose(2, 3).unwrap()
                } else {
                    x.as_tensor().clone()
                };
                let w = rand(&[2, 3, 4, 5], 99);
                for mul in [false, true] {
                    let fast = if mul { mul_const(&xin, &c) } else { add_const(&xin, &c) }.unwrap();
                    let slow = if mul { xin.broadcast_mul(&c) } else { xin.broadcast_add(&c) }.unwrap();
                    let (f, s) = (fast.flatten_all().unwrap(), slow.flatten_all().unwrap());
                    assert_eq!(f.to_vec1::<f32>().unwrap(), s.to_vec1::<f32>().unwrap(), "{c_shape:?} mul={mul}");
                    let gf = (&fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (&slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    let (a, b) = (gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
                    assert_eq!(
                        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "input gradient, {c_shape:?} mul={mul}"
                    );
                    // candle's broadcast op also stores a gradient for the (broadcast) constant;
                    // the constant op stores none: only tracked tensors' gradients remain.
                    let has_full_size = |g: &candle_core::backprop::GradStore| {
                        g.get_ids().filter(|id| g.get_id(**id).unwrap().dims() == [2, 3, 4, 5]).count()
                    };
                    assert!(has_full_size(&gs) > has_full_size(&gf), "{c_shape:?} mul={mul}");
                }
            }
        }
    }

    #[test]
    fn constant_ops_keep_gradients_of_a_trainable_operand() {
        let x = rand(&[3, 4], 5);
        let c = Var::from_tensor(&rand(&[4], 6)).unwrap();
        let y = mul_const(&add_const(&x, c.as_tensor()).unwrap(), c.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        // d/dc Σ (x + c) c = Σ_rows (x + 2c).
        let got: Vec<f32> = g.get(c.as_tensor()).expect("gradient of a trainable c").to_vec1().unwrap();
        let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let cs: Vec<f32> = c.as_tensor().to_vec1().unwrap();
        for j in 0..4 {
            let want: f32 = (0..3).map(|i| xs[i][j] + 2.0 * cs[j]).sum();
            assert!((got[j] - want).abs() < 1e-5, "{j}: {} vs {want}", got[j]);
        }
    }

    #[test]
    fn composed_softmax_and_log_softmax_equal_the_plain_formulas_and_store_no_gradient_for_the_max() {
        let x = Var::from_tensor(&(rand(&[3, 7], 41) * 20.0).unwrap()).unwrap();
        let w = rand(&[3, 7], 42);
        let max = x.as_tensor().max_keepdim(D::Minus1).unwrap().detach();
        let shifted = x.as_tensor().broadcast_sub(&max).unwrap();
        let e = shifted.exp().unwrap();
        let plain_soft = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let plain_log = shifted.broadcast_sub(&e.sum_keepdim(D::Minus1).unwrap().log().unwrap()).unwrap();
        for (ours, plain) in [
            (softmax_composed(x.as_tensor()).unwrap(), plain_soft),
            (log_softmax_last(x.as_tensor()).unwrap(), plain_log),
        ] {
            assert_eq!(ours.to_vec2::<f32>().unwrap(), plain.to_vec2::<f32>().unwrap());
            // (mul_const: a plain product would also store a gradient for the constant w.)
            let go = mul_const(&ours, &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = mul_const(&plain, &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(
                go.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
                gp.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
            );
            // Only x's own gradient of x's size remains in the store (the plain form adds the max's).
            let full = |g: &candle_core::backprop::GradStore| {
                g.get_ids().filter(|id| g.get_id(**id).unwrap().dims() == [3, 7]).count()
            };
            assert_eq!(full(&go), 1);
            assert_eq!(full(&gp), 2);
        }
    }
}
