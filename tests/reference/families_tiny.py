"""Reference values for the model families (tests/families_reference.rs), from
transformers: per family, a tiny model (hidden 64, 2 layers, GQA 4/2 heads, head dim 16, tied
embeddings) with the family's own options switched on:
- llama3: LlamaForCausalLM with `rope_type = "llama3"` scaling whose original context (16) is
  shorter than the test sequences (24), so the scaled frequencies change the output;
- qwen3: Qwen3ForCausalLM (RMSNorm of every query and key head before RoPE, θ = 1e6);
- qwen2: Qwen2ForCausalLM (biases on q, k and v projections, none on o_proj);
- mistral: MistralForCausalLM with a sliding window (32) longer than the sequences;
- phi3: Phi3ForCausalLM (q, k, v fused in qkv_proj, gate and up in gate_up_proj; untied head);
- gemma2: Gemma2ForCausalLM ((1 + w) norms around attention and MLP, tanh-GELU GeGLU, embeddings
  times √hidden, query_pre_attn_scalar, attention and final-logit soft caps bending the values);
- gemma3: Gemma3ForCausalLM (text; Gemma 2 plus q/k norms, a linear-scaled RoPE on the global
  layer and another θ on the sliding one);
- roberta: the RoBERTa encoder (positions offset by pad_token_id + 1, one token type, LayerNorm
  eps 1e-5), on a batch with a right-padded sequence: its last hidden states at a few positions
  and the mask-weighted mean over real tokens (what dptrain's classification head reads);
- distilbert: the DistilBERT encoder (its own names, no token types), on the same batch.
Its weights follow a closed formula that the
Rust test reproduces exactly (no torch needed in CI): for a tensor named `name`,
  seed = Σ_i ord(name[i]) · (i + 1) mod 1009,
  v_k = ((k · 7919 + seed · 104729) mod 2003) / 2003 − 0.5   (k = flat index, row-major),
weights 0.2 · v_k, norm weights (a name ending in norm.weight, any case) 1 + 0.2 · v_k. Written per family: the config as transformers 5 saves it
(`rope_parameters`), the input ids, logits at a few positions, and each sequence's mean
next-token NLL; for llama3 also the NLL with plain RoPE (to show the scaling matters) and the
inverse frequencies transformers computes for Llama-3.2-1B's RoPE settings.

Run: .cache/pyenv/bin/python tests/reference/families_tiny.py > tests/reference/families_tiny.json
"""
import json

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM, RobertaConfig, RobertaModel, DistilBertConfig, DistilBertModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

torch.set_num_threads(1)


def formula(name, shape):
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 1009
    n = 1
    for d in shape:
        n *= d
    k = torch.arange(n, dtype=torch.float64)
    v = torch.remainder(k * 7919 + seed * 104729, 2003) / 2003 - 0.5
    scale_one = name.lower().endswith("norm.weight")
    v = 1 + 0.2 * v if scale_one else 0.2 * v
    return v.reshape(shape).to(torch.float32)


ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
             max_position_embeddings=128, tie_word_embeddings=True, hidden_act="silu",
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(config_cls, model_cls, rope):
    cfg = config_cls(rope_parameters=rope, **SHAPE)
    m = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "lm_head.weight":
                continue
            p.copy_(formula(name, tuple(p.shape)))
    return cfg, m


def mean_nll(m, ids):
    with torch.no_grad():
        logits = m(input_ids=ids).logits.double()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -lp.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logits, nll.mean(dim=1)


ids = torch.tensor([[(7 * i * i + 3 * i + 5 + 11 * b) % 93 + 3 for i in range(24)] for b in range(2)])
positions = [0, 7, 15, 23]


def entry(cfg, m):
    logits, nll = mean_nll(m, ids)
    return {
        "config": json.loads(cfg.to_json_string()),
        "logits": [[logits[b, p].tolist() for p in positions] for b in range(2)],
        "mean_nll": nll.tolist(),
    }


out = {
    "about": f"transformers {transformers.__version__}, torch {torch.__version__}: see tests/reference/families_tiny.py",
    "input_ids": ids.tolist(),
    "positions": positions,
}
cfg, m = build(LlamaConfig, LlamaForCausalLM, ROPE)
out["llama3"] = entry(cfg, m)
_, m_plain = build(LlamaConfig, LlamaForCausalLM, {"rope_type": "default", "rope_theta": 10000.0})
out["llama3"]["mean_nll_without"] = mean_nll(m_plain, ids)[1].tolist()
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
cfg, m = build(Qwen3Config, Qwen3ForCausalLM, QWEN_ROPE)
out["qwen3"] = entry(cfg, m)
cfg, m = build(Qwen2Config, Qwen2ForCausalLM, QWEN_ROPE)
out["qwen2"] = entry(cfg, m)
cfg = MistralConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=32, **SHAPE)
m = MistralForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in m.named_parameters():
        if name != "lm_head.weight":
            p.copy_(formula(name, tuple(p.shape)))
out["mistral"] = entry(cfg, m)
cfg = Phi3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 **{**SHAPE, "tie_word_embeddings": False})
m = Phi3ForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in m.named_parameters():
        p.copy_(formula(name, tuple(p.shape)))
out["phi3"] = entry(cfg, m)
# Gemma: GeGLU (tanh GELU) from `hidden_activation`, (1 + w) norms, embeddings times √hidden,
# query_pre_attn_scalar ≠ head_dim, a sliding layer then a global one (window longer than the
# sequences). Gemma 2 with soft caps small enough to bend these scores and logits; Gemma 3 with
# q/k norms and two RoPEs: linear-scaled θ = 1e6 on the global layer, plain θ = 1e4 on the
# sliding one.
GEMMA = {**{k: v for k, v in SHAPE.items() if k != "hidden_act"}, "hidden_activation": "gelu_pytorch_tanh",
         "query_pre_attn_scalar": 24, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]}
for family, cfg in [
    ("gemma2", Gemma2Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            attn_logit_softcapping=1.5, final_logit_softcapping=2.5, **GEMMA)),
    ("gemma3", Gemma3TextConfig(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **GEMMA)),
]:
    m = (Gemma2ForCausalLM if family == "gemma2" else Gemma3ForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(formula(name, tuple(p.shape)))
    out[family] = entry(cfg, m)

rcfg = RobertaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
rm = RobertaModel(rcfg, add_pooling_layer=False).eval()
with torch.no_grad():
    for name, p in rm.named_parameters():
        p.copy_(formula(name, tuple(p.shape)))
lengths = [20, 13]
r_ids = torch.ones(2, 20, dtype=torch.long)
for b, n in enumerate(lengths):
    r_ids[b, :n] = torch.tensor([0] + [(5 * i * i + 7 * i + 3 + 13 * b) % 92 + 3 for i in range(n - 2)] + [2])
r_mask = (r_ids != 1).long()
with torch.no_grad():
    hidden = rm(input_ids=r_ids, attention_mask=r_mask).last_hidden_state.double()
r_positions = [0, 5, 12]


def encoder_entry(cfg, hidden):
    pooled = (hidden * r_mask.unsqueeze(-1)).sum(1) / r_mask.sum(1, keepdim=True)
    return {
        "config": json.loads(cfg.to_json_string()),
        "input_ids": r_ids.tolist(),
        "lengths": lengths,
        "positions": r_positions,
        "hidden": [[hidden[b, p].tolist() for p in r_positions] for b in range(2)],
        "pooled": pooled.tolist(),
    }


out["roberta"] = encoder_entry(rcfg, hidden)
dcfg = DistilBertConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=40,
                        pad_token_id=1)
dm = DistilBertModel(dcfg).eval()
with torch.no_grad():
    for name, p in dm.named_parameters():
        p.copy_(formula(name, tuple(p.shape)))
    d_hidden = dm(input_ids=r_ids, attention_mask=r_mask).last_hidden_state.double()
out["distilbert"] = encoder_entry(dcfg, d_hidden)

big = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
inv_big, scale_big = ROPE_INIT_FUNCTIONS["llama3"](big, "cpu")
out["llama_3_2_1b_inv_freq"] = inv_big.double().tolist()
out["llama_3_2_1b_attention_scaling"] = scale_big
print(json.dumps(out, indent=1))
