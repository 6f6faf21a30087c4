//! Claims about one logical DP-SGD step on a tiny random BERT: an empty Poisson batch still adds
//! noise, the noisy sum is divided by the expected (not realised) batch size, micro-batching gives
//! the one-shot result, and a seeded step reproduces bit for bit (and another seed gives other noise
//! of the right size).

mod common;

use dptrain::data::Example;
use dptrain::privacy::GaussianNoise;
use dptrain::train::step::{private_gradient, private_gradient_with, ClipImpl, Mechanism};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example::classification((0..(3 + i % 7)).map(|j| ((i * 7 + j * 3) % 49 + 1) as u32).collect(), i % 2))
        .collect()
}

fn vec1(t: candle_core::Tensor) -> Vec<f32> {
    t.to_vec1().unwrap()
}

fn num_params(m: &dptrain::model::BertClassifier) -> usize {
    m.trainable().iter().map(|(_, t)| t.elem_count()).sum()
}

#[test]
fn empty_poisson_batch_still_adds_noise() {
    let model = common::tiny_bert(5, &["query", "value"], 2);
    let p = num_params(&model);
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(1.0), noise_multiplier: 2.0, expected_batch_size: 8 };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(1));
    let (g, rep) = private_gradient(&model, &examples(10), None, &[], 4, p, &mech, &noise, 0).unwrap();
    let g: Vec<f32> = g.to_vec1().unwrap();
    assert_eq!(rep.batch_size, 0);
    assert_eq!(rep.noised_coordinates, p);
    // Pure noise: N(0, (σC/L)²) per coordinate; its sample std is within 20% for p in the hundreds (6 sd).
    let std = (g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / p as f64).sqrt();
    let want = 2.0 * 1.0 / 8.0;
    assert!(p > 500 && (std / want - 1.0).abs() < 0.2, "std {std} vs {want} over {p} coordinates");
}

#[test]
fn gradient_is_divided_by_expected_not_realised_batch_size() {
    let model = common::tiny_bert(6, &["query", "value"], 2);
    let p = num_params(&model);
    let exs = examples(12);
    let idx = [0usize, 3, 5];
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(1));
    let run = |l: usize, noise: &GaussianNoise| {
        let mech =
            Mechanism { clip_kind: Default::default(), clip: Some(0.5), noise_multiplier: 0.0, expected_batch_size: l };
        vec1(private_gradient(&model, &exs, None, &idx, 8, p, &mech, noise, 0).unwrap().0)
    };
    let g10 = run(10, &noise);
    let g40 = run(40, &noise);
    // Same clipped sum, divided by 10 vs 40, whatever the realised size (3).
    for (a, b) in g10.iter().zip(&g40) {
        assert!((a / 4.0 - b).abs() <= 1e-7 + 1e-6 * b.abs());
    }
    let norm = g10.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > 0.0 && norm <= 3.0 * 0.5 / 10.0 + 1e-6, "‖Σ clipped‖/L ≤ bC/L, got {norm}");
}

#[test]
fn micro_batches_give_the_one_shot_result() {
    let model = common::tiny_bert(7, &["query", "key", "value", "intermediate.dense"], 2);
    let p = num_params(&model);
    let exs = examples(11);
    let idx: Vec<usize> = (0..11).collect();
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(0.3), noise_multiplier: 0.0, expected_batch_size: 11 };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(1));
    let one = vec1(private_gradient(&model, &exs, None, &idx, 64, p, &mech, &noise, 0).unwrap().0);
    let many = vec1(private_gradient(&model, &exs, None, &idx, 3, p, &mech, &noise, 0).unwrap().0);
    let limits = dptrain::data::MicroBatchLimits { examples: 64, tokens: Some(20) };
    let by_tokens = vec1(private_gradient(&model, &exs, None, &idx, limits, p, &mech, &noise, 0).unwrap().0);
    let scale = one.iter().fold(0f32, |m, v| m.max(v.abs()));
    for ((a, b), c) in one.iter().zip(&many).zip(&by_tokens) {
        assert!((a - b).abs() <= 1e-5 * scale && (a - c).abs() <= 1e-5 * scale);
    }
}

#[test]
fn seeded_step_reproduces_bit_for_bit() {
    let model = common::tiny_bert(8, &["query", "value"], 2);
    let p = num_params(&model);
    let exs = examples(9);
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(1.0), noise_multiplier: 1.1, expected_batch_size: 4 };
    let step = |seed: u64| {
        let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(seed));
        vec1(private_gradient(&model, &exs, None, &[1, 2, 6], 2, p, &mech, &noise, 0).unwrap().0)
    };
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(step(99)), bits(step(99)));
    // ... and the seed is what it reproduces: another seed's noise differs by N(0, 2(σC/L)²) per
    // coordinate (same clipped sum, independent noise), so the sample std of the difference is
    // √2·σC/L within 6 of its sd ≈ std/√(2p). Without noise the difference is 0 and this fails.
    let (a, b) = (step(99), step(100));
    let sd = (a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / p as f64).sqrt();
    let want = 2f64.sqrt() * 1.1 * 1.0 / 4.0;
    let tol = 6.0 / (2.0 * p as f64).sqrt();
    assert!(
        p > 500 && (sd / want - 1.0).abs() < tol,
        "std of the seed difference {sd} vs {want} (±{tol:.3} relative, p = {p})"
    );
}

#[test]
fn cached_frozen_prefix_gives_the_full_forward_gradient() {
    // LoRA only in layer 1: layer 0 is frozen, its output is cached once per record.
    let mut rng = ChaCha20Rng::seed_from_u64(31);
    let w = common::tiny_weights(&mut rng);
    let vb = candle_nn::VarBuilder::from_tensors(w, candle_core::DType::F32, &candle_core::Device::Cpu);
    let spec = dptrain::model::bert::LoraSpec {
        rank: 3,
        alpha: 6.0,
        targets: vec!["query".into(), "value".into(), "output.dense".into()],
        layers: Some(vec![1]),
    };
    let mut model = dptrain::model::BertClassifier::new(vb, common::tiny_config(), Some(&spec), 2, &mut rng).unwrap();
    let random: Vec<candle_core::Tensor> =
        model.trainable().iter().map(|(_, t)| common::rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    model.set_trainable(&random).unwrap();
    assert_eq!(model.first_adapted_layer(), 1);
    let exs = examples(10);
    let cache = dptrain::train::eval::feature_cache(&model, &exs, 4).unwrap().expect("layer 0 is cacheable");
    let p = num_params(&model);
    let idx: Vec<usize> = (0..10).collect();
    let mech =
        Mechanism { clip_kind: Default::default(), clip: Some(0.7), noise_multiplier: 0.0, expected_batch_size: 10 };
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(1));
    let full = vec1(private_gradient(&model, &exs, None, &idx, 3, p, &mech, &noise, 0).unwrap().0);
    let cached = vec1(private_gradient(&model, &exs, Some(&cache), &idx, 3, p, &mech, &noise, 0).unwrap().0);
    let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (a, b) in full.iter().zip(&cached) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

#[test]
fn fused_clip_path_equals_candle_ops_path() {
    // The kernels (here their CPU twins) against the concatenate-then-candle-ops clip, inside the
    // whole step: clipped or not, with noise (same key and step).
    let model = common::tiny_bert(9, &["query", "value", "output.dense"], 3);
    let p = num_params(&model);
    let exs = examples(13);
    let idx: Vec<usize> = (0..13).filter(|i| i % 4 != 1).collect();
    let noise = GaussianNoise::new(ChaCha20Rng::seed_from_u64(4));
    for (clip, sigma) in [(Some(0.2), 0.0), (Some(0.2), 1.3), (None, 0.0)] {
        let mech = Mechanism { clip_kind: Default::default(), clip, noise_multiplier: sigma, expected_batch_size: 10 };
        let run = |how| {
            let (g, rep) = private_gradient_with(&model, &exs, None, &idx, 4, p, &mech, &noise, 3, how).unwrap();
            (vec1(g), rep.clipped)
        };
        let ((fused, c1), (slow, c2)) = (run(ClipImpl::Fused), run(ClipImpl::CandleOps));
        assert_eq!(c1, c2, "clipped counts differ");
        let scale = slow.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (a, b) in fused.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-5 * scale, "C = {clip:?}, σ = {sigma}: {a} vs {b}");
        }
    }
}

/// Claim: per-layer clipping clips each adapted layer's (A, B) gradient and the head's (W, b)
/// separately to C/√G: the step's clipped sum equals an f64 twin built from the per-example
/// gradients group by group, and every single example's clipped gradient has norm ≤ C overall
/// (with some groups clipped while others pass unchanged).
#[test]
fn per_layer_clipping_clips_each_group_to_c_over_root_g_and_the_whole_to_c() {
    use dptrain::data::Batch;
    use dptrain::lora::Tape;
    use dptrain::model::DpModel;
    use dptrain::privacy::clip::CLIP_MARGIN as MARGIN;
    use dptrain::privacy::{per_example_grad_parts, ClipKind};
    use dptrain::train::step::clipped_sum_micro_batch_kind;
    let model = common::tiny_bert(9, &["query", "value"], 3);
    let exs = examples(7);
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &candle_core::Device::Cpu).unwrap();
    let c = 0.5;
    // The twin: per-example parts (checked against one-at-a-time passes elsewhere), grouped in pairs.
    let mut tape = Tape::default();
    model.example_losses(&batch, Some(&mut tape)).unwrap().sum_all().unwrap().backward().unwrap();
    let parts: Vec<Vec<Vec<f32>>> =
        per_example_grad_parts(&model, &tape).unwrap().iter().map(|p| p.to_vec2().unwrap()).collect();
    let g = parts.len() / 2;
    assert_eq!(g, 2 * 2 + 1, "q and v in two layers, and the head");
    let cg = c * MARGIN / (g as f64).sqrt();
    let p: usize = parts.iter().map(|t| t[0].len()).sum();
    let mut want = vec![0f64; p];
    let (mut clipped_groups, mut passed_groups) = (0, 0);
    for i in 0..exs.len() {
        let mut offset = 0;
        for pair in parts.chunks(2) {
            let norm = pair.iter().flat_map(|t| &t[i]).map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let f = (cg / (norm + 1e-6)).min(1.0);
            if f < 1.0 {
                clipped_groups += 1
            } else {
                passed_groups += 1
            }
            for t in pair {
                for (j, &v) in t[i].iter().enumerate() {
                    want[offset + j] += f * v as f64;
                }
                offset += t[i].len();
            }
        }
    }
    assert!(clipped_groups > 0 && passed_groups > 0, "{clipped_groups} clipped, {passed_groups} passed");
    let got: Vec<f32> = clipped_sum_micro_batch_kind(&model, &batch, Some(c), ClipKind::PerLayer, ClipImpl::Fused)
        .unwrap()
        .sum
        .to_vec1()
        .unwrap();
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (a, w) in got.iter().zip(&want) {
        assert!((*a as f64 - w).abs() <= 1e-5 * scale, "{a} vs {w}");
    }
    for e in &exs {
        let one = Batch::from_examples(&[e], &candle_core::Device::Cpu).unwrap();
        let s: Vec<f32> = clipped_sum_micro_batch_kind(&model, &one, Some(c), ClipKind::PerLayer, ClipImpl::Fused)
            .unwrap()
            .sum
            .to_vec1()
            .unwrap();
        let norm = s.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= c, "an example's clipped gradient has norm {norm} > C");
    }
}
