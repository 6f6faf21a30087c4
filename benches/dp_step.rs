//! Throughput of the hot parts, DP against non-private in the same run:
//! one micro-batch step of a MiniLM-shaped BERT (2 layers, hidden 384, LoRA r = 8 on query/value,
//! 16 examples × 64 tokens) with (a) plain LoRA backward (no per-example gradients, no clipping)
//! and (b) the DP path (tape, per-example gradients, clip and sum); plus noise generation and the
//! accountants (RDP; PLD ε and a PLD calibration); and, on the device (a GPU in a `--features
//! cuda` build with one, else the CPU), the clip-and-reduce of 32 per-example gradients of the
//! quickstart's 74,498 values (fused kernels vs the candle-ops twin) and in-place noise on a
//! device tensor; and the CPU's exact-erf GELU forward and backward on one MiniLM MLP activation
//! (32 × 64 tokens × 1,536). Run: `cargo bench --bench dp_step`.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion};
use dptrain::accounting::{calibrate, AccountantKind, DpEvent, PldAccountant, RdpAccountant};
use dptrain::data::{Batch, Example};
use dptrain::kernels::{clip_factors, clipped_sum, per_example_sq_norms};
use dptrain::model::bert::{cross_entropy_per_example, random_weights, BertClassifier, BertConfig, LoraSpec};
use dptrain::privacy::GaussianNoise;
use dptrain::train::step::{clipped_sum_micro_batch, ClipImpl};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn model() -> BertClassifier {
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "model_type": "bert", "vocab_size": 1000, "hidden_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 128,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    }))
    .unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let w = random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(w, candle_core::DType::F32, &Device::Cpu);
    let spec = LoraSpec { rank: 8, alpha: 16.0, targets: vec!["query".into(), "value".into()], layers: None };
    BertClassifier::new(vb, cfg, Some(&spec), 2, &mut rng).unwrap()
}

fn examples() -> Vec<Example> {
    (0..16)
        .map(|i| Example::classification((0..64).map(|j| ((i * 31 + j * 7) % 999 + 1) as u32).collect(), i % 2))
        .collect()
}

fn bench_step(c: &mut Criterion) {
    let mut m = model();
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let mut g = c.benchmark_group("micro_batch_16x64");
    g.sample_size(10);
    g.bench_function("dp_lora_per_example_clip_sum", |b| {
        let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
        b.iter(|| {
            clipped_sum_micro_batch(&m, &batch, Some(1.0), ClipImpl::Fused).unwrap().sum.to_vec1::<f32>().unwrap()
        });
    });
    let originals: Vec<Tensor> = m.trainable().into_iter().map(|(_, t)| t).collect();
    let vars: Vec<Var> = originals.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    m.set_trainable(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>()).unwrap();
    // Both variants get the same pre-built batch, so only the model work is timed.
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    g.bench_function("non_private_lora_backward", |b| {
        b.iter(|| {
            let logits = m.logits(&batch.input_ids, &batch.attention_mask, None).unwrap();
            cross_entropy_per_example(&logits, &batch.labels).unwrap().sum_all().unwrap().backward().unwrap()
        });
    });
    g.finish();
}

fn bench_noise_and_accounting(c: &mut Criterion) {
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(3));
    let mut v = vec![0f32; 74_498];
    let mut step = 0u64;
    c.bench_function("noise_74k_coordinates", |b| {
        b.iter(|| {
            step += 1;
            noise.add_noise(&mut v, step, 1.0)
        })
    });
    let acc = RdpAccountant::default();
    c.bench_function("rdp_epsilon_10000_steps", |b| {
        b.iter(|| acc.epsilon(&DpEvent::dp_sgd(0.01, 1.0, 10_000), 1e-5).unwrap())
    });
    let mut g = c.benchmark_group("pld");
    g.sample_size(10);
    let pld = PldAccountant::default();
    g.bench_function("pld_epsilon_10000_steps_q0.01_sigma1", |b| {
        b.iter(|| pld.epsilon(&DpEvent::dp_sgd(0.01, 1.0, 10_000), 1e-5).unwrap())
    });
    g.bench_function("pld_calibration_eps3_q0.01_1000_steps", |b| {
        b.iter(|| calibrate(AccountantKind::Pld, 3.0, 1e-5, 0.01, 1000, 1e-3).unwrap())
    });
    g.finish();
}

/// The GPU when the build has CUDA and the machine one, else the CPU.
fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

fn bench_clip_and_noise_on_device(c: &mut Criterion) {
    let dev = device();
    let name = if dev.is_cpu() { "cpu" } else { "cuda" };
    // Per-example parts as the LoRA taps leave them: [b, …] per trainable tensor.
    let (b, p) = (32usize, 74_498usize);
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let sizes = [24 * 3072, p - 24 * 3072];
    let parts: Vec<Tensor> = sizes
        .iter()
        .map(|&n| {
            let v: Vec<f32> = (0..b * n).map(|_| rand::Rng::random_range(&mut rng, -0.01f32..0.01)).collect();
            Tensor::from_vec(v, (b, n), &dev).unwrap()
        })
        .collect();
    let flat = Tensor::cat(&parts, 1).unwrap();
    let mut g = c.benchmark_group(format!("clip_reduce_{b}x{p}_{name}"));
    g.sample_size(20);
    g.bench_function("fused_kernels", |bn| {
        bn.iter(|| {
            let sq = per_example_sq_norms(&parts).unwrap();
            let s = clipped_sum(&parts, &clip_factors(&sq, Some(1.0)).unwrap()).unwrap();
            dev.synchronize().unwrap();
            s
        })
    });
    g.bench_function("candle_ops", |bn| {
        bn.iter(|| {
            let s = dptrain::privacy::clip_and_sum(&flat, Some(1.0)).unwrap();
            dev.synchronize().unwrap();
            s
        })
    });
    g.finish();
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(3));
    let sum = Tensor::zeros(p, candle_core::DType::F32, &dev).unwrap();
    let mut step = 0u64;
    c.bench_function(&format!("noise_tensor_74k_{name}"), |bn| {
        bn.iter(|| {
            step += 1;
            noise.add_noise_tensor(&sum, step, 1.0).unwrap();
            dev.synchronize().unwrap()
        })
    });
}

fn bench_gelu(c: &mut Criterion) {
    use dptrain::model::gelu::{gelu_backward, gelu_forward};
    let n = 32 * 64 * 1536;
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, -4.0f32..4.0)).collect();
    let g: Vec<f32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0)).collect();
    let mut grp = c.benchmark_group("gelu_erf_cpu_3.1M");
    grp.bench_function("forward", |b| b.iter(|| gelu_forward(&x)));
    grp.bench_function("backward", |b| b.iter(|| gelu_backward(&x, &g)));
}

criterion_group!(benches, bench_step, bench_noise_and_accounting, bench_clip_and_noise_on_device, bench_gelu);
criterion_main!(benches);
