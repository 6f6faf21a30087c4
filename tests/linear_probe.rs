//! Claims about the DP linear probe (`training.linear-probe-epochs`): on cached pooled features it
//! computes exactly the full model's per-example losses and head gradients (and those equal the
//! closed form (softmax − onehot) ⊗ h in f64); a run spends its first steps on the head alone
//! (LoRA untouched, head trained), with every step in the ledger at the run's q and σ; it resumes
//! across the probe's end to the same adapter; and a stop inside the probe is refused.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dptrain::data::{Batch, Example, MicroBatchLimits};
use dptrain::lora::Tape;
use dptrain::model::bert::{BertClassifier, LoraSpec};
use dptrain::model::probe::{probe_data, LinearProbe};
use dptrain::model::DpModel;
use dptrain::privacy::per_example_grad_parts;
use dptrain::train::eval::feature_cache;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::path::Path;

fn examples() -> Vec<Example> {
    let lens = [5usize, 3, 11, 8, 6, 2, 9];
    let mut s = 29u32;
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let ids = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(1103515245).wrapping_add(12345);
                    1 + (s >> 16) % 49
                })
                .collect();
            Example::classification(ids, i % 3)
        })
        .collect()
}

/// A tiny BERT with LoRA on query/value of `layers` and random (non-zero) trainable tensors.
fn model(layers: Option<Vec<usize>>, seed: u64) -> BertClassifier {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = common::tiny_weights(&mut rng);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let spec = LoraSpec { rank: 3, alpha: 6.0, targets: vec!["query".into(), "value".into()], layers };
    let mut m = BertClassifier::new(vb, common::tiny_config(), Some(&spec), 3, &mut rng).unwrap();
    let random: Vec<Tensor> = m.trainable().iter().map(|(_, t)| common::rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    m.set_trainable(&random).unwrap();
    m
}

fn losses_and_head_grads(
    m: &dyn DpModel,
    exs: &[Example],
    cache: Option<&dptrain::data::FeatureCache>,
) -> (Vec<f32>, Vec<Vec<Vec<f32>>>) {
    let all: Vec<usize> = (0..exs.len()).collect();
    let batch = Batch::gather(exs, &all, cache, &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    let losses = m.example_losses(&batch, Some(&mut tape)).unwrap();
    losses.sum_all().unwrap().backward().unwrap();
    let parts = per_example_grad_parts(m, &tape).unwrap();
    let head = parts[parts.len() - 2..].iter().map(|p| p.to_vec2::<f32>().unwrap()).collect();
    (losses.to_vec1().unwrap(), head)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn the_probe_on_pooled_features_computes_the_full_models_losses_and_per_example_head_gradients() {
    for (layers, seed) in [(None, 3u64), (Some(vec![1]), 5)] {
        let m = model(layers.clone(), seed);
        let exs = examples();
        let limits = MicroBatchLimits { examples: 3, tokens: None };
        let cache = feature_cache(&m, &exs, limits).unwrap();
        assert_eq!(cache.is_some(), layers.is_some());
        let (probe_exs, probe_cache) = probe_data(&m, &exs, cache.as_ref(), limits).unwrap();
        let probe = LinearProbe::new(m.head_w.clone(), m.head_b.clone()).unwrap();
        let (full_loss, full_head) = losses_and_head_grads(&m, &exs, cache.as_ref());
        let (probe_loss, probe_head) = losses_and_head_grads(&probe, &probe_exs, Some(&probe_cache));
        assert!(max_rel(&probe_loss, &full_loss) < 1e-5, "losses {probe_loss:?} vs {full_loss:?}");
        for (k, name) in ["head W", "head b"].iter().enumerate() {
            for i in 0..exs.len() {
                let e = max_rel(&probe_head[k][i], &full_head[k][i]);
                assert!(e < 1e-5, "layers {layers:?}, example {i}, {name}: {e}");
            }
        }
        // The slow twin: (softmax(W h + b) − onehot(y)) ⊗ h in f64 from the cached features.
        let wv: Vec<Vec<f32>> = probe.head_w.to_vec2().unwrap();
        let bv: Vec<f32> = probe.head_b.to_vec1().unwrap();
        for (i, e) in exs.iter().enumerate() {
            let h: Vec<f64> = probe_cache.hidden[i].iter().map(|&v| v as f64).collect();
            let z: Vec<f64> = wv
                .iter()
                .zip(&bv)
                .map(|(row, &b)| row.iter().zip(&h).map(|(&w, x)| w as f64 * x).sum::<f64>() + b as f64)
                .collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
            let g: Vec<f64> =
                z.iter().enumerate().map(|(c, v)| (v - mx).exp() / sum - (c == e.label) as u8 as f64).collect();
            let dw: Vec<f32> = g.iter().flat_map(|gc| h.iter().map(move |x| (gc * x) as f32)).collect();
            let db: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            assert!(max_rel(&probe_head[0][i], &dw) < 1e-5, "example {i}: head W against the closed form");
            assert!(max_rel(&probe_head[1][i], &db) < 1e-5, "example {i}: head b against the closed form");
            assert!(g.iter().any(|v| v.abs() > 1e-3), "a vacuous gradient");
        }
    }
}

/// A seeded DP run of 1 probe epoch (48 records, L = 8: 6 steps) then 5 LoRA steps.
const PROBE_RUN: &str = "expected-batch-size = 8\nmax-physical-batch = 3\nsteps = 5\nlearning-rate = 0.05\nseed = 7\n\
                         linear-probe-epochs = 1.0\nlinear-probe-learning-rate = 0.1\ncheckpoint-every = 0";

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("release/privacy_report.json")).unwrap()).unwrap()
}

#[test]
fn a_probe_run_trains_the_head_alone_first_accounts_every_step_and_resumes_to_the_same_adapter() {
    let f = common::TinyRunDir::new("probe", "run");
    let cfg = f.config("parts", 6.0, PROBE_RUN);
    // A stop inside the probe is refused before anything runs (the probe writes no checkpoints).
    let (ok, log) = common::dptrain(&["--config", &cfg, "--stop-after-step", "3"]);
    assert!(!ok && log.contains("inside the linear probe") && log.contains("steps 1..6"), "{log}");
    // Stopped right after the probe: the checkpoint's LoRA B are all zero (LoRA untouched, so the
    // features the probe used were the frozen model's), its LoRA A the initial ones, its head trained.
    let (ok, log) = common::dptrain(&["--config", &cfg, "--stop-after-step", "6"]);
    assert!(!ok && log.contains("after step 6 of 11"), "{log}");
    let ck_dir = std::fs::read_dir(f.out("parts").join("private/checkpoints")).unwrap().next().unwrap().unwrap().path();
    let ck = dptrain::train::checkpoint::Checkpoint::read(&ck_dir).unwrap();
    assert_eq!(
        ck.state.ledger,
        dptrain::accounting::event::Ledger::uniform(ck.state.sample_rate, ck.state.noise_multiplier, 6)
    );
    let shapes = {
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let spec = LoraSpec { rank: 2, alpha: 4.0, targets: vec!["query".into(), "value".into()], layers: None };
        let m = BertClassifier::load(&f.out("model"), Some(&spec), 2, &mut rng, &Device::Cpu).unwrap();
        m.trainable().into_iter().map(|(n, t)| (n, t.elem_count())).collect::<Vec<_>>()
    };
    let mut offset = 0;
    let (mut head_norm, mut a_norm) = (0f64, 0f64);
    for (name, len) in &shapes {
        let v = &ck.params[offset..offset + len];
        offset += len;
        let norm: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
        if name.contains("lora_B") {
            assert_eq!(norm, 0.0, "{name} moved during the probe");
        } else if name.contains("lora_A") {
            a_norm += norm;
        } else {
            head_norm += norm;
        }
    }
    assert_eq!(offset, ck.params.len());
    assert!(head_norm > 0.0 && a_norm > 0.0, "head {head_norm}, A {a_norm}");
    // Resumed to the end, it equals an uninterrupted run bit for bit, and both account 11 steps.
    let (ok, log) = common::dptrain(&["--config", &cfg, "--resume", &f.out("parts").display().to_string()]);
    assert!(ok, "{log}");
    let (ok, log) = common::dptrain(&["--config", &cfg, "--out", &f.out("full").display().to_string()]);
    assert!(ok, "{log}");
    let read = |d: &Path| std::fs::read(d.join("release/adapter_model.safetensors")).unwrap();
    assert_eq!(read(&f.out("parts")), read(&f.out("full")));
    let r = report(&f.out("full"));
    assert_eq!(
        (r["steps"].as_u64(), r["planned_steps"].as_u64(), r["linear_probe_steps"].as_u64()),
        (Some(11), Some(11), Some(6))
    );
    let (q, sigma) = (r["sample_rate"].as_f64().unwrap(), r["noise_multiplier"].as_f64().unwrap());
    let ledger: dptrain::accounting::event::Ledger = serde_json::from_value(r["ledger"].clone()).unwrap();
    assert_eq!(ledger, dptrain::accounting::event::Ledger::uniform(q, sigma, 11));
    assert!(r["epsilon"].as_f64().unwrap() <= 6.0);
    // σ was calibrated for all 11 steps: the same config without the probe (5 steps) needs less.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("linear-probe-epochs = 1.0\nlinear-probe-learning-rate = 0.1\n", "");
    let plain = f.dir.join("plain.toml");
    std::fs::write(&plain, text).unwrap();
    let (ok, log) =
        common::dptrain(&["--config", &plain.display().to_string(), "--out", &f.out("plain").display().to_string()]);
    assert!(ok, "{log}");
    assert!(report(&f.out("plain"))["noise_multiplier"].as_f64().unwrap() < sigma);
    let md = std::fs::read_to_string(f.out("full").join("release/privacy_report.md")).unwrap();
    assert!(md.contains("the first 6 steps trained the head alone"), "{md}");
    // verify re-derives every headline from the ledger: the only failure is the seeded run's.
    let (_, log) = common::dptrain(&["verify", &f.out("full").display().to_string()]);
    let failed: Vec<&str> = log.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.len() == 1 && failed[0].contains("not seeded"), "{log}");
}
