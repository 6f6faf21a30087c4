//! Llama-family architectures against transformers (tests/reference/families_tiny.json,
//! written by tests/reference/families_tiny.py): per family a tiny model with the family's own
//! options, its weights from a closed formula both sides compute, read from the config in the
//! transformers 5 layout (`rope_parameters`) and in the older Hub layout (`rope_theta`, plus
//! `rope_scaling` where scaled), gives transformers' logits and per-sequence mean next-token NLL
//! to 1e-4. Families: Llama 3 (`llama3` RoPE scaling; plain RoPE would not match), Qwen3
//! (per-head q/k RMSNorm; without them the logits would not match), Qwen2 (q/k/v biases; the
//! same), Mistral (sliding window longer than the sequences), Phi-3 (fused qkv_proj and
//! gate_up_proj, untied head), Gemma 2 (its norms, GeGLU, embedding scale and soft caps; without
//! the caps it would not match) and Gemma 3 (q/k norms, a RoPE per layer type; with one RoPE it
//! would not match). The RoBERTa encoder (and
//! XLM-R, the same architecture) gives transformers' last hidden states and masked mean over a
//! batch with a right-padded sequence (read as BERT, without the position offset, it would not);
//! so does DistilBERT (its own weight names, no token types).
//! Also: the inverse frequencies of Llama-3.2-1B's RoPE settings equal transformers'.

use candle_core::{DType, Device, IndexOp, Tensor};
use dptrain::data::{Batch, Example};
use dptrain::model::{DpModel, LlamaConfig, LlamaLm};
use std::collections::HashMap;

fn reference() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/families_tiny.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The formula of families_tiny.py.
fn formula(name: &str, shape: &[usize]) -> Tensor {
    let seed: u64 = name.bytes().enumerate().map(|(i, c)| c as u64 * (i as u64 + 1)).sum::<u64>() % 1009;
    let n: usize = shape.iter().product();
    let norm = name.to_lowercase().ends_with("norm.weight");
    let v: Vec<f32> = (0..n as u64)
        .map(|k| {
            let x = ((k * 7919 + seed * 104729) % 2003) as f64 / 2003.0 - 0.5;
            (if norm { 1.0 + 0.2 * x } else { 0.2 * x }) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn model(cfg: LlamaConfig) -> LlamaLm {
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
    let shapes = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = shapes.iter().map(|(n, t)| (n.clone(), formula(n, t.dims()))).collect();
    LlamaLm::new(candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), cfg, None, &mut rng).unwrap()
}

/// The reference config in the older Hub layout: top-level `rope_theta`, a scaling in
/// `rope_scaling` (as Llama 3.x folders on the Hub have it), plain RoPE with no `rope_scaling`.
/// Gemma: no `layer_types` (Gemma 2 alternates from a sliding layer; Gemma 3 follows
/// `sliding_window_pattern`), and Gemma 3's two RoPEs as `rope_theta` / `rope_scaling` (global)
/// and `rope_local_base_freq` (sliding), as its Hub folders write them.
fn older_layout(v5: &serde_json::Value) -> serde_json::Value {
    let mut c = v5.clone();
    let m = c.as_object_mut().unwrap();
    if m["model_type"].as_str().unwrap().starts_with("gemma") {
        assert_eq!(m.remove("layer_types").unwrap(), serde_json::json!(["sliding_attention", "full_attention"]));
        if m.remove("_sliding_window_pattern").is_some() {
            m.insert("sliding_window_pattern".into(), 2.into());
            let mut per_type = m.remove("rope_parameters").unwrap();
            let local = per_type["sliding_attention"].as_object_mut().unwrap();
            assert_eq!(local.remove("rope_type").unwrap(), "default");
            m.insert("rope_local_base_freq".into(), local.remove("rope_theta").unwrap());
            m.insert("rope_parameters".into(), per_type["full_attention"].clone());
        }
    }
    let mut rope = m.remove("rope_parameters").unwrap();
    let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
    m.insert("rope_theta".into(), theta);
    if rope["rope_type"] != "default" {
        m.insert("rope_scaling".into(), rope);
    }
    c
}

/// Largest |logit − reference| of `m` over the reference's positions.
fn logit_error(m: &LlamaLm, ids: &[Vec<u32>], positions: &[usize], want: &[Vec<Vec<f64>>]) -> (f64, String) {
    let input = Tensor::new(ids.to_vec(), &Device::Cpu).unwrap();
    let logits = m.logits(&input).unwrap();
    let mut worst = (0.0f64, String::new());
    for (b, rows) in want.iter().enumerate() {
        for (k, &p) in positions.iter().enumerate() {
            let got: Vec<f32> = logits.i((b, p)).unwrap().to_vec1().unwrap();
            for (v, (&g, &w)) in got.iter().zip(&rows[k]).enumerate() {
                let e = (g as f64 - w).abs() / w.abs().max(1.0);
                if e > worst.0 {
                    worst = (e, format!("sequence {b}, position {p}, token {v}: {g} vs {w}"));
                }
            }
        }
    }
    worst
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-4 * want.abs().max(1.0)
}

#[test]
fn every_llama_family_matches_transformers_in_both_config_layouts() {
    let r = reference();
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let positions: Vec<usize> = serde_json::from_value(r["positions"].clone()).unwrap();
    for family in ["llama3", "qwen3", "qwen2", "mistral", "phi3", "gemma2", "gemma3"] {
        let f = &r[family];
        let want_logits: Vec<Vec<Vec<f64>>> = serde_json::from_value(f["logits"].clone()).unwrap();
        let want_nll: Vec<f64> = serde_json::from_value(f["mean_nll"].clone()).unwrap();
        let v5 = f["config"].clone();
        assert!(v5.get("rope_scaling").is_none() && v5["rope_parameters"].is_object(), "{family}");
        if family.starts_with("gemma") {
            assert!(LlamaConfig::from_json(&v5.to_string()).unwrap().is_gemma(), "{family}");
        }
        for (layout, cfg) in [("transformers 5", v5.clone()), ("older Hub", older_layout(&v5))] {
            let cfg = LlamaConfig::from_json(&cfg.to_string()).unwrap_or_else(|e| panic!("{family}, {layout}: {e}"));
            let m = model(cfg.clone());
            let (err, at) = logit_error(&m, &ids, &positions, &want_logits);
            assert!(err <= 1e-4, "{family}, {layout}: relative error {err} at {at}");
            // Each sequence's mean next-token NLL through the training loss (every token after
            // the first is a target).
            let exs: Vec<Example> =
                ids.iter().map(|s| Example { ids: s.clone(), label: 0, target_start: Some(1) }).collect();
            let batch = Batch::gather(&exs, &[0, 1], None, &Device::Cpu).unwrap();
            let nll: Vec<f32> = m.example_losses(&batch, None).unwrap().to_vec1().unwrap();
            for (b, (&g, &w)) in nll.iter().zip(&want_nll).enumerate() {
                assert!(close(g as f64, w), "{family}, {layout}: sequence {b}: NLL {g} vs {w}");
            }
        }
        // The family's own option is what makes it match: without it the same weights do not.
        let mut without = LlamaConfig::from_json(&v5.to_string()).unwrap();
        match family {
            "llama3" => {
                without.rope_parameters = Some(serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}));
                let plain: Vec<f64> = serde_json::from_value(f["mean_nll_without"].clone()).unwrap();
                assert!(want_nll.iter().zip(&plain).all(|(a, b)| !close(*a, *b)), "{want_nll:?} vs {plain:?}");
            }
            // Mistral is Llama with a sliding window (here longer than the sequences): nothing to
            // switch off.
            // Phi-3's fused projections are its weight layout: read any other way it does not load.
            "mistral" | "phi3" => continue,
            // Gemma 2 without its soft caps.
            "gemma2" => {
                without.attn_logit_softcapping = None;
                without.final_logit_softcapping = None;
            }
            // Gemma 3 with one RoPE (the global layer's) on both layers.
            "gemma3" => {
                let mut p = without.rope_parameters.clone().unwrap();
                p["sliding_attention"] = p["full_attention"].clone();
                without.rope_parameters = Some(p);
            }
            "qwen2" | "qwen3" => {
                // The same model read as a Llama: no q/k norms, no q/k/v biases (their tensors are
                // then unused).
                without.model_type = Some("llama".into());
                for k in ["layer_types", "max_window_layers", "sliding_window", "use_sliding_window"] {
                    without.other.remove(k);
                }
                without.layer_types = None;
                without.max_window_layers = None;
                without.sliding_window = None;
                without.use_sliding_window = None;
            }
            _ => unreachable!(),
        }
        let (err, _) = logit_error(&model(without), &ids, &positions, &want_logits);
        assert!(err > 1e-3, "{family}: without its option the logits still match ({err})");
    }
}

#[test]
fn llama_3_2_1b_inverse_frequencies_equal_transformers() {
    let r = reference();
    let want: Vec<f64> = serde_json::from_value(r["llama_3_2_1b_inv_freq"].clone()).unwrap();
    assert_eq!(r["llama_3_2_1b_attention_scaling"].as_f64(), Some(1.0));
    let rope = dptrain::model::llama::Rope {
        theta: 500_000.0,
        llama3: Some(dptrain::model::llama::Llama3Scaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }),
        linear: None,
    };
    let got = rope.inv_freqs(64);
    assert_eq!(got.len(), want.len());
    let plain = dptrain::model::llama::Rope::plain(500_000.0).inv_freqs(64);
    let mut scaled = 0;
    for (j, ((&g, &w), &p)) in got.iter().zip(&want).zip(&plain).enumerate() {
        // transformers computes them in f32.
        assert!((g - w).abs() <= 1e-6 * w, "frequency {j}: {g} vs {w}");
        scaled += usize::from((p - w).abs() > 1e-6 * w);
    }
    // The low frequencies are divided by 32 and a few in between are interpolated.
    assert!(scaled > 10 && scaled < 32, "{scaled} of 32 frequencies scaled");
}

#[test]
fn the_roberta_and_distilbert_encoders_match_transformers_and_xlm_r_reads_as_roberta() {
    use dptrain::model::{BertClassifier, BertConfig};
    let r = reference();
    for family in ["roberta", "distilbert"] {
        let f = &r[family];
        let ids: Vec<Vec<u32>> = serde_json::from_value(f["input_ids"].clone()).unwrap();
        let lengths: Vec<usize> = serde_json::from_value(f["lengths"].clone()).unwrap();
        let positions: Vec<usize> = serde_json::from_value(f["positions"].clone()).unwrap();
        let want_hidden: Vec<Vec<Vec<f64>>> = serde_json::from_value(f["hidden"].clone()).unwrap();
        let want_pooled: Vec<Vec<f64>> = serde_json::from_value(f["pooled"].clone()).unwrap();
        let t = ids[0].len();
        let mask: Vec<Vec<f32>> =
            lengths.iter().map(|&n| (0..t).map(|i| if i < n { 1.0 } else { 0.0 }).collect()).collect();
        let (input, mask) = (Tensor::new(ids.clone(), &Device::Cpu).unwrap(), Tensor::new(mask, &Device::Cpu).unwrap());
        // (largest relative error of the hidden states, of the pooled features)
        let errors = |config: serde_json::Value| -> (f64, f64) {
            let cfg = BertConfig::from_json(&config.to_string()).unwrap_or_else(|e| panic!("{family}: {e}"));
            let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
            let shapes = dptrain::model::bert::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
            let w: HashMap<String, Tensor> = shapes.iter().map(|(n, t)| (n.clone(), formula(n, t.dims()))).collect();
            let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
            let m = BertClassifier::new(vb, cfg, None, 2, &mut rng).unwrap();
            let hidden = m.encode(&input, &mask, None).unwrap();
            let pooled: Vec<Vec<f32>> = m.pooled(&input, &mask, None).unwrap().to_vec2().unwrap();
            let rel = |g: f32, w: f64| (g as f64 - w).abs() / w.abs().max(1.0);
            let mut eh = 0.0f64;
            for (b, rows) in want_hidden.iter().enumerate() {
                for (k, &p) in positions.iter().enumerate() {
                    let got: Vec<f32> = hidden.i((b, p)).unwrap().to_vec1().unwrap();
                    eh = got.iter().zip(&rows[k]).fold(eh, |m, (&g, &w)| m.max(rel(g, w)));
                }
            }
            let ep =
                pooled.iter().flatten().zip(want_pooled.iter().flatten()).fold(0.0f64, |m, (&g, &w)| m.max(rel(g, w)));
            (eh, ep)
        };
        let config = f["config"].clone();
        assert_eq!(config["model_type"], family);
        let (eh, ep) = errors(config.clone());
        assert!(eh <= 1e-4 && ep <= 1e-4, "{family}: hidden {eh}, pooled {ep}");
        if family == "roberta" {
            let mut xlmr = config.clone();
            xlmr["model_type"] = "xlm-roberta".into();
            assert_eq!(errors(xlmr), (eh, ep));
            // Read as BERT (positions from 0) the same weights give other features.
            let mut bert = config;
            bert["model_type"] = "bert".into();
            let (_, ep) = errors(bert);
            assert!(ep > 1e-3, "without the position offset the pooled features still match ({ep})");
        }
    }
}
