//! Claim: `dptrain convert` turns the real SmolLM2-135M-Instruct GGUF into an HF Llama folder whose
//! weights (Q/K rows un-permuted) and rebuilt tokenizer match tests/reference/models.json
//! (`smollm2`), computed by an independent numpy converter and the Hugging Face tokenizers library.
//! Needs the converted model and Moby-Dick chapter 1 (scripts/fetch-assets.sh; CI fetches them):
//! skipped with a message when absent, and a failure when CI=true.

use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn cache() -> PathBuf {
    std::env::var_os("DPTRAIN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.cache")))
}

fn require(path: PathBuf) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI must fetch the assets first (scripts/fetch-assets.sh): {} missing", path.display());
    }
    eprintln!("SKIPPED: {} not found; run scripts/fetch-assets.sh", path.display());
    None
}

fn model_dir() -> Option<PathBuf> {
    let dir = require(cache().join("models/SmolLM2-135M-Instruct"))?;
    require(dir.join("model.safetensors"))?;
    Some(dir)
}

fn reference() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/models.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    r["smollm2"].clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Equal, or one unit in the last place apart (a dequantiser with a fused multiply-add).
fn within_one_ulp(a: f32, b: f32) -> bool {
    a == b || (a.signum() == b.signum() && (a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1)
}

#[test]
fn converted_smollm2_weights_match_reference() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();

    // Every tensor of the HF Llama layout, nothing else: 30 blocks × 9 + embeddings + final norm,
    // and no lm_head (tied embeddings).
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names.len(), 272, "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("lm_head")));
    for l in 0..30 {
        for t in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            assert!(names.contains(&format!("model.layers.{l}.{t}.weight")), "layer {l} {t}");
        }
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    assert_eq!(meta.get("source_gguf_sha256").map(String::as_str), r["source"]["sha256_gguf"].as_str());

    let weights = r["weights"].as_object().unwrap();
    let mut checked = 0;
    for (name, want) in weights.iter().filter(|(n, _)| n.starts_with("model.")) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let shape: Vec<usize> =
            want["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name} shape");
        let cols = shape[1];
        let row = |i: usize| -> Vec<f32> {
            t.data()[i * cols * 4..(i * cols + 5) * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        for (key, i) in [("row0_first5", 0), ("row1_first5", 1)] {
            let Some(w) = want.get(key) else { continue };
            let got = row(i);
            for (k, (g, w)) in got.iter().zip(w.as_array().unwrap()).enumerate() {
                let w = w.as_f64().unwrap() as f32;
                assert!(within_one_ulp(*g, w), "{name} {key}[{k}]: {g:e} vs reference {w:e} (row {i}: {got:?})");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5, "q row 0/1, k row 0/1, embed row 1");

    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("head_dim", 64),
        ("vocab_size", 49152),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("max_position_embeddings", 8192),
    ] {
        assert_eq!(cfg[k], v, "config.json {k}");
    }
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5f32 as f64));
    assert_eq!(cfg["model_type"], "llama");
}

/// Stronger than the sampled rows: re-serialised with the header the reference converter's writer
/// produced (metadata {"format": "pt"}, tensors in name order, fields dtype/shape/data_offsets,
/// space-padded to 8 bytes), our tensor data give the reference file's sha256 — every value of
/// every tensor is bit-identical to the independent conversion.
#[test]
fn converted_smollm2_tensor_data_hash_to_the_reference_file() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let infos = meta.tensors();
    let mut tensors: Vec<_> = infos.iter().collect();
    tensors.sort_by_key(|(name, _)| name.as_str());
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0;
    for (name, info) in &tensors {
        assert_eq!(info.data_offsets.0, offset, "{name}: our data are in name order");
        let shape: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            r#","{name}":{{"dtype":"F32","shape":[{}],"data_offsets":[{},{}]}}"#,
            shape.join(","),
            info.data_offsets.0,
            info.data_offsets.1
        ));
        offset = info.data_offsets.1;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut h = Sha256::new();
    h.update((header.len() as u64).to_le_bytes());
    h.update(header.as_bytes());
    h.update(&bytes[8 + n..]);
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, r["source"]["sha256_converted_model_safetensors_f32"].as_str().unwrap());
}

#[test]
fn converted_tokenizer_reproduces_reference_ids() {
    let Some(dir) = model_dir() else { return };
    let Some(chapter) = require(cache().join("data/moby-dick/chapter_1.txt")) else { return };
    let r = reference();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();

    let prompt = r["prompt"].as_str().unwrap();
    assert_eq!(prompt, "Once upon a time");
    let enc = tok.encode(prompt, false).unwrap();
    assert_eq!(enc.get_ids(), [6403, 1980, 253, 655]);
    assert_eq!(enc.get_ids(), ids(&r["prompt_token_ids"]).as_slice());
    let want_tokens: Vec<&str> = r["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(enc.get_tokens(), want_tokens.as_slice());
    // The tokenizer adds nothing by itself, even when asked to add special tokens.
    assert_eq!(tok.encode(prompt, true).unwrap().get_ids(), enc.get_ids());

    let p = &r["perplexity"];
    let bytes = std::fs::read(&chapter).unwrap();
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha, p["sha256_text_file"].as_str().unwrap(), "chapter_1.txt is not the reference text");
    let text = String::from_utf8(bytes).unwrap();
    let all = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(all.len() as u64, p["file_tokens"].as_u64().unwrap());
    assert_eq!(all.len(), 2859);
    let window = &all[..p["window_tokens"].as_u64().unwrap() as usize];
    assert_eq!(window[..16], ids(&p["window_first16_ids"])[..]);
    assert_eq!(window[512 - 8..], ids(&p["window_last8_ids"])[..]);
    assert_eq!(tok.decode(window, false).unwrap(), p["window_text"].as_str().unwrap());
    assert_eq!(tok.decode(&all, false).unwrap(), text, "chapter 1 round trip");

    // Digits are split one by one; control tokens are single special tokens.
    let digits = tok.encode("1851", false).unwrap();
    assert_eq!(digits.get_tokens(), ["1", "8", "5", "1"]);
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(chat.get_ids().first(), Some(&1));
    assert_eq!(chat.get_ids().last(), Some(&2));
    for s in [
        "Once upon a time",
        "In 1851, 42 whales — 3.14% of 100000!",
        "naïve café, Ærøskøbing, 日本語, Ελληνικά, 🐋🐳",
        "line one\n\nline two\r\n\tindented  double  spaces   \n",
        "<|im_start|>user\nHi<|im_end|>\n",
        "  leading spaces and trailing ",
    ] {
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), s, "round trip of {s:?} via {ids:?}");
    }
}

/// Claim: `dptrain convert --keep-quantized` of the real SmolLM2 GGUF keeps its linear weights as
/// the GGUF's own blocks (rows of q/k un-permuted as whole blocks), and the folder computes the
/// same model as the f32 conversion: every kept tensor decodes to the f32 folder's values, and the
/// per-example losses of both folders agree on Moby-Dick text.
#[test]
fn smollm2_gguf_kept_quantized_decodes_to_the_f32_conversion_and_gives_its_losses() {
    use candle_core::Device;
    use dptrain::model::quant;
    use dptrain::model::DpModel;
    use rand::SeedableRng;
    let Some(f32_dir) = model_dir() else { return };
    let Some(gguf) = require(cache().join("models/smollm2-135m-gguf/SmolLM2-135M-Instruct.Q4_1.gguf")) else {
        return;
    };
    let Some(text) = require(cache().join("data/moby-dick/chapter_1.txt")) else { return };
    let out = std::env::temp_dir().join(format!("dptrain-smollm2-kept-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opts = dptrain::convert::ConvertOptions { overwrite: false, keep_quantized: true };
    let s = dptrain::convert::convert_gguf(&gguf, &out, opts).unwrap();
    assert_eq!(s.kept_quantized, 30 * 7 + 1, "every linear weight of the 30 blocks and the (tied) embedding");
    assert!(s.tied_embeddings && quant::stored_vocab(&out).unwrap());
    for f in ["config.json", "tokenizer.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(f32_dir.join(f)).unwrap(), "{f}");
    }
    let stored = quant::read_stored(&out, &Device::Cpu).unwrap();
    let bytes = std::fs::read(f32_dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, q) in &stored {
        let want: Vec<f32> = st
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got: Vec<f32> = quant::dequantize(q, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{name}: {differ} values differ from the f32 conversion");
    }
    let tok = tokenizers::Tokenizer::from_file(f32_dir.join("tokenizer.json")).unwrap();
    let words = std::fs::read_to_string(text).unwrap();
    let ids = tok.encode(&words[..2000], false).unwrap().get_ids().to_vec();
    let exs: Vec<dptrain::data::Example> = (0..3)
        .map(|k| dptrain::data::Example { ids: ids[k * 40..k * 40 + 40].to_vec(), label: 0, target_start: Some(1) })
        .collect();
    let refs: Vec<&dptrain::data::Example> = exs.iter().collect();
    let batch = dptrain::data::Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let losses = |dir: &std::path::Path| -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let m = dptrain::model::LlamaLm::load(dir, None, &mut rng, &Device::Cpu, candle_core::DType::F32).unwrap();
        m.example_losses(&batch, None).unwrap().to_vec1().unwrap()
    };
    let (a, b) = (losses(&f32_dir), losses(&out));
    assert!(a.iter().all(|l| l.is_finite() && *l > 0.5 && *l < 8.0), "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses {a:?} vs {b:?}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
