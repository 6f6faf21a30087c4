//! Shared helpers for integration tests: a tiny random BERT and deterministic random tensors.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dptrain::model::bert::{BertClassifier, BertConfig, LoraSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::collections::HashMap;

pub fn rand_tensor(rng: &mut ChaCha20Rng, shape: &[usize], scale: f32) -> Tensor {
    dptrain::model::bert::uniform_tensor(rng, shape, scale, &Device::Cpu).unwrap()
}

pub fn tiny_config() -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 16,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    }))
    .unwrap()
}

/// Random weights of the tiny BERT, named as in a Hugging Face checkpoint.
pub fn tiny_weights(rng: &mut ChaCha20Rng) -> HashMap<String, Tensor> {
    dptrain::model::bert::random_weights(&tiny_config(), rng, &Device::Cpu).unwrap()
}

/// A 2-layer BERT with random weights, LoRA on `targets`, and random (non-zero) LoRA B and head
/// so that every per-example gradient is non-trivial.
pub fn tiny_bert(seed: u64, targets: &[&str], num_labels: usize) -> BertClassifier {
    let cfg = tiny_config();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = tiny_weights(&mut rng);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let spec = LoraSpec { rank: 3, alpha: 6.0, targets: targets.iter().map(|s| s.to_string()).collect(), layers: None };
    let mut model = BertClassifier::new(vb, cfg, Some(&spec), num_labels, &mut rng).unwrap();
    let random: Vec<Tensor> = model.trainable().iter().map(|(_, t)| rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    model.set_trainable(&random).unwrap();
    model
}

/// Words of the tiny tokenizer's vocabulary (ids 4..50).
pub fn tiny_words() -> Vec<String> {
    (4..50).map(|i| format!("w{i}")).collect()
}

/// Write a tiny BERT model folder (config.json, model.safetensors, a WordLevel tokenizer.json).
pub fn write_tiny_model_dir(dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = tiny_weights(&mut rng);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 50, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for (i, t) in tiny_words().iter().enumerate() {
        vocab.insert(t.clone(), (i + 4).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// A 2-layer Llama config: hidden 32, 4 query heads over 2 key/value heads (GQA), vocab 50.
pub fn tiny_llama_config(tied: bool, model_type: &str) -> dptrain::model::LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": tied, "hidden_act": "silu", "eos_token_id": 3
    }))
    .unwrap()
}

/// A tiny random Llama with LoRA on `targets` and random (non-zero) LoRA B, so that every
/// per-example gradient is non-trivial.
pub fn tiny_llama(seed: u64, targets: &[&str], cfg: dptrain::model::LlamaConfig) -> dptrain::model::LlamaLm {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = dptrain::model::llama::random_weights(&cfg, &mut rng, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let spec = LoraSpec { rank: 3, alpha: 6.0, targets: targets.iter().map(|s| s.to_string()).collect(), layers: None };
    let mut model = dptrain::model::LlamaLm::new(vb, cfg, Some(&spec), &mut rng).unwrap();
    let random: Vec<Tensor> =
        dptrain::model::DpModel::trainable(&model).iter().map(|(_, t)| rand_tensor(&mut rng, t.dims(), 0.5)).collect();
    dptrain::model::DpModel::set_trainable(&mut model, &random).unwrap();
    model
}

/// Write a tiny Llama model folder (config.json, model.safetensors, a WordLevel tokenizer.json
/// without special tokens: "w4".."w49" are ids 4..49, id 3 is the end of sequence).
pub fn write_tiny_llama_dir(dir: &std::path::Path, seed: u64) {
    write_tiny_llama_dir_sized(dir, seed, 32, 48);
}

/// `write_tiny_llama_dir` with the given hidden and intermediate sizes (4 heads, 2 KV heads).
pub fn write_tiny_llama_dir_sized(dir: &std::path::Path, seed: u64, hidden: usize, intermediate: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let cfg = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": true, "hidden_act": "silu", "eos_token_id": 3, "bos_token_id": 2
    });
    let parsed = dptrain::model::LlamaConfig::from_json(&cfg.to_string()).unwrap();
    let w = dptrain::model::llama::random_weights(&parsed, &mut rng, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<pad>", "<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for (i, t) in tiny_words().iter().enumerate() {
        vocab.insert(t.clone(), (i + 4).into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// 60 two-class records over the tiny vocabulary (label a: words from the first half, b: the
/// second half): the first 48 to `train.jsonl`, the rest to `test.jsonl` in `dir`.
pub fn write_tiny_classification_data(dir: &std::path::Path) {
    let words = tiny_words();
    let mut lines = Vec::new();
    for i in 0..60 {
        let (label, base) = if i % 2 == 0 { ("a", 0) } else { ("b", 23) };
        let text: Vec<&str> = (0..(3 + i % 5)).map(|j| words[base + (i * 3 + j * 7) % 23].as_str()).collect();
        lines.push(serde_json::json!({"text": text.join(" "), "label": label}).to_string());
    }
    std::fs::write(dir.join("train.jsonl"), lines[..48].join("\n") + "\n").unwrap();
    std::fs::write(dir.join("test.jsonl"), lines[48..].join("\n") + "\n").unwrap();
}

/// Runs the dptrain binary: (success, stdout + stderr).
pub fn dptrain(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Starts the dptrain binary in the background with its output discarded (to signal or kill it).
pub fn spawn_quiet(args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Replaces `from` with `to` in the text file `path` (a config edit in a test).
pub fn replace_in(path: impl AsRef<std::path::Path>, from: &str, to: &str) {
    let p = path.as_ref();
    let text = std::fs::read_to_string(p).unwrap();
    assert!(text.contains(from), "`{from}` not in {}", p.display());
    std::fs::write(p, text.replace(from, to)).unwrap();
}

/// A temporary folder holding the tiny model (`model/`) and the tiny classification data
/// (`train.jsonl`, `test.jsonl`), removed when dropped: the fixture of the CLI-level tests.
pub struct TinyRunDir {
    pub dir: std::path::PathBuf,
}

impl TinyRunDir {
    /// `dptrain-<suite>-<name>-<pid>` under the temporary folder, fresh.
    pub fn new(suite: &str, name: &str) -> TinyRunDir {
        let dir = std::env::temp_dir().join(format!("dptrain-{suite}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_tiny_model_dir(&dir.join("model"), 4);
        write_tiny_classification_data(&dir);
        TinyRunDir { dir }
    }

    pub fn out(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// Writes `<out>.toml` (model, data, LoRA r 2, DP at `epsilon` with δ 1e-3 and C 1, the given
    /// `[training]` lines, output folder `<out>`) and returns its path.
    pub fn config(&self, out: &str, epsilon: f64, training: &str) -> String {
        let d = self.dir.display();
        let text = format!(
            "[model]\npath = \"{d}/model\"\nmax-seq-len = 12\n\n[data]\ntrain = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"\n\n\
             [lora]\nrank = 2\nalpha = 4\n\n[privacy]\ntarget-epsilon = {epsilon:?}\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n\
             [training]\n{training}\n\n[output]\ndir = \"{d}/{out}\"\n"
        );
        let path = self.dir.join(format!("{out}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for TinyRunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
