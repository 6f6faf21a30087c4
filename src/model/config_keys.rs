//! Strict reading of a model's config.json.
//!
//! Every key of a Hugging Face config.json either changes what the model computes or it does
//! not, and serde's default of ignoring unknown keys cannot tell the two apart: a transformers 5
//! `rope_parameters` (θ = 1e6) read by a parser that knows only `rope_theta` silently computes
//! with θ = 10000. So each model config keeps the keys it does not parse into a field, and
//! [`check_other_keys`] accepts such a key only when it is on one of the lists below, each group
//! with the reason why its keys cannot change dptrain's computation; any other key is an error
//! that names it. Keys that switch on something dptrain does not implement are accepted only when
//! they are off ([`MUST_BE_OFF`]).

use serde_json::{Map, Value};

/// Keys known not to change dptrain's computation, for every model family, by reason.
pub const IGNORED_KEYS: &[(&str, &[&str])] = &[
    (
        "provenance and bookkeeping: who saved the file, with which library and for which class",
        &["_name_or_path", "_commit_hash", "architectures", "transformers_version", "transformers.js_config"],
    ),
    (
        "storage precision of the checkpoint: dptrain reads each tensor's dtype from the safetensors \
         header and computes in its own precision (model.base-dtype, f32 for everything trained)",
        &["torch_dtype", "dtype", "use_bfloat16"],
    ),
    (
        "runtime switches of transformers that change speed or memory, not the function computed: KV \
         cache, attention kernel, gradient checkpointing, tensor-parallel slicing of the same matmuls, \
         chunked feed-forward",
        &[
            "use_cache",
            "output_past",
            "attn_implementation",
            "_attn_implementation",
            "_attn_implementation_autoset",
            "gradient_checkpointing",
            "pretraining_tp",
            "chunk_size_feed_forward",
            "torchscript",
            "cache_implementation",
        ],
    ),
    (
        "which extra outputs transformers returns (attentions, hidden states, dicts): dptrain returns none",
        &["output_attentions", "output_hidden_states", "return_dict", "output_scores", "return_dict_in_generate"],
    ),
    (
        "initialisation of fresh weights: dptrain loads every base weight and initialises LoRA itself",
        &["initializer_range"],
    ),
    (
        "dropout probabilities: dptrain applies no dropout, in training or in evaluation (it has no \
         dropout layer and no LoRA dropout), so they never enter its computation",
        &[
            "attention_dropout",
            "attention_probs_dropout_prob",
            "hidden_dropout_prob",
            "classifier_dropout",
            "dropout",
            "qa_dropout",
            "seq_classif_dropout",
            "embd_pdrop",
            "resid_pdrop",
        ],
    ),
    (
        "special-token ids and tokenizer hints: the tokenizer (tokenizer.json) inserts special tokens; \
         padding is masked out, whatever its id",
        &[
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "sep_token_id",
            "cls_token_id",
            "mask_token_id",
            "decoder_start_token_id",
            "tokenizer_class",
            "directionality",
        ],
    ),
    (
        "task heads and label maps of transformers: dptrain builds its own classification head (labels \
         from the data) and, for language models, uses the LM head of the weights",
        &["id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params"],
    ),
    (
        "generation defaults of transformers' generate(): dptrain's only decoding is the greedy sanity \
         continuation, which takes no such settings",
        &[
            "max_length",
            "min_length",
            "do_sample",
            "early_stopping",
            "num_beams",
            "num_beam_groups",
            "diversity_penalty",
            "temperature",
            "top_k",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "length_penalty",
            "no_repeat_ngram_size",
            "encoder_no_repeat_ngram_size",
            "bad_words_ids",
            "num_return_sequences",
            "forced_bos_token_id",
            "forced_eos_token_id",
            "remove_invalid_values",
            "exponential_decay_length_penalty",
            "suppress_tokens",
            "begin_suppress_tokens",
            "prefix",
        ],
    ),
];

/// Keys that switch on something dptrain does not implement (a decoder with cross-attention, an
/// encoder-decoder, pruned heads, a decoder run with bidirectional attention): accepted only when
/// off (null, false, or an empty list/map).
pub const MUST_BE_OFF: &[&str] = &[
    "is_decoder",
    "add_cross_attention",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "pruned_heads",
    "use_bidirectional_attention",
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Checks the keys of a config.json that the family's config type did not parse (`other`):
/// each must be in [`IGNORED_KEYS`], in the family's own `family_ignored` groups, or be an off
/// [`MUST_BE_OFF`] switch. Returns a message naming every offending key.
pub fn check_other_keys(
    other: &Map<String, Value>,
    family_ignored: &[(&str, &[&str])],
    family: &str,
) -> Result<(), String> {
    let ignored = |k: &str| IGNORED_KEYS.iter().chain(family_ignored).any(|(_, keys)| keys.contains(&k));
    let mut unknown = Vec::new();
    for (k, v) in other {
        if MUST_BE_OFF.contains(&k.as_str()) {
            if !is_off(v) {
                return Err(format!("unsupported `{k}`: {v} (dptrain implements only the plain {family} model)"));
            }
        } else if !ignored(k) {
            unknown.push(format!("`{k}`"));
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    Err(format!(
        "unknown config key{} {}: dptrain refuses keys it does not understand, since they may change \
         what the {family} model computes (keys known not to matter are listed in src/model/config_keys.rs)",
        if unknown.len() > 1 { "s" } else { "" },
        unknown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn ignored_and_off_keys_pass_and_everything_else_is_named() {
        let ok = map(serde_json::json!({
            "architectures": ["X"], "dtype": "bfloat16", "use_cache": true, "is_decoder": false,
            "pruned_heads": {}, "attention_dropout": 0.1, "family_key": 1
        }));
        assert_eq!(check_other_keys(&ok, &[("test", &["family_key"])], "test"), Ok(()));
        let e = check_other_keys(&ok, &[], "test").unwrap_err();
        assert!(e.contains("`family_key`") && e.contains("unknown config key "), "{e}");
        let bad = map(serde_json::json!({"foo_scaling": 2, "quantization_config": {"bits": 4}}));
        let e = check_other_keys(&bad, &[], "test").unwrap_err();
        assert!(e.contains("`foo_scaling`") && e.contains("`quantization_config`"), "{e}");
        let on = map(serde_json::json!({"is_decoder": true}));
        let e = check_other_keys(&on, &[], "BERT").unwrap_err();
        assert!(e.contains("`is_decoder`"), "{e}");
        let pruned = map(serde_json::json!({"pruned_heads": {"0": [1]}}));
        assert!(check_other_keys(&pruned, &[], "BERT").unwrap_err().contains("`pruned_heads`"));
    }

    #[test]
    fn no_key_is_both_ignored_and_a_switch_and_no_key_is_listed_twice() {
        let mut all: Vec<&str> = IGNORED_KEYS.iter().flat_map(|(_, k)| k.iter().copied()).collect();
        all.extend(MUST_BE_OFF);
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a key is listed twice");
    }
}
