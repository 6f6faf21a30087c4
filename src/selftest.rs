//! `dptrain selftest --device D`: every DP kernel on device D against its CPU twin on random
//! inputs of several sizes (empty ones, and sizes that are not multiples of the block size), then
//! a few seeded DP-SGD steps of a small random BERT and of a small random Llama (GQA, tied
//! embeddings, language-modelling targets) on D against the same steps on the CPU.
//!
//! On `--device cpu` the CPU twins would be compared with themselves, which proves nothing; there
//! each fused CPU path is compared against its independent slow twin instead: the keystream
//! against the scalar ChaCha20 block function (checked against RFC 8439's vector), the noise
//! against the twin written from the specification on that block function (bit for bit), norms,
//! clip factors and clipped sums against f64 loops (`privacy::clip_and_sum_reference`), AdamW
//! against the textbook update, GELU against libm's erfc, and the DP steps against the same steps
//! clipping by concatenation and candle ops. On every device the model's fused ops (attention,
//! vocabulary NLL, RMSNorm, RoPE, SwiGLU: fused on the CPU, composed elsewhere) are checked in
//! value and gradient against their composed forms in f64. Every check names its reference. Tolerances are
//! stated per check as atol + rtol·|reference|; checks whose arithmetic is specified to round
//! identically also report the fraction of bit-identical values.

use crate::data::Example;
use crate::kernels::{self, FusedAdamW, NoiseKey};
use crate::model::bert::{random_weights, uniform_tensor, BertClassifier, BertConfig, LoraSpec};
use crate::model::{DpModel, LlamaConfig, LlamaLm};
use crate::privacy::GaussianNoise;
use crate::train::params::FlatParams;
use crate::train::step::{private_gradient, private_gradient_with, ClipImpl, Mechanism};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The outcome of one comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    /// Sizes or settings of this case.
    pub case: String,
    pub values: usize,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    pub atol: f64,
    pub rtol: f64,
    /// Fraction of values that are bit-identical (1 for empty cases).
    pub exact_fraction: f64,
    pub pass: bool,
    /// What the device's values were compared against.
    pub reference: String,
}

impl Check {
    /// The same check, naming its reference.
    pub fn against(mut self, reference: String) -> Check {
        self.reference = reference;
        self
    }
}

/// Compares `got` against the reference `want`: |got − want| ≤ atol + rtol·|want| everywhere, with
/// NaN only where the reference has NaN and infinities equal.
pub fn compare(name: &str, case: String, got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Check {
    let mut c = Check {
        name: name.into(),
        case,
        values: want.len(),
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        atol,
        rtol,
        exact_fraction: 1.0,
        pass: got.len() == want.len(),
        reference: String::new(),
    };
    let mut exact = 0usize;
    for (&g, &w) in got.iter().zip(want) {
        if g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()) {
            exact += 1;
            continue;
        }
        if !(g.is_finite() && w.is_finite()) {
            c.pass = false;
            c.max_abs_err = f64::INFINITY;
            continue;
        }
        let d = (g - w).abs();
        c.max_abs_err = c.max_abs_err.max(d);
        c.max_rel_err = c.max_rel_err.max(d / w.abs().max(f64::MIN_POSITIVE));
        if d > atol + rtol * w.abs() {
            c.pass = false;
        }
    }
    if !want.is_empty() {
        c.exact_fraction = exact as f64 / want.len() as f64;
    }
    c
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

fn random_vec(rng: &mut ChaCha20Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// Runs every check on `device`. On a GPU the reference is the CPU twin of each kernel (the CPU
/// path the training step takes); on the CPU, where that would compare a function with itself,
/// it is each path's independent slow twin instead (`Check::reference` says which).
///
/// Zero-size cases run only on the CPU: CUDA (like cuMemAlloc) refuses zero-byte allocations, so
/// an empty tensor cannot exist there, and an empty Poisson batch never builds one (it has no
/// micro-batches). The GPU's empty-batch path is checked as a whole DP step instead.
pub fn run(device: &Device) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let sizes_ok = |n: usize| n > 0 || device.is_cpu();
    let slow = device.is_cpu();
    let twin = |label: &str| if slow { label.to_string() } else { CPU_TWIN.to_string() };
    let cpu = Device::Cpu;
    let mut rng = ChaCha20Rng::seed_from_u64(0x5e1f_7e57);
    let mut key = [0u8; 32];
    rng.fill(&mut key);
    let key = NoiseKey::new(key);

    // Keystream, bit for bit.
    for (n, first, stream) in
        [(0usize, 0u64, 0u64), (1, 0, 1), (255, 3, 7), (256, 0, 1 << 40), (257, 1, 2), (1000, 0, 9)]
    {
        let d = kernels::chacha20_blocks(device, &key, stream, first, n)?.flatten_all()?.to_vec1::<u32>()?;
        let c: Vec<u32> = if slow {
            (first..first + n as u64).flat_map(|b| kernels::chacha::chacha20_block(key.bytes(), b, stream)).collect()
        } else {
            kernels::chacha20_blocks(&cpu, &key, stream, first, n)?.flatten_all()?.to_vec1::<u32>()?
        };
        let (d, c): (Vec<f64>, Vec<f64>) =
            (d.iter().map(|&x| x as f64).collect(), c.iter().map(|&x| x as f64).collect());
        let case = format!("{n} blocks from {first}, stream {stream}");
        out.push(compare("chacha20 keystream", case, &d, &c, 0.0, 0.0).against(twin(SCALAR_CHACHA)));
    }

    // Gaussian noise: on the CPU bit for bit against the twin written from the specification.
    let (noise_atol, noise_rtol) = if slow { (0.0, 0.0) } else { (1e-6, 1e-6) };
    for n in [0usize, 1, 2, 3, 255, 256, 257, 511, 513, 100_003] {
        if !sizes_ok(n) {
            continue;
        }
        let v = random_vec(&mut rng, n, 3.0);
        let td = Tensor::from_slice(&v, n, device)?;
        kernels::add_gaussian_noise(&td, &key, 11, 1.7)?;
        let want: Vec<f64> = if slow {
            let mut w = v.clone();
            crate::privacy::noise::add_noise_reference(&mut w, &key, 11, 1.7);
            w.iter().map(|&x| x as f64).collect()
        } else {
            let tc = Tensor::from_slice(&v, n, &cpu)?;
            kernels::add_gaussian_noise(&tc, &key, 11, 1.7)?;
            f64s(&tc)?
        };
        let case = format!("n = {n}, std 1.7");
        out.push(
            compare("gaussian noise", case, &f64s(&td)?, &want, noise_atol, noise_rtol)
                .against(twin("privacy::noise::add_noise_reference (scalar ChaCha20 + Box–Muller)")),
        );
    }

    // Norms, clip factors, clipped sums.
    let shapes: [(usize, &[usize]); 6] =
        [(0, &[4]), (1, &[1]), (3, &[255, 256, 257]), (33, &[5000, 3]), (257, &[1, 300]), (64, &[12_289])];
    for (b, widths) in shapes {
        if !sizes_ok(b) {
            continue;
        }
        let mut parts_c = Vec::new();
        for (k, &n) in widths.iter().enumerate() {
            let mut v = random_vec(&mut rng, b * n, 0.1);
            if b >= 3 && k == 0 {
                v[n] = f32::NAN; // example 1 is not finite
                v[2 * n] = f32::INFINITY; // nor is example 2
            }
            parts_c.push(Tensor::from_vec(v, (b, n), &cpu)?);
        }
        let parts_d = parts_c.iter().map(|t| t.to_device(device)).collect::<Result<Vec<_>>>()?;
        // Each example's gradient over all parts, for the slow twins.
        let host: Vec<Vec<Vec<f32>>> = parts_c.iter().map(|t| t.to_vec2::<f32>()).collect::<Result<_>>()?;
        let rows: Vec<Vec<f32>> = (0..b).map(|i| host.iter().flat_map(|p| p[i].iter().copied()).collect()).collect();
        let case = format!("b = {b}, widths {widths:?}");
        let sq_c = kernels::per_example_sq_norms(&parts_c)?;
        let sq_d = kernels::per_example_sq_norms(&parts_d)?;
        let sq_want: Vec<f64> = if slow {
            rows.iter().map(|r| r.iter().map(|&v| v as f64 * v as f64).sum()).collect()
        } else {
            f64s(&sq_c)?
        };
        out.push(
            compare("per-example squared norms", case.clone(), &f64s(&sq_d)?, &sq_want, 0.0, 1e-12)
                .against(twin("f64 sum of squares over each example's concatenated gradient")),
        );
        let sq_same = sq_c.to_device(device)?;
        for clip in [Some(0.5), None] {
            let f_c = kernels::clip_factors(&sq_c, clip)?;
            let f_d = kernels::clip_factors(&sq_same, clip)?;
            let f_want: Vec<f64> = if slow {
                // min(1, C·CLIP_MARGIN / (‖g‖ + 1e-6)), 0 for a non-finite norm, 1 without clipping.
                f64s(&sq_c)?
                    .iter()
                    .map(|&sq| {
                        let norm = sq.sqrt();
                        let f = if !norm.is_finite() {
                            0.0
                        } else {
                            clip.map_or(1.0, |c| (c * crate::privacy::clip::CLIP_MARGIN / (norm + 1e-6)).min(1.0))
                        };
                        f as f32 as f64
                    })
                    .collect()
            } else {
                f64s(&f_c)?
            };
            let case = format!("{case}, C = {clip:?}");
            out.push(
                compare("clip factors", case.clone(), &f64s(&f_d)?, &f_want, 0.0, 0.0)
                    .against(twin("min(1, C·(1 − 2⁻²⁰)/(‖g‖ + 1e-6)) in f64")),
            );
            let s_d = kernels::clipped_sum(&parts_d, &f_c.to_device(device)?)?;
            let s_want: Vec<f64> = if slow {
                let p: usize = widths.iter().sum();
                let (sum, _) = crate::privacy::clip_and_sum_reference(&rows, clip.unwrap_or(f64::INFINITY));
                if sum.is_empty() {
                    vec![0.0; p]
                } else {
                    sum
                }
            } else {
                f64s(&kernels::clipped_sum(&parts_c, &f_c)?)?
            };
            out.push(
                compare("clipped sum", case, &f64s(&s_d)?, &s_want, 1e-7, 1e-6)
                    .against(twin("privacy::clip_and_sum_reference (f64 loops)")),
            );
        }
    }

    // Fused AdamW over three steps.
    for n in [0usize, 1, 255, 257, 10_000] {
        if !sizes_ok(n) {
            continue;
        }
        let p0 = random_vec(&mut rng, n, 1.0);
        let (pd, pc) = (Tensor::from_slice(&p0, n, device)?, Tensor::from_slice(&p0, n, &cpu)?);
        let (mut od, mut oc) = (FusedAdamW::new(0.01, 1e-8), FusedAdamW::new(0.01, 1e-8));
        let mut textbook = TextbookAdamW::new(&p0, 0.01, 1e-8);
        for t in 0..3 {
            let g = random_vec(&mut rng, n, 0.3);
            let lr = 1e-2 * (t + 1) as f64;
            od.step(&pd, &Tensor::from_slice(&g, n, device)?, lr)?;
            if slow {
                textbook.step(&g, lr);
            } else {
                oc.step(&pc, &Tensor::from_slice(&g, n, &cpu)?, lr)?;
            }
        }
        let (p_want, mv_want) = if slow {
            (textbook.p.iter().map(|&x| x as f64).collect(), [textbook.m.clone(), textbook.v.clone()].concat())
        } else {
            let (mc, vc) = oc.moments().map_or(Ok((vec![], vec![])), |m| m.to_host())?;
            (f64s(&pc)?, [mc, vc].concat())
        };
        let reference = twin("textbook AdamW (f64 moments, f32 parameters)");
        let case = format!("n = {n}, 3 steps");
        out.push(
            compare("fused AdamW parameters", case.clone(), &f64s(&pd)?, &p_want, 1e-7, 1e-6)
                .against(reference.clone()),
        );
        let (md, vd) = od.moments().map_or(Ok((vec![], vec![])), |m| m.to_host())?;
        out.push(compare("fused AdamW moments", case, &[md, vd].concat(), &mv_want, 1e-15, 1e-12).against(reference));
    }

    // Exact-erf GELU forward and backward.
    for n in [1usize, 257, 10_000] {
        let x = random_vec(&mut rng, n, 4.0);
        let c = random_vec(&mut rng, n, 1.0);
        let mut res = Vec::new();
        for dev in [device, &cpu] {
            let xv = Var::from_tensor(&Tensor::from_slice(&x, n, dev)?)?;
            let y = crate::model::ops::gelu_erf(xv.as_tensor())?;
            let g = (&y * Tensor::from_slice(&c, n, dev)?)?.sum_all()?.backward()?;
            let gx = g.get(xv.as_tensor()).expect("gradient reaches x").clone();
            res.push((f64s(&y)?, f64s(&gx)?));
        }
        if slow {
            use crate::model::gelu::{gelu_grad_reference, gelu_reference};
            res[1] = (
                x.iter().map(|&v| gelu_reference(v) as f64).collect(),
                x.iter().zip(&c).map(|(&v, &g)| gelu_grad_reference(v, g) as f64).collect(),
            );
        }
        let reference = twin("model::gelu::gelu_reference, gelu_grad_reference (libm erfc)");
        out.push(
            compare("gelu forward", format!("n = {n}"), &res[0].0, &res[1].0, 1e-7, 1e-6).against(reference.clone()),
        );
        out.push(compare("gelu backward", format!("n = {n}"), &res[0].1, &res[1].1, 1e-7, 1e-6).against(reference));
    }

    // Seeded DP-SGD steps of a small BERT: the device against the CPU (on the CPU: the fused clip
    // against the concatenate-then-candle-ops clip, and pure noise against the noise twin).
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(0.5), noise_multiplier: 0.8, expected_batch_size: 12 };
    let empty = |dev: &Device| -> Result<Vec<f64>> {
        let (model, layout, examples) = small_bert(dev, DType::F32)?;
        let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(5));
        f64s(&private_gradient(&model, &examples, None, &[], 7, layout.len(), &mech, &noise, 0)?.0)
    };
    let got = empty(device)?;
    let want = if slow {
        let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(5));
        let mut w = vec![0f32; got.len()];
        crate::privacy::noise::add_noise_reference(&mut w, noise.key(), 0, 0.8 * 0.5);
        w.iter().map(|&x| (x / 12.0) as f64).collect()
    } else {
        empty(&cpu)?
    };
    out.push(
        compare("DP step, empty Poisson batch", "noise only".into(), &got, &want, 1e-7, 1e-6)
            .against(twin("N(0, (σC)²) from add_noise_reference, divided by L")),
    );
    out.extend(fused_model_op_checks(device)?);
    for family in ["bert", "llama"] {
        let reference =
            train_steps(&cpu, DType::F32, family, if slow { ClipImpl::CandleOps } else { ClipImpl::Fused })?;
        for (dtype, atol_rel) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
            let got = train_steps(device, dtype, family, ClipImpl::Fused)?;
            for (what, g, w) in [("privatised gradients", &got.0, &reference.0), ("parameters", &got.1, &reference.1)] {
                // AdamW moves every coordinate by about ±lr whatever its gradient's size, so a
                // coordinate whose tiny gradient changes sign under bf16 rounding ends up 2·lr
                // away: with bf16 weights only the gradients are comparable.
                if dtype == DType::BF16 && what == "parameters" {
                    continue;
                }
                let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
                out.push(
                    compare(
                        &format!("3 DP-SGD steps ({family}): {what}"),
                        format!(
                            "base weights {dtype:?}; atol = {atol_rel:e} · max |reference| = {:.3e}",
                            atol_rel * scale
                        ),
                        g,
                        w,
                        atol_rel * scale,
                        0.0,
                    )
                    .against(twin(
                        "the same steps, f32, clipping by concatenation and candle ops (privacy::clip_and_sum)",
                    )),
                );
            }
        }
    }
    Ok(out)
}

/// The model's fused ops (fused on the CPU in f32, composed of candle ops elsewhere), as `device`
/// runs them in f32, against their composed forms on the CPU in f64: the value and the gradient
/// of Σ c · op(inputs) for every input. These fast paths depend on the CPU's features (the
/// GEMM's and the exponential's AVX-512 or AVX2 code), so a user's machine checks its own.
fn fused_model_op_checks(device: &Device) -> Result<Vec<Check>> {
    use crate::model::attention::{attention, attention_composed, Heads};
    use crate::model::fused_llama::{rms_norm, rms_norm_composed, rope, rope_composed, swiglu, swiglu_composed};
    use crate::model::vocab::vocab_nll;
    type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let mut rng = ChaCha20Rng::seed_from_u64(0xf05e_d0b5);
    let cpu = Device::Cpu;
    let mut rand_t = |shape: &[usize], scale: f32| -> Result<Tensor> {
        Tensor::from_vec(random_vec(&mut rng, shape.iter().product(), scale), shape, &cpu)
    };
    // Attention: Llama's causal + key mask, 4 query heads sharing 2 key/value heads.
    let (b, t) = (2, 9);
    let bias: Vec<f32> = (0..b * t * t)
        .map(|x| if x % t > (x / t) % t || (x / (t * t) == 1 && x % t >= 6) { -1e30 } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(bias, (b, 1, t, t), &cpu)?;
    let heads = Heads { query: 4, kv: 2, dim: 8 };
    let (cos, sin) = crate::model::llama::rope_tables(6, 8, 10_000.0, &cpu)?;
    let norm_w = (rand_t(&[32], 0.5)? + 1.0)?;
    let head = rand_t(&[700, 16], 1.0)?;
    let targets = Tensor::from_vec((0..11u32).map(|i| (i * 61) % 700).collect::<Vec<_>>(), 11, &cpu)?;
    let on = |x: &Tensor, dt: DType, dev: &Device| x.to_dtype(dt)?.to_device(dev);
    let cases: Vec<(&str, String, Vec<Tensor>, Op, Op)> = vec![
        (
            "attention (model::attention)",
            format!("b {b}, T {t}, {heads:?}, causal + key mask"),
            vec![(rand_t(&[b, t, 32], 1.0)? * 3.0)?, rand_t(&[b, t, 16], 1.0)?, rand_t(&[b, t, 16], 1.0)?],
            {
                let bias = bias.clone();
                Box::new(move |x: &[Tensor]| {
                    attention(&x[0], &x[1], &x[2], &on(&bias, x[0].dtype(), x[0].device())?, heads, 0.35)
                })
            },
            {
                let bias = bias.clone();
                Box::new(move |x: &[Tensor]| {
                    attention_composed(&x[0], &x[1], &x[2], &on(&bias, DType::F64, &Device::Cpu)?, heads, 0.35)
                })
            },
        ),
        (
            "vocabulary NLL (model::vocab)",
            "11 rows of 16, vocabulary 700".into(),
            vec![(rand_t(&[11, 16], 1.0)? * 2.0)?],
            {
                let (w, y) = (head.clone(), targets.clone());
                Box::new(move |x: &[Tensor]| {
                    vocab_nll(&x[0], &on(&w, x[0].dtype(), x[0].device())?, &y.to_device(x[0].device())?, None)
                })
            },
            {
                let (w, y) = (head.clone(), targets.clone());
                Box::new(move |x: &[Tensor]| {
                    // Candle's matmul (not the frozen linear, which returns f32), all in f64.
                    let logp =
                        crate::model::ops::log_softmax_last(&x[0].matmul(&on(&w, DType::F64, &Device::Cpu)?.t()?)?)?;
                    logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
                })
            },
        ),
        (
            "rms norm (model::fused_llama)",
            "[3, 5, 32]".into(),
            vec![(rand_t(&[3, 5, 32], 1.0)? * 4.0)?],
            {
                let w = norm_w.clone();
                Box::new(move |x: &[Tensor]| rms_norm(&x[0], &on(&w, x[0].dtype(), x[0].device())?, 1e-6))
            },
            {
                let w = norm_w.clone();
                Box::new(move |x: &[Tensor]| rms_norm_composed(&x[0], &on(&w, DType::F64, &Device::Cpu)?, 1e-6))
            },
        ),
        (
            "rope (model::fused_llama)",
            "[2, 6, 3, 8]".into(),
            vec![rand_t(&[2, 6, 3, 8], 1.0)?],
            {
                let (c, s) = (cos.clone(), sin.clone());
                Box::new(move |x: &[Tensor]| {
                    rope(&x[0], &on(&c, x[0].dtype(), x[0].device())?, &on(&s, x[0].dtype(), x[0].device())?)
                })
            },
            {
                let (c, s) = (cos.clone(), sin.clone());
                Box::new(move |x: &[Tensor]| {
                    rope_composed(&x[0], &on(&c, DType::F64, &Device::Cpu)?, &on(&s, DType::F64, &Device::Cpu)?)
                })
            },
        ),
        (
            "swiglu (model::fused_llama)",
            "[4, 50], gate up to ±12".into(),
            vec![(rand_t(&[4, 50], 1.0)? * 12.0)?, rand_t(&[4, 50], 1.0)?],
            Box::new(|x: &[Tensor]| swiglu(&x[0], &x[1])),
            Box::new(|x: &[Tensor]| swiglu_composed(&x[0], &x[1])),
        ),
    ];
    let mut out = Vec::new();
    for (name, case, inputs, fast, slow) in cases {
        // Value and every input's gradient of Σ c · op(inputs).
        let run = |op: &Op, dt: DType, dev: &Device| -> Result<Vec<Vec<f64>>> {
            let vars = inputs.iter().map(|x| Var::from_tensor(&on(x, dt, dev)?)).collect::<Result<Vec<_>>>()?;
            let y = op(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
            let c = Tensor::from_vec(
                (0..y.elem_count()).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect::<Vec<_>>(),
                y.shape(),
                &Device::Cpu,
            )?;
            let grads = (&y * on(&c, y.dtype(), dev)?)?.sum_all()?.backward()?;
            let mut res = vec![f64s(&y)?];
            for v in &vars {
                let g =
                    grads.get(v.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("{name}: no gradient")))?;
                res.push(f64s(g)?);
            }
            Ok(res)
        };
        let got = run(&fast, DType::F32, device)?;
        let want = run(&slow, DType::F64, &cpu)?;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = if k == 0 { "value".to_string() } else { format!("gradient of input {k}") };
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            out.push(
                compare(
                    name,
                    format!("{case}: {what}; atol = 1e-5 · max |reference| = {:.3e}", 1e-5 * scale),
                    g,
                    w,
                    1e-5 * scale,
                    0.0,
                )
                .against("the composed candle form, in f64 on the CPU".into()),
            );
        }
    }
    Ok(out)
}

/// `Check::reference` on a GPU: the CPU path of the same computation.
/// The reference a GPU check names: the CPU path of the same kernel.
pub const CPU_TWIN: &str = "CPU twin";
const SCALAR_CHACHA: &str = "kernels::chacha::chacha20_block (scalar, RFC 8439 vector)";

/// Textbook AdamW (Loshchilov & Hutter) over host vectors: moments in f64, parameters stored in
/// f32 after every step (as dptrain keeps them).
struct TextbookAdamW {
    p: Vec<f32>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    weight_decay: f64,
    eps: f64,
}

impl TextbookAdamW {
    fn new(p: &[f32], weight_decay: f64, eps: f64) -> Self {
        TextbookAdamW { p: p.to_vec(), m: vec![0.0; p.len()], v: vec![0.0; p.len()], t: 0, weight_decay, eps }
    }

    fn step(&mut self, g: &[f32], lr: f64) {
        let (b1, b2) = (0.9f64, 0.999f64);
        self.t += 1;
        let (bc1, bc2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (((p, &gj), m), v) in self.p.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            let gj = gj as f64;
            *m = b1 * *m + (1.0 - b1) * gj;
            *v = b2 * *v + (1.0 - b2) * gj * gj;
            let (mhat, vhat) = (*m / bc1, *v / bc2);
            let pj = *p as f64;
            *p = (pj - lr * (mhat / (vhat.sqrt() + self.eps) + self.weight_decay * pj)) as f32;
        }
    }
}

/// Three seeded DP-SGD steps (clip, noise, AdamW) of a 2-layer random `family` model with LoRA on
/// every linear module, micro-batches of 7 (not dividing the batches): returns (the privatised
/// gradients of all steps, the final parameters), flattened.
fn train_steps(device: &Device, base: DType, family: &str, how: ClipImpl) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut model, layout, examples): (Box<dyn DpModel>, _, _) = match family {
        "bert" => {
            let (m, l, e) = small_bert(device, base)?;
            (Box::new(m), l, e)
        }
        _ => {
            let (m, l, e) = small_llama(device, base)?;
            (Box::new(m), l, e)
        }
    };
    let params = layout.to_tensor(device)?;
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(0.5), noise_multiplier: 0.8, expected_batch_size: 12 };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(5));
    let mut opt = FusedAdamW::new(0.01, 1e-8);
    let mut grads = Vec::new();
    for t in 0..3u64 {
        let idx: Vec<usize> = (0..24).filter(|i| !(i * 5 + t as usize).is_multiple_of(3)).collect();
        let (g, _) =
            private_gradient_with(model.as_ref(), &examples, None, &idx, 7, layout.len(), &mech, &noise, t, how)?;
        grads.extend(f64s(&g)?);
        opt.step(&params, &g, 1e-2)?;
        model.set_trainable(&layout.split(&params)?)?;
    }
    Ok((grads, f64s(&params)?))
}

/// A 2-layer random BERT (hidden 64) on `device` with LoRA r = 4 on every linear module, random
/// non-zero trainable tensors, and 24 examples of 5–40 tokens.
fn small_bert(device: &Device, base: DType) -> Result<(BertClassifier, FlatParams, Vec<Example>)> {
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "model_type": "bert", "vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    }))
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let w = random_weights(&cfg, &mut rng, &Device::Cpu)?;
    let w = w.into_iter().map(|(k, t)| Ok((k, t.to_device(device)?))).collect::<Result<_>>()?;
    let vb = VarBuilder::from_tensors(w, DType::F32, device);
    let targets = crate::config::BERT_LORA_MODULES.iter().map(|s| s.to_string()).collect();
    let spec = LoraSpec { rank: 4, alpha: 8.0, targets, layers: None };
    let mut model = BertClassifier::new(vb, cfg, Some(&spec), 3, &mut rng)?.with_base_dtype(base)?;
    let random = model
        .trainable()
        .iter()
        .map(|(_, t)| uniform_tensor(&mut rng, t.dims(), 0.3, &Device::Cpu)?.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    model.set_trainable(&random)?;
    let layout = FlatParams::from_named(&model.trainable())?;
    let examples: Vec<Example> = (0..24)
        .map(|i| {
            Example::classification(
                (0..(5 + (i * 7) % 36)).map(|j| ((i * 13 + j * 5) % 119 + 1) as u32).collect(),
                i % 3,
            )
        })
        .collect();
    Ok((model, layout, examples))
}

/// A 2-layer random Llama (hidden 64, 4 query heads over 2 key/value heads, tied embeddings) on
/// `device` with LoRA r = 4 on every linear module, random non-zero LoRA tensors, and 24
/// language-modelling examples of 5–40 tokens (some scoring only after a 3-token prompt).
fn small_llama(device: &Device, base: DType) -> Result<(LlamaLm, FlatParams, Vec<Example>)> {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 120, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu"
    }))
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut rng = ChaCha20Rng::seed_from_u64(78);
    let w = crate::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu)?;
    let w = w.into_iter().map(|(k, t)| Ok((k, t.to_device(device)?))).collect::<Result<_>>()?;
    let vb = VarBuilder::from_tensors(w, DType::F32, device);
    let targets = crate::model::llama::LLAMA_LORA_MODULES.iter().map(|s| s.to_string()).collect();
    let spec = LoraSpec { rank: 4, alpha: 8.0, targets, layers: None };
    let mut model = LlamaLm::new(vb, cfg, Some(&spec), &mut rng)?.with_base_dtype(base)?;
    let random = model
        .trainable()
        .iter()
        .map(|(_, t)| uniform_tensor(&mut rng, t.dims(), 0.3, &Device::Cpu)?.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    model.set_trainable(&random)?;
    let layout = FlatParams::from_named(&model.trainable())?;
    let examples: Vec<Example> = (0..24)
        .map(|i| Example {
            ids: (0..(5 + (i * 7) % 36)).map(|j| ((i * 13 + j * 5) % 119 + 1) as u32).collect(),
            label: 0,
            target_start: Some(if i % 3 == 0 { 3 } else { 1 }),
        })
        .collect();
    Ok((model, layout, examples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_flags_values_outside_tolerance_and_misplaced_nans() {
        assert!(compare("x", String::new(), &[1.0, 2.0], &[1.0, 2.0 + 1e-9], 0.0, 1e-6).pass);
        assert!(!compare("x", String::new(), &[1.0, 2.1], &[1.0, 2.0], 0.0, 1e-6).pass);
        assert!(!compare("x", String::new(), &[f64::NAN], &[1.0], 1.0, 1.0).pass);
        assert!(compare("x", String::new(), &[f64::NAN], &[f64::NAN], 0.0, 0.0).pass);
        assert!(!compare("x", String::new(), &[1.0], &[], 0.0, 0.0).pass);
    }
}
