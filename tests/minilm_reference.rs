//! Claim: our BERT reproduces the real all-MiniLM-L6-v2 (token ids, last hidden states, mean-pooled
//! embeddings and their cosine similarities) as given in tests/reference/models.json, computed by
//! an independent numpy forward pass. Needs the cached model (scripts/fetch-assets.sh; CI fetches
//! it): skipped with a message when absent, and a failure when CI=true.

use candle_core::{Device, Tensor};
use dptrain::model::bert::{load_tokenizer, mean_pool, BertClassifier};
use rand::SeedableRng;
use serde_json::Value;
use std::path::PathBuf;

fn model_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("DPTRAIN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.cache")));
    let dir = cache.join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI must fetch the assets first (scripts/fetch-assets.sh): {} missing", dir.display());
    }
    eprintln!("SKIPPED: {} not found; run scripts/fetch-assets.sh", dir.display());
    None
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn real_minilm_reproduces_reference_tokens_hidden_states_and_embeddings() {
    let Some(dir) = model_dir() else { return };
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/models.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let r = &r["minilm"];
    let tok = load_tokenizer(&dir, Some(128)).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let model = BertClassifier::load(&dir, None, 2, &mut rng, &candle_core::Device::Cpu).unwrap();
    let sentences: Vec<&str> = r["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let mut pooled_all = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let ids = tok.encode(*s, true).unwrap().get_ids().to_vec();
        let want: Vec<u32> = r["token_ids"][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "token ids of {s:?}");
        let t = ids.len();
        let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, t), candle_core::DType::F32, &Device::Cpu).unwrap();
        let hidden = model.encode(&input, &mask, None).unwrap();
        let cls: Vec<f32> = hidden.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        for (k, w) in f64s(&r["cls_last_hidden_first8"][i]).iter().enumerate() {
            assert!((cls[k] as f64 - w).abs() < 1e-4, "sentence {i} CLS[{k}]: {} vs {w}", cls[k]);
        }
        let pooled: Vec<f32> = mean_pool(&hidden, &mask).unwrap().get(0).unwrap().to_vec1().unwrap();
        for (k, w) in f64s(&r["mean_pooled_first8"][i]).iter().enumerate() {
            assert!((pooled[k] as f64 - w).abs() < 1e-4, "sentence {i} pooled[{k}]: {} vs {w}", pooled[k]);
        }
        let norm = pooled.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - r["mean_pooled_l2_norm"][i].as_f64().unwrap()).abs() < 1e-4, "sentence {i} norm {norm}");
        pooled_all.push(pooled);
    }
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = pooled_all[i].iter().zip(&pooled_all[j]).map(|(a, b)| *a as f64 * *b as f64).sum();
            let n = |v: &Vec<f32>| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (n(&pooled_all[i]) * n(&pooled_all[j]));
            let want = r["cosine_similarity"][i][j].as_f64().unwrap();
            assert!((cos - want).abs() < 1e-5, "cos[{i}][{j}] {cos} vs {want}");
        }
    }
}

#[test]
fn real_minilm_padded_batch_matches_single_sentences() {
    let Some(dir) = model_dir() else { return };
    let tok = load_tokenizer(&dir, Some(128)).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let model = BertClassifier::load(&dir, None, 2, &mut rng, &candle_core::Device::Cpu).unwrap();
    let exs: Vec<dptrain::data::Example> =
        ["A man is playing a guitar.", "Hi.", "The stock market fell sharply today, analysts said."]
            .iter()
            .map(|s| dptrain::data::Example::classification(tok.encode(*s, true).unwrap().get_ids().to_vec(), 0))
            .collect();
    let refs: Vec<&dptrain::data::Example> = exs.iter().collect();
    let b = dptrain::data::Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let batched: Vec<Vec<f32>> = model.pooled(&b.input_ids, &b.attention_mask, None).unwrap().to_vec2().unwrap();
    for (i, e) in exs.iter().enumerate() {
        let s = dptrain::data::Batch::from_examples(&[e], &Device::Cpu).unwrap();
        let single: Vec<Vec<f32>> = model.pooled(&s.input_ids, &s.attention_mask, None).unwrap().to_vec2().unwrap();
        let d = batched[i].iter().zip(&single[0]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-5, "example {i}: padding changed the embedding by {d}");
    }
}
