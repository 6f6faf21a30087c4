//! Claims about the Llama-family model: per-example gradients of every LoRA tensor equal
//! one-example-at-a-time backward passes (GQA, tied and untied embeddings, Qwen2 biases, padded
//! variable-length batches, prompt tokens excluded from the loss); padding and prompt positions
//! get exactly zero gradient; GQA equals full attention with duplicated key/value heads; RoPE is
//! the rotate-half rotation; B = 0 gives the base model.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use dptrain::data::{Batch, Example};
use dptrain::lora::Tape;
use dptrain::model::llama::{rope, rope_tables, LLAMA_LORA_MODULES};
use dptrain::model::{DpModel, LlamaLm};
use dptrain::privacy::per_example_grads;

/// Variable lengths (padded batch); some records score every token after the first (plain
/// text), others only a completion after a prompt.
fn examples() -> Vec<Example> {
    let lens_starts = [(5usize, 1usize), (3, 1), (11, 4), (8, 2), (6, 1)];
    let mut s = 29u32;
    lens_starts
        .iter()
        .map(|&(len, start)| {
            let ids = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(1103515245).wrapping_add(12345);
                    (s >> 16) % 50
                })
                .collect();
            Example { ids, label: 0, target_start: Some(start) }
        })
        .collect()
}

fn one_at_a_time(model: &mut LlamaLm, e: &Example) -> Vec<Vec<f32>> {
    let originals: Vec<Tensor> = model.trainable().into_iter().map(|(_, t)| t).collect();
    let vars: Vec<Var> = originals.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    model.set_trainable(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>()).unwrap();
    let batch = Batch::from_examples(&[e], &Device::Cpu).unwrap();
    let loss = model.example_losses(&batch, None).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let out = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("every LoRA tensor gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    model.set_trainable(&originals).unwrap();
    out
}

fn check(targets: &[&str], cfg: dptrain::model::LlamaConfig, seed: u64) {
    let mut model = common::tiny_llama(seed, targets, cfg);
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    model.example_losses(&batch, Some(&mut tape)).unwrap().sum_all().unwrap().backward().unwrap();
    let fast: Vec<Vec<f32>> = per_example_grads(&model, &tape).unwrap().to_vec2().unwrap();
    let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(!names.is_empty());
    for (i, e) in exs.iter().enumerate() {
        let slow = one_at_a_time(&mut model, e);
        let mut offset = 0;
        for (k, s) in slow.iter().enumerate() {
            let f = &fast[i][offset..offset + s.len()];
            offset += s.len();
            let scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "example {i}, {}: zero reference gradient makes the test vacuous", names[k]);
            let err = f.iter().zip(s).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale, "example {i}, {}: max error {err} vs scale {scale}", names[k]);
        }
        assert_eq!(offset, fast[i].len());
    }
}

#[test]
fn per_example_grads_match_one_at_a_time_on_every_module_with_gqa_and_tied_embeddings() {
    check(&LLAMA_LORA_MODULES, common::tiny_llama_config(true, "llama"), 1);
}

#[test]
fn per_example_grads_match_one_at_a_time_untied_qwen2_with_qkv_biases() {
    check(&["q_proj", "v_proj", "down_proj"], common::tiny_llama_config(false, "qwen2"), 2);
}

#[test]
fn per_example_grads_match_one_at_a_time_qwen3_through_its_query_and_key_norms() {
    check(&["q_proj", "k_proj", "o_proj"], common::tiny_llama_config(true, "qwen3"), 4);
}

#[test]
fn per_example_grads_match_one_at_a_time_phi3_through_its_fused_projections() {
    check(&["qkv_proj", "gate_up_proj", "down_proj"], common::tiny_llama_config(false, "phi3"), 5);
}

/// A tiny Gemma config: the sliding window (16) is longer than every test sequence; the soft caps
/// are small enough to bend these scores and logits.
fn tiny_gemma_config(model_type: &str) -> dptrain::model::LlamaConfig {
    let mut c = serde_json::json!({
        "model_type": model_type, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 12, "sliding_window": 16,
        "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, "eos_token_id": 3
    });
    if model_type == "gemma3_text" {
        c["rope_local_base_freq"] = 100.0.into();
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 4.0});
        c["sliding_window_pattern"] = 2.into();
    }
    dptrain::model::LlamaConfig::from_json(&c.to_string()).unwrap()
}

#[test]
fn per_example_grads_match_one_at_a_time_gemma2_through_its_soft_caps_and_geglu() {
    check(&LLAMA_LORA_MODULES, tiny_gemma_config("gemma2"), 6);
}

#[test]
fn per_example_grads_match_one_at_a_time_gemma3_through_its_query_and_key_norms_and_two_ropes() {
    check(&["q_proj", "k_proj", "v_proj", "up_proj"], tiny_gemma_config("gemma3_text"), 7);
}

#[test]
fn padding_does_not_change_an_examples_loss() {
    let model = common::tiny_llama(3, &LLAMA_LORA_MODULES, common::tiny_llama_config(true, "llama"));
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let padded: Vec<f32> =
        model.example_losses(&Batch::from_examples(&refs, &Device::Cpu).unwrap(), None).unwrap().to_vec1().unwrap();
    for (i, e) in exs.iter().enumerate() {
        let alone: Vec<f32> =
            model.example_losses(&Batch::from_examples(&[e], &Device::Cpu).unwrap(), None).unwrap().to_vec1().unwrap();
        assert!((padded[i] - alone[0]).abs() < 1e-5, "example {i}: {} vs {}", padded[i], alone[0]);
        assert!(alone[0] > 0.1, "a random model's loss should be far from 0");
    }
}

#[test]
fn padding_and_positions_after_the_last_target_get_exactly_zero_output_gradient() {
    let model = common::tiny_llama(4, &["q_proj", "o_proj", "down_proj"], common::tiny_llama_config(true, "llama"));
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let t = batch.input_ids.dim(1).unwrap();
    let mut tape = Tape { keep_output_grads: true, ..Tape::default() };
    model.example_losses(&batch, Some(&mut tape)).unwrap().sum_all().unwrap().backward().unwrap();
    for rec in &tape.lora {
        let g: Vec<Vec<Vec<f32>>> = rec.grad.as_ref().unwrap().get().unwrap().to_vec3().unwrap();
        for (i, e) in exs.iter().enumerate() {
            // Position len-1 predicts nothing and positions ≥ len are padding: no loss reads them,
            // and causal attention keeps every earlier position from reading them.
            for (pos, row) in g[i].iter().enumerate().take(t).skip(e.ids.len() - 1) {
                assert!(row.iter().all(|&v| v == 0.0), "{}: example {i} position {pos} has gradient", rec.name);
            }
            // (Position 0's query has none either: it attends to itself alone, softmax of one score.)
            assert!(
                g[i][1..e.ids.len() - 1].iter().any(|row| row.iter().any(|&v| v != 0.0)),
                "{}: example {i} has no gradient at any target position",
                rec.name
            );
        }
    }
}

#[test]
fn prompt_tokens_are_not_scored_but_condition_the_completion() {
    let model = common::tiny_llama(5, &["v_proj"], common::tiny_llama_config(true, "llama"));
    let ids: Vec<u32> = vec![7, 12, 9, 30, 41, 8];
    let loss = |start: usize, ids: Vec<u32>| -> f32 {
        let e = Example { ids, label: 0, target_start: Some(start) };
        model
            .example_losses(&Batch::from_examples(&[&e], &Device::Cpu).unwrap(), None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    // Mean over targets 3..6 by hand from the full logits.
    let logits: Vec<Vec<f32>> = model
        .logits(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let nll = |p: usize| {
        let row = &logits[p];
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        lse - row[ids[p + 1] as usize] as f64
    };
    let hand = (nll(2) + nll(3) + nll(4)) / 3.0;
    assert!((loss(3, ids.clone()) as f64 - hand).abs() < 1e-5, "{} vs {hand}", loss(3, ids.clone()));
    // Changing a prompt token changes the completion's loss (it is context, not ignored)...
    let mut other = ids.clone();
    other[1] = 13;
    assert!((loss(3, other) - loss(3, ids.clone())).abs() > 1e-6);
}

#[test]
fn lora_with_b_zero_gives_the_base_model_exactly() {
    let cfg = common::tiny_llama_config(true, "llama");
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(6);
    let w = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let spec = dptrain::model::bert::LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LLAMA_LORA_MODULES.iter().map(|s| s.to_string()).collect(),
        layers: None,
    };
    let vb = || candle_nn::VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let adapted = LlamaLm::new(vb(), cfg.clone(), Some(&spec), &mut rng).unwrap();
    let base = LlamaLm::new(vb(), cfg, None, &mut rng).unwrap();
    let ids = Tensor::new(&[[4u32, 9, 17, 22, 3]], &Device::Cpu).unwrap();
    let d = (adapted.logits(&ids).unwrap() - base.logits(&ids).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn grouped_query_attention_equals_full_attention_with_duplicated_kv_heads() {
    // 4 query heads over 2 kv heads == 4 kv heads where kv head j is a copy of head j / 2.
    let gqa_cfg = common::tiny_llama_config(false, "llama");
    let mut full_cfg = gqa_cfg.clone();
    full_cfg.num_key_value_heads = Some(4);
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(7);
    let w = dptrain::model::llama::random_weights(&gqa_cfg, &mut rng, &Device::Cpu).unwrap();
    let mut wf = w.clone();
    for i in 0..2 {
        for m in ["k_proj", "v_proj"] {
            let name = format!("model.layers.{i}.self_attn.{m}.weight");
            let t = &w[&name]; // [2 · 8, 32]
            let heads: Vec<Tensor> = (0..4).map(|j| t.narrow(0, (j / 2) * 8, 8).unwrap()).collect();
            wf.insert(name, Tensor::cat(&heads, 0).unwrap());
        }
    }
    let gqa = LlamaLm::new(candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), gqa_cfg, None, &mut rng)
        .unwrap();
    let full =
        LlamaLm::new(candle_nn::VarBuilder::from_tensors(wf, DType::F32, &Device::Cpu), full_cfg, None, &mut rng)
            .unwrap();
    let ids = Tensor::new(&[[5u32, 8, 13, 21, 34, 2, 6]], &Device::Cpu).unwrap();
    let d = (gqa.logits(&ids).unwrap() - full.logits(&ids).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "max difference {d}");
}

#[test]
fn rope_rotates_each_pair_j_and_j_plus_half_by_position_times_frequency() {
    let (t, d, theta) = (5usize, 8usize, 10_000f64);
    let (cos, sin) = rope_tables(t, d, theta, &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..t * d).map(|k| ((k * 37 % 11) as f32 - 5.0) / 3.0).collect();
    let xt = Tensor::from_vec(x.clone(), (1, t, 1, d), &Device::Cpu).unwrap(); // [b, T, heads, d]
    let y: Vec<f32> = rope(&xt, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for p in 0..t {
        for j in 0..d / 2 {
            let a = p as f64 * theta.powf(-2.0 * j as f64 / d as f64);
            let (x1, x2) = (x[p * d + j] as f64, x[p * d + j + d / 2] as f64);
            let (y1, y2) = (x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin());
            assert!((y[p * d + j] as f64 - y1).abs() < 1e-5 && (y[p * d + j + d / 2] as f64 - y2).abs() < 1e-5);
        }
    }
}

#[test]
fn unknown_llama_lora_target_is_an_error_naming_the_known_modules() {
    let cfg = common::tiny_llama_config(true, "llama");
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(8);
    let w = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let spec = dptrain::model::bert::LoraSpec { rank: 2, alpha: 4.0, targets: vec!["query".into()], layers: None };
    let err =
        LlamaLm::new(candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), cfg, Some(&spec), &mut rng)
            .err()
            .expect("query is a BERT module")
            .to_string();
    assert!(err.contains("`query`") && err.contains("q_proj"), "{err}");
}

#[test]
fn sharded_safetensors_with_an_index_load_the_same_model() {
    let cfg = common::tiny_llama_config(true, "llama");
    let one = std::env::temp_dir().join(format!("dptrain-shard-one-{}", std::process::id()));
    let two = std::env::temp_dir().join(format!("dptrain-shard-two-{}", std::process::id()));
    common::write_tiny_llama_dir(&one, 12);
    std::fs::create_dir_all(&two).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(one.join(f), two.join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(one.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, t) in all {
        let file = if k.contains("layers.1.") || k.contains("norm.weight") && !k.contains("layers") {
            b.insert(k.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(k.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        map.insert(k, file.into());
    }
    candle_core::safetensors::save(&a, two.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, two.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(two.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
        .unwrap();
    let load = |dir: &std::path::Path| {
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
        LlamaLm::load(dir, None, &mut rng, &Device::Cpu, DType::F32).unwrap()
    };
    let ids = Tensor::new(&[[4u32, 9, 17, 22, 3, 30]], &Device::Cpu).unwrap();
    let (l1, l2) = (load(&one).logits(&ids).unwrap(), load(&two).logits(&ids).unwrap());
    assert_eq!(
        l1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        l2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // A shard listed in the index but absent is an error naming it.
    std::fs::remove_file(two.join("model-00002-of-00002.safetensors")).unwrap();
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
    let err = LlamaLm::load(&two, None, &mut rng, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    let _ = (std::fs::remove_dir_all(&one), std::fs::remove_dir_all(&two), cfg);
}

#[test]
fn cached_frozen_prefix_gives_the_full_forward_losses_and_gradients() {
    // LoRA only in layer 1: layer 0's output is a fixed function of each record.
    let cfg = common::tiny_llama_config(true, "llama");
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(13);
    let w = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let spec = dptrain::model::bert::LoraSpec {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "down_proj".into()],
        layers: Some(vec![1]),
    };
    let mut model =
        LlamaLm::new(candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), cfg, Some(&spec), &mut rng)
            .unwrap();
    let random: Vec<Tensor> =
        model.trainable().iter().map(|(_, t)| common::rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    model.set_trainable(&random).unwrap();
    assert_eq!(model.first_adapted_layer(), 1);
    let exs = examples();
    let cache = dptrain::train::eval::feature_cache(&model, &exs, 2).unwrap().expect("layer 0 is cacheable");
    let idx: Vec<usize> = (0..exs.len()).collect();
    let grads = |cache: Option<&dptrain::data::FeatureCache>| -> (Vec<f32>, Vec<Vec<f32>>) {
        let batch = Batch::gather(&exs, &idx, cache, &Device::Cpu).unwrap();
        let mut tape = Tape::default();
        let losses = model.example_losses(&batch, Some(&mut tape)).unwrap();
        losses.sum_all().unwrap().backward().unwrap();
        (losses.to_vec1().unwrap(), per_example_grads(&model, &tape).unwrap().to_vec2().unwrap())
    };
    let (full_l, full_g) = grads(None);
    let (cached_l, cached_g) = grads(Some(&cache));
    for (a, b) in full_l.iter().zip(&cached_l) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let scale = full_g.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in full_g.iter().flatten().zip(cached_g.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5 * scale);
    }
}

#[test]
fn older_hub_and_transformers5_config_layouts_give_identical_logits() {
    // A tiny Qwen2 (θ = 1e6, q/k/v biases) saved in the older Hub layout (top-level rope_theta,
    // torch_dtype) and in the transformers 5 layout (rope_parameters, dtype, layer_types), over
    // the same weights; and the same with θ = 10000, what a reader ignoring rope_parameters uses.
    let shape = serde_json::json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 50, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "max_window_layers": 2, "tie_word_embeddings": false,
        "hidden_act": "silu", "eos_token_id": 3, "bos_token_id": 2, "attention_dropout": 0.0, "use_cache": true,
        "initializer_range": 0.02, "use_sliding_window": false
    });
    let layout = |extra: serde_json::Value| {
        let mut v = shape.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v.to_string()
    };
    let old = layout(serde_json::json!({
        "rope_theta": 1e6, "rope_scaling": null, "sliding_window": 32, "torch_dtype": "float32",
        "transformers_version": "4.40.1"
    }));
    let v5 = layout(serde_json::json!({
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "sliding_window": null, "dtype": "float32",
        "layer_types": ["full_attention", "full_attention"], "pad_token_id": null, "transformers_version": "5.0.0"
    }));
    let theta_1e4 = layout(serde_json::json!({"rope_theta": 1e4}));
    let cfg = dptrain::model::LlamaConfig::from_json(&old).unwrap();
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(21);
    let weights = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[4u32, 9, 17, 22, 3, 30, 41, 8, 8, 12, 49, 5, 27, 33, 6, 19]], &Device::Cpu).unwrap();
    let logits = |name: &str, config: &str| -> Vec<f32> {
        let dir = std::env::temp_dir().join(format!("dptrain-layout-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
        let model = LlamaLm::load(&dir, None, &mut rng, &Device::Cpu, DType::F32).unwrap();
        let out = model.logits(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        out
    };
    let (a, b, c) = (logits("old", &old), logits("v5", &v5), logits("1e4", &theta_1e4));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "the two layouts of one model give different logits");
    // θ matters on this model, so a reader that dropped rope_parameters (θ = 10000) would fail above.
    let diff = a.iter().zip(&c).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff > 1e-3, "θ = 1e6 and θ = 1e4 give nearly the same logits ({diff}): the test could not fail");
}

#[test]
fn llama_attention_bias_puts_a_bias_on_o_proj_as_well() {
    // transformers' LlamaAttention: attention_bias = true gives q, k, v *and* o_proj biases (Qwen2:
    // q, k, v only). An o_proj bias that were not read would change the model silently.
    let cfg = |model_type: &str| {
        dptrain::model::LlamaConfig::from_json(
            &serde_json::json!({
                "model_type": model_type, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": true, "attention_bias": true
            })
            .to_string(),
        )
        .unwrap()
    };
    assert!(cfg("llama").o_bias() && cfg("llama").qkv_bias());
    assert!(!cfg("qwen2").o_bias() && cfg("qwen2").qkv_bias());
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(3);
    let w = dptrain::model::llama::random_weights(&cfg("llama"), &mut rng, &Device::Cpu).unwrap();
    let name = "model.layers.1.self_attn.o_proj.bias";
    assert!(w.contains_key(name));
    let ids = Tensor::new(&[[4u32, 9, 17, 22, 3, 30]], &Device::Cpu).unwrap();
    let logits = |w: std::collections::HashMap<String, Tensor>| -> candle_core::Result<Vec<f32>> {
        let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
        LlamaLm::new(vb, cfg("llama"), None, &mut rng)?.logits(&ids)?.flatten_all()?.to_vec1()
    };
    let base = logits(w.clone()).unwrap();
    let mut zeroed = w.clone();
    zeroed.insert(name.into(), zeroed[name].zeros_like().unwrap());
    let without = logits(zeroed).unwrap();
    let diff = base.iter().zip(&without).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-3, "the o_proj bias does not reach the logits ({diff})");
    let mut missing = w;
    missing.remove(name);
    let e = logits(missing).unwrap_err().to_string();
    assert!(e.contains("o_proj.bias"), "{e}");
}
