//! Claim: dptrain's Llama implementation on the converted SmolLM2-135M reproduces
//! tests/reference/models.json (a copy of the shared reference, `smollm2`): next-token logits of the prompt, the greedy
//! continuation, and the perplexity of the fixed Moby-Dick window, within the stated tolerances
//! (f32 everywhere). Runs when the assets are cached (scripts/fetch-assets.sh; CI fetches them).

use candle_core::{Device, IndexOp, Tensor};
use dptrain::data::Example;
use dptrain::model::{EvalResult, LlamaLm};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/reference/models.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["smollm2"].clone()
}

fn assets() -> Option<(LlamaLm, tokenizers::Tokenizer)> {
    let dir = root().join(".cache/models/SmolLM2-135M-Instruct");
    if !dir.join("model.safetensors").exists() {
        eprintln!("skipping: {} not fetched (run scripts/fetch-assets.sh)", dir.display());
        return None;
    }
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
    let model = LlamaLm::load(&dir, None, &mut rng, &Device::Cpu, candle_core::DType::F32).unwrap();
    let tok = dptrain::model::bert::load_tokenizer(&dir, None).unwrap();
    Some((model, tok))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_next_token_logits_and_greedy_continuation_match_reference() {
    let Some((model, tok)) = assets() else { return };
    let r = reference();
    let prompt = tok.encode(r["prompt"].as_str().unwrap(), false).unwrap().get_ids().to_vec();
    assert_eq!(prompt, ids(&r["prompt_token_ids"]));
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits: Vec<f32> = model.logits(&input).unwrap().i((0, prompt.len() - 1)).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top = &r["next_token_top5"];
    let want_ids = ids(&top["ids"]);
    let got_ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(got_ids, want_ids, "top-5 next tokens");
    for (k, want) in top["logits"].as_array().unwrap().iter().enumerate() {
        let (got, want) = (logits[want_ids[k] as usize] as f64, want.as_f64().unwrap());
        assert!((got - want).abs() <= 1e-3, "logit of top-{k}: {got} vs {want}");
    }
    assert_eq!(order[5] as u64, top["sixth_id"].as_u64().unwrap());
    let n = r["greedy"]["n_new_tokens"].as_u64().unwrap() as usize;
    assert_eq!(model.greedy(&prompt, n).unwrap(), ids(&r["greedy"]["ids"]), "greedy continuation");
}

#[test]
fn smollm2_perplexity_of_the_moby_dick_window_matches_reference() {
    let Some((model, tok)) = assets() else { return };
    let r = reference()["perplexity"].clone();
    let text = std::fs::read_to_string(root().join(".cache/data/moby-dick/chapter_1.txt")).unwrap();
    let all = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(all.len() as u64, r["file_tokens"].as_u64().unwrap());
    let window = all[..r["window_tokens"].as_u64().unwrap() as usize].to_vec();
    assert_eq!(window[..16], ids(&r["window_first16_ids"])[..]);
    // The training loss path (targets 1..512, one record), reduced as the held-out metric.
    let e = Example { ids: window, label: 0, target_start: Some(1) };
    let EvalResult::Perplexity { perplexity, mean_nll, tokens } =
        dptrain::train::eval::perplexity(&model, &[e], 1).unwrap()
    else {
        panic!("not a perplexity")
    };
    assert_eq!(tokens as u64, r["predictions"].as_u64().unwrap());
    let (want_nll, want_ppl) = (r["mean_nll"].as_f64().unwrap(), r["perplexity"].as_f64().unwrap());
    assert!((mean_nll - want_nll).abs() <= 1e-4, "mean NLL {mean_nll} vs {want_nll}");
    assert!((perplexity / want_ppl - 1.0).abs() <= 1e-4, "perplexity {perplexity} vs {want_ppl}");
}
