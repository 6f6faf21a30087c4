//! Claims about a quantized frozen base (`model.quantize`): a Llama model with its linear weights
//! kept in Q8_0 or Q4_K blocks computes exactly the dense model holding the dequantized weights —
//! the same per-example losses and the same per-example gradients of every LoRA tensor —, stores
//! those weights in the format's bytes (34 per 32 weights, 144 per 256), differs from the
//! unquantized model by the quantization only, refuses weights whose rows are not whole blocks
//! (naming them), and trains end to end: the run's report names the quantization and `dptrain
//! eval --quantize` of the released adapter gives the perplexity the run reported. A folder that
//! stores its linear weights as GGML blocks (`dptrain convert --keep-quantized`) trains on exactly
//! those blocks: the same adapter as quantizing the same weights at load, a report saying so, and
//! `model.quantize` or a BERT model with such a file refused. With the embedding and LM head
//! quantized too (`model.quantize-vocab`, tied or untied) the model still computes exactly the
//! dequantized model, in the format's bytes, and eval reproduces such a run only with the flag.

mod common;

use candle_core::{DType, Device, Tensor};
use dptrain::data::{Batch, Example};
use dptrain::lora::{LoraSpec, Tape};
use dptrain::model::quant::{BaseFormat, QuantFormat};
use dptrain::model::{DpModel, LlamaLm};
use dptrain::privacy::per_example_grads;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn examples() -> Vec<Example> {
    let mut s = 7u32;
    [(6usize, 1usize), (4, 1), (9, 3), (7, 2)]
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

fn model_dir(name: &str, hidden: usize, intermediate: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dptrain-quant-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    common::write_tiny_llama_dir_sized(&dir, 5, hidden, intermediate);
    dir
}

/// LoRA on every module.
fn every_module() -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 4.0,
        targets: dptrain::model::llama::LLAMA_LORA_MODULES.iter().map(|s| s.to_string()).collect(),
        layers: None,
    }
}

/// The model in `dir` with LoRA on every module, its LoRA tensors set to the same random values
/// whatever the base format (so that every per-example gradient is non-zero).
fn load(dir: &Path, base: BaseFormat) -> LlamaLm {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    with_random_lora(LlamaLm::load(dir, Some(&every_module()), &mut rng, &Device::Cpu, base).unwrap())
}

/// `model` with its LoRA tensors set as in `load`.
fn with_random_lora(mut model: LlamaLm) -> LlamaLm {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
    let random: Vec<Tensor> =
        model.trainable().iter().map(|(_, t)| common::rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    model.set_trainable(&random).unwrap();
    model
}

/// Per-example losses and per-example gradients (one row per example) of one DP forward/backward.
fn losses_and_grads(model: &LlamaLm) -> (Vec<f32>, Vec<Vec<f32>>) {
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    let losses = model.example_losses(&batch, Some(&mut tape)).unwrap();
    losses.sum_all().unwrap().backward().unwrap();
    let grads = per_example_grads(model, &tape).unwrap().to_vec2().unwrap();
    (losses.to_vec1().unwrap(), grads)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "zero reference: the comparison would be vacuous");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check_format(format: QuantFormat, hidden: usize, intermediate: usize, bytes_per_block: usize) {
    let dir = model_dir(format.name(), hidden, intermediate);
    let quant = BaseFormat { dtype: DType::F32, quant: Some(format), quant_vocab: None };
    let q = load(&dir, quant);
    let mut twin = load(&dir, quant);
    twin.dequantize_base().unwrap();
    let dense = load(&dir, DType::F32.into());

    // Stored in the format's bytes; the dequantized twin and the unquantized model in f32.
    let f32_bytes = dense.layer_weight_bytes();
    assert_eq!(twin.layer_weight_bytes(), f32_bytes);
    assert_eq!(q.layer_weight_bytes(), f32_bytes / 4 / format.block_size() * bytes_per_block, "{format:?}");

    let (lq, gq) = losses_and_grads(&q);
    let (lt, gt) = losses_and_grads(&twin);
    let (ld, gd) = losses_and_grads(&dense);
    assert_eq!(gq.len(), 4);
    // Exactly the dequantized model, up to f32 rounding.
    let loss_err = max_rel(&lq, &lt);
    assert!(loss_err < 1e-6, "{format:?}: losses differ from the dequantized model's by {loss_err}");
    for (i, (a, b)) in gq.iter().zip(&gt).enumerate() {
        let e = max_rel(a, b);
        assert!(e < 1e-5, "{format:?}, example {i}: per-example gradient differs from the dequantized model's by {e}");
    }
    // ... and not the unquantized model: the quantization is really applied, and stays small.
    let quant_effect = max_rel(&lq, &ld);
    let tol = if format == QuantFormat::Q8_0 { 0.01 } else { 0.1 };
    assert!(quant_effect > 1e-6, "{format:?}: the quantized model computes the unquantized one ({quant_effect})");
    assert!(quant_effect < tol, "{format:?}: quantization moved the losses by {quant_effect}");
    let grad_effect = max_rel(&gq[0], &gd[0]);
    assert!(grad_effect > 1e-6 && grad_effect < 10.0 * tol, "{format:?}: gradient moved by {grad_effect}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_q8_0_base_computes_exactly_the_dequantized_model_in_a_quarter_of_the_bytes() {
    check_format(QuantFormat::Q8_0, 64, 96, 34);
}

#[test]
fn a_q4_k_base_computes_exactly_the_dequantized_model_in_a_seventh_of_the_bytes() {
    check_format(QuantFormat::Q4K, 256, 512, 144);
}

/// `model.quantize-vocab`: the embedding and head in Q8_0 blocks (one set when tied), the decoder
/// linears too; the model computes exactly the dequantized model, stores the vocabulary tensors in
/// Q8_0's bytes, and differs from quantizing the decoder alone (the vocabulary quantization is
/// really applied).
fn check_vocab(tied: bool) {
    let dir = model_dir(if tied { "vocab-tied" } else { "vocab-untied" }, 64, 96);
    if !tied {
        untie(&dir, DType::F32);
    }
    let q8 = Some(QuantFormat::Q8_0);
    let both = BaseFormat { dtype: DType::F32, quant: q8, quant_vocab: q8 };
    let q = load(&dir, both);
    let mut twin = load(&dir, both);
    twin.dequantize_base().unwrap();
    let layers_only = load(&dir, BaseFormat { dtype: DType::F32, quant: q8, quant_vocab: None });
    let dense = load(&dir, DType::F32.into());
    // 50 × 64 f32 per vocabulary tensor (one when tied) against 50 × 2 blocks of 34 bytes.
    let tensors = if tied { 1 } else { 2 };
    assert_eq!(dense.vocab_weight_bytes(), tensors * 50 * 64 * 4);
    assert_eq!(q.vocab_weight_bytes(), tensors * 50 * 2 * 34, "tied {tied}");
    assert_eq!(twin.vocab_weight_bytes(), dense.vocab_weight_bytes());

    let (lq, gq) = losses_and_grads(&q);
    let (lt, gt) = losses_and_grads(&twin);
    let (ll, _) = losses_and_grads(&layers_only);
    let loss_err = max_rel(&lq, &lt);
    assert!(loss_err < 1e-6, "tied {tied}: losses differ from the dequantized model's by {loss_err}");
    for (i, (a, b)) in gq.iter().zip(&gt).enumerate() {
        let e = max_rel(a, b);
        assert!(e < 1e-5, "tied {tied}, example {i}: per-example gradient differs from the dequantized model's by {e}");
    }
    let vocab_effect = max_rel(&lq, &ll);
    assert!(vocab_effect > 1e-6, "tied {tied}: quantize-vocab changed nothing ({vocab_effect})");
    assert!(vocab_effect < 0.01, "tied {tied}: quantizing the vocabulary moved the losses by {vocab_effect}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_q8_0_embedding_and_head_compute_exactly_the_dequantized_model_tied_or_not() {
    check_vocab(true);
    check_vocab(false);
}

/// `dir`'s model made untied (its own LM head) with new random weights saved in `dtype`; returns
/// the weights as saved and the config.
fn untie(dir: &Path, dtype: DType) -> (HashMap<String, Tensor>, dptrain::model::LlamaConfig) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = false.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let parsed = dptrain::model::LlamaConfig::from_json(&cfg.to_string()).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
    let w = dptrain::model::llama::random_weights(&parsed, &mut rng, &Device::Cpu).unwrap();
    assert!(w.contains_key("lm_head.weight"));
    let w: HashMap<String, Tensor> = w.into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    (w, parsed)
}

/// Quantizing at load reads the weights in their stored dtype a chunk of rows at a time
/// (`quant::as_stored_source`, `quant::quantize_weight`): from a bf16 folder every frozen weight
/// (linears, untied embedding and head) holds exactly the blocks candle's `QTensor::quantize`
/// makes of the whole weight converted to f32 (compared through their dequantizations, bit for
/// bit).
#[test]
fn a_bf16_folder_quantized_at_load_holds_candles_blocks_of_its_weights_bit_for_bit() {
    let dir = model_dir("bf16", 256, 512);
    let (w, _) = untie(&dir, DType::BF16);
    for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
        let base = BaseFormat { dtype: DType::F32, quant: Some(format), quant_vocab: Some(format) };
        let model = load(&dir, base);
        let frozen = model.frozen_weights();
        assert_eq!(frozen.len(), 2 * 7 + 2);
        for (name, weight) in frozen {
            let whole = w[&name].to_dtype(DType::F32).unwrap();
            let want = candle_core::quantized::QTensor::quantize(&whole, format.ggml()).unwrap();
            let want = want.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = weight.dequantized().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{format:?} {name}: {differ} values differ from candle's quantization");
            assert_ne!(got, whole.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}: not quantized");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantizing_a_weight_whose_rows_are_not_whole_blocks_is_refused_naming_it() {
    // hidden 64: rows of 64 are not a Q4_K block (256); the first linear read is q_proj.
    let dir = model_dir("q4k-64", 64, 96);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    let base = BaseFormat { dtype: DType::F32, quant: Some(QuantFormat::Q4K), quant_vocab: None };
    let e = LlamaLm::load(&dir, None, &mut rng, &Device::Cpu, base).err().unwrap().to_string();
    assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("64") && e.contains("256"), "{e}");
    let base = BaseFormat { dtype: DType::BF16, quant: Some(QuantFormat::Q8_0), quant_vocab: None };
    let e = LlamaLm::load(&dir, None, &mut rng, &Device::Cpu, base).err().unwrap().to_string();
    assert!(e.contains("dtype must be f32"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 40 short records over the tiny vocabulary (word i · a + j · b), 32 to `root`/train.jsonl, 8 to
/// test.jsonl.
fn write_lm_data(root: &Path, (a, b): (usize, usize)) {
    let words = common::tiny_words();
    let text: Vec<String> = (0..40)
        .map(|i| {
            let s: Vec<&str> = (0..4 + i % 7).map(|j| words[(i * a + j * b) % words.len()].as_str()).collect();
            serde_json::json!({ "text": s.join(" ") }).to_string()
        })
        .collect();
    std::fs::write(root.join("train.jsonl"), text[..32].join("\n") + "\n").unwrap();
    std::fs::write(root.join("test.jsonl"), text[32..].join("\n") + "\n").unwrap();
}

/// A seeded 4-step DP-LoRA config on `root`/`model` (with `model_extra` lines in [model]) and the
/// data of `write_lm_data`, writing to `root`/`out`; saved as `root`/`out`.toml.
fn lm_config(root: &Path, model: &str, model_extra: &str, out: &str) -> PathBuf {
    let d = root.display();
    let text = format!(
        "[model]\npath = \"{d}/{model}\"\nmax-seq-len = 10\n{model_extra}\n\n[data]\ntrain = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"\n\n\
         [lora]\nrank = 2\nalpha = 4\ntarget-modules = [\"q_proj\", \"down_proj\"]\n\n\
         [privacy]\ntarget-epsilon = 8.0\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n\
         [training]\nexpected-batch-size = 8\nmax-physical-batch = 3\nsteps = 4\nlearning-rate = 0.05\nseed = 7\n\n\
         [output]\ndir = \"{d}/{out}\"\n"
    );
    let path = root.join(format!("{out}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_run_on_a_q8_0_base_names_it_in_the_report_and_eval_on_that_base_reproduces_its_perplexity() {
    let root = std::env::temp_dir().join(format!("dptrain-quant-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    common::write_tiny_llama_dir_sized(&model, 5, 64, 96);
    write_lm_data(&root, (5, 3));
    let d = root.display();
    let config = |quantize: &str, out: &str| lm_config(&root, "model", quantize, out);
    let cfg = config("quantize = \"q8_0\"", "run");
    let (ok, log) = common::dptrain(&["--config", cfg.to_str().unwrap()]);
    assert!(ok, "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("run/release/privacy_report.json")).unwrap()).unwrap();
    assert!(report["base_model"]["quantization"].as_str().unwrap().starts_with("q8_0"), "{}", report["base_model"]);
    let md = std::fs::read_to_string(root.join("run/release/privacy_report.md")).unwrap();
    assert!(md.contains("base model quantization"), "{md}");
    let after = report["metrics"]["test_perplexity"]["perplexity"].as_f64().unwrap();
    let eval_run = |run: &str, flags: &[&str]| -> f64 {
        let mut a = vec!["eval", "--model", model.to_str().unwrap(), "--json", "--samples", "0", "--max-seq-len", "10"];
        let data = format!("{d}/test.jsonl");
        let adapter = format!("{d}/{run}");
        a.extend(["--data", &data, "--adapter", &adapter]);
        a.extend(flags);
        let (ok, log) = common::dptrain(&a);
        assert!(ok, "{log}");
        let r: serde_json::Value = serde_json::from_str(&log).unwrap();
        r["metric"]["perplexity"]["perplexity"].as_f64().unwrap()
    };
    let on_q8 = eval_run("run", &["--quantize", "q8_0"]);
    assert!((on_q8 / after - 1.0).abs() < 1e-6, "eval on the q8_0 base {on_q8} vs the run's {after}");
    // On the unquantized base the same adapter gives another (nearby) perplexity.
    let on_f32 = eval_run("run", &[]);
    assert!(on_f32 != on_q8 && (on_f32 / on_q8 - 1.0).abs() < 0.05, "f32 {on_f32} vs q8_0 {on_q8}");

    // The embedding and head quantized too (model.quantize-vocab): named in the report, and
    // reproduced by eval with the same flags only.
    let cfg_v = config("quantize = \"q8_0\"\nquantize-vocab = \"q8_0\"", "run-vocab");
    let (ok, log) = common::dptrain(&["--config", cfg_v.to_str().unwrap()]);
    assert!(ok, "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("run-vocab/release/privacy_report.json")).unwrap())
            .unwrap();
    let statement = report["base_model"]["quantization"].as_str().unwrap();
    assert!(statement.starts_with("q8_0") && statement.contains("token embedding and the LM head"), "{statement}");
    assert_eq!(report["compute"]["base_weights_quantization"], "q8_0; vocabulary q8_0");
    let after_v = report["metrics"]["test_perplexity"]["perplexity"].as_f64().unwrap();
    let both = eval_run("run-vocab", &["--quantize", "q8_0", "--quantize-vocab", "q8_0"]);
    assert!((both / after_v - 1.0).abs() < 1e-6, "eval with the vocabulary quantized {both} vs the run's {after_v}");
    let layers_only = eval_run("run-vocab", &["--quantize", "q8_0"]);
    assert!(layers_only != both, "--quantize-vocab changed nothing ({both})");
    // A BERT-family model is refused, naming the reason.
    let bert = root.join("bert");
    common::write_tiny_model_dir(&bert.join("model"), 5);
    common::write_tiny_classification_data(&bert);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("{d}/"), &format!("{d}/bert/"))
        .replace("[\"q_proj\", \"down_proj\"]", "[\"query\"]");
    std::fs::write(bert.join("run.toml"), text).unwrap();
    let (ok, log) = common::dptrain(&["--config", bert.join("run.toml").to_str().unwrap()]);
    assert!(!ok && log.contains("Llama family only"), "{log}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// `dir`'s decoder linear weights moved out of model.safetensors into the stored-blocks file as
/// Q8_0 (what `dptrain convert --keep-quantized` writes for a Q8_0 GGUF).
fn store_linear_weights_as_q8_0(dir: &Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut dense = std::collections::HashMap::new();
    let mut blocks: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in all {
        let linear = name.starts_with("model.layers.")
            && name.ends_with("_proj.weight")
            && dptrain::model::llama::LLAMA_LORA_MODULES.iter().any(|m| name.contains(&format!(".{m}.")));
        if linear {
            blocks.push((name, QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()));
        } else {
            dense.insert(name, t);
        }
    }
    assert_eq!(blocks.len(), 2 * 7, "every linear weight of both layers");
    blocks.sort_by(|a, b| a.0.cmp(&b.0));
    candle_core::safetensors::save(&dense, dir.join("model.safetensors")).unwrap();
    let refs: Vec<(&str, &QTensor)> = blocks.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(dir.join(dptrain::model::quant::STORED_FILE)).unwrap();
    gguf_file::write(&mut f, &[], &refs).unwrap();
}

fn adapter_tensors(run: &Path) -> Vec<(String, Vec<u32>)> {
    let bytes = std::fs::read(run.join("release/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    out.sort();
    out
}

#[test]
fn a_folder_of_stored_q8_0_blocks_trains_the_same_adapter_as_quantizing_at_load_and_says_so() {
    let root = std::env::temp_dir().join(format!("dptrain-quant-stored-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (plain, stored) = (root.join("plain"), root.join("stored"));
    common::write_tiny_llama_dir_sized(&plain, 5, 64, 96);
    common::write_tiny_llama_dir_sized(&stored, 5, 64, 96);
    store_linear_weights_as_q8_0(&stored);
    write_lm_data(&root, (3, 5));
    let d = root.display();
    let config = |model: &str, quantize: &str, out: &str| lm_config(&root, model, quantize, out);
    let run = |cfg: &Path| {
        let (ok, log) = common::dptrain(&["--config", cfg.to_str().unwrap()]);
        assert!(ok, "{log}");
    };
    run(&config("plain", "quantize = \"q8_0\"", "at-load"));
    run(&config("stored", "", "as-stored"));
    // The same blocks, the same seeded run: the same adapter, bit for bit.
    let (a, b) = (adapter_tensors(&root.join("at-load")), adapter_tensors(&root.join("as-stored")));
    assert_eq!(a.len(), 8, "A and B of q_proj and down_proj in 2 layers");
    assert!(a == b, "the stored-blocks run trained another adapter than quantizing at load");
    // The embedding and head quantized at load beside the stored blocks: again the adapter of
    // quantizing everything at load, and both named in the report.
    let vocab = "quantize-vocab = \"q8_0\"";
    run(&config("plain", &format!("quantize = \"q8_0\"\n{vocab}"), "at-load-vocab"));
    run(&config("stored", vocab, "as-stored-vocab"));
    let (av, bv) = (adapter_tensors(&root.join("at-load-vocab")), adapter_tensors(&root.join("as-stored-vocab")));
    assert!(av == bv, "stored blocks with quantize-vocab trained another adapter than quantizing all at load");
    assert!(av != a, "quantize-vocab changed no adapter tensor");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("as-stored-vocab/release/privacy_report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["compute"]["base_weights_quantization"], "stored q8_0; vocabulary q8_0");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("as-stored/release/privacy_report.json")).unwrap())
            .unwrap();
    let q = report["base_model"]["quantization"].as_str().unwrap();
    assert!(q.starts_with("q8_0 as stored") && q.contains(dptrain::model::quant::STORED_FILE), "{q}");
    assert_eq!(report["compute"]["base_weights_quantization"], "stored q8_0");
    // eval on the folder (no --quantize) reproduces the run's perplexity.
    let after = report["metrics"]["test_perplexity"]["perplexity"].as_f64().unwrap();
    let data = format!("{d}/test.jsonl");
    let adapter = format!("{d}/as-stored");
    let (ok, log) = common::dptrain(&[
        "eval",
        "--model",
        stored.to_str().unwrap(),
        "--json",
        "--samples",
        "0",
        "--max-seq-len",
        "10",
        "--data",
        &data,
        "--adapter",
        &adapter,
    ]);
    assert!(ok, "{log}");
    let r: serde_json::Value = serde_json::from_str(&log).unwrap();
    let ppl = r["metric"]["perplexity"]["perplexity"].as_f64().unwrap();
    assert!((ppl / after - 1.0).abs() < 1e-6, "eval {ppl} vs the run's {after}");
    // model.quantize on such a folder is refused before anything runs; so is a BERT folder with one.
    let (ok, log) =
        common::dptrain(&["--config", config("stored", "quantize = \"q4_k\"", "refused").to_str().unwrap()]);
    assert!(!ok && log.contains("model.quantize") && log.contains("leave model.quantize unset"), "{log}");
    assert!(!root.join("refused").exists());
    let bert = root.join("bert");
    common::write_tiny_model_dir(&bert, 5);
    std::fs::write(bert.join(dptrain::model::quant::STORED_FILE), b"").unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let e = dptrain::model::BertClassifier::load(&bert, None, 2, &mut rng, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("Llama family only"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}
