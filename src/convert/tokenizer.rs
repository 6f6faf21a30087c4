//! Rebuild a Hugging Face `tokenizer.json` from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! Only the `gpt2` tokenizer model (byte-level BPE) is supported: vocab from
//! `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`, no unknown token; control tokens
//! (`token_type` 3) become special added tokens, user-defined ones (type 4) plain added tokens.
//! Pre-tokenizer: digits one by one, then the GPT-2 byte-level regex (no prefix space); decoder:
//! byte-level; no normaliser; no post-processor (nothing is added around the ids).

use super::ConvertError;
use serde_json::{json, Map, Value};

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What the GGUF says about its tokenizer.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub model: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// One per token; empty when the GGUF has no `tokenizer.ggml.token_type`.
    pub token_types: Vec<i64>,
}

/// The `tokenizer.json` value for [`tokenizers::Tokenizer`].
pub fn tokenizer_json(v: &GgufVocab) -> Result<Value, ConvertError> {
    if v.model != "gpt2" {
        return Err(ConvertError::UnsupportedTokenizer(v.model.clone()));
    }
    if v.tokens.is_empty() {
        return Err(ConvertError::Invalid("tokenizer.ggml.tokens is empty".into()));
    }
    if !v.token_types.is_empty() && v.token_types.len() != v.tokens.len() {
        return Err(ConvertError::Invalid(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            v.token_types.len(),
            v.tokens.len()
        )));
    }
    let mut vocab = Map::with_capacity(v.tokens.len());
    for (id, t) in v.tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(id)).is_some() {
            return Err(ConvertError::Invalid(format!("token {t:?} appears twice in tokenizer.ggml.tokens")));
        }
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for m in &v.merges {
        let parts: Vec<&str> = m.split(' ').collect();
        let [a, b] = parts[..] else {
            return Err(ConvertError::Invalid(format!("merge {m:?} is not two tokens separated by one space")));
        };
        for p in [a, b] {
            if !vocab.contains_key(p) {
                return Err(ConvertError::Invalid(format!("merge {m:?} uses {p:?}, which is not in the vocabulary")));
            }
        }
        merges.push(json!([a, b]));
    }
    let mut added = Vec::new();
    for (id, &ty) in v.token_types.iter().enumerate() {
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id,
                "content": v.tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ],
        },
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::str::FromStr;

    /// The 256 byte-level symbols, as GPT-2 maps bytes to printable characters.
    fn byte_symbols() -> Vec<String> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        pairs.into_iter().map(|(_, c)| char::from_u32(c).unwrap().to_string()).collect()
    }

    pub(crate) fn tiny_vocab() -> GgufVocab {
        let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
        tokens.extend(byte_symbols());
        tokens.extend(["Ġt".to_string(), "Ġth".to_string(), "he".to_string()]);
        let mut token_types = vec![3, 3];
        token_types.resize(tokens.len(), 1);
        GgufVocab {
            model: "gpt2".into(), tokens, merges: vec!["Ġ t".into(), "Ġt h".into(), "h e".into()], token_types
        }
    }

    #[test]
    fn rebuilt_tokenizer_loads_encodes_and_round_trips() {
        let v = tiny_vocab();
        let tok = tokenizers::Tokenizer::from_str(&tokenizer_json(&v).unwrap().to_string()).unwrap();
        let enc = tok.encode("the 42 <|im_start|>", false).unwrap();
        let toks: Vec<&str> = enc.get_tokens().iter().map(|s| s.as_str()).collect();
        // Digits split one by one; the control token is matched whole.
        assert_eq!(toks, ["t", "he", "Ġ", "4", "2", "Ġ", "<|im_start|>"]);
        for s in ["the thé\n\n  tab\t 2024 — ✓ 🐋", "Once upon a time"] {
            let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), s);
        }
    }

    #[test]
    fn other_tokenizer_models_and_bad_merges_are_clear_errors() {
        let mut v = tiny_vocab();
        v.model = "llama".into();
        let e = tokenizer_json(&v).unwrap_err().to_string();
        assert!(e.contains("`llama`") && e.contains("gpt2"), "{e}");
        let mut v = tiny_vocab();
        v.merges.push("Ġ zz".into());
        assert!(tokenizer_json(&v).unwrap_err().to_string().contains("\"zz\""));
        let mut v = tiny_vocab();
        v.token_types.pop();
        assert!(tokenizer_json(&v).is_err());
    }
}
