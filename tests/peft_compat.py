#!/usr/bin/env python3
"""Adapters written by dptrain load unchanged with Hugging Face PEFT and give dptrain's outputs.

For each family (BERT: all-MiniLM-L6-v2 on SpamAssassin; Llama: SmolLM2-135M-Instruct on
Moby-Dick; and tiny random models that transformers creates and saves here for every other
supported architecture: RoBERTa, XLM-R and DistilBERT with MiniLM's tokenizer, Llama 3 (llama3
RoPE), Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 with SmolLM2's), this trains a small DP
adapter with the dptrain binary, evaluates it with
`dptrain eval --json`, then loads the same folder with `PeftModel.from_pretrained(base, folder)`
in PyTorch and recomputes the metric on the same records:
  - BERT: accuracy of argmax(mean-pooled PEFT hidden states @ head), the head being the adapter's
    `base_model.model.classifier.*` tensors (PEFT cannot attach a head to a bare `BertModel`,
    so it is applied here, as dptrain does: a linear layer over the masked mean);
  - Llama: token-level perplexity exp(sum NLL / targets) over every token after the first.
It also checks that every LoRA tensor PEFT loaded equals the file's, so nothing was silently
dropped. Skipped (exit 0) when torch, transformers or peft are missing. Needs the assets of
scripts/fetch-assets.sh and a release build (target/release/dptrain).

Run: python3 tests/peft_compat.py   (see README, "Adapters in PEFT")
"""
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DPTRAIN", os.path.join(ROOT, "target", "release", "dptrain"))

try:
    import torch
    import transformers
    import peft
    from safetensors.torch import load_file
except ImportError as e:  # pragma: no cover - the skip path
    print(f"SKIP: peft_compat needs torch, transformers and peft ({e})")
    print("0 passed, 0 failed, 1 skipped")
    sys.exit(0)

torch.set_grad_enabled(False)
RESULTS = []


def check(name, ok, detail):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")


def dptrain(*args):
    out = subprocess.run([BIN, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"dptrain {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def sample_lines(src, dst, n):
    """n evenly spaced lines of src (the files are grouped by label)."""
    lines = open(src).readlines()
    step = max(1, len(lines) // n)
    with open(dst, "w") as g:
        g.writelines(lines[::step][:n])


def train(tmp, name, model, data, test, extra):
    cfg = os.path.join(tmp, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[model]\npath = "{model}"\nmax-seq-len = {extra["len"]}\n\n'
            f'[data]\ntrain = "{data}"\ntest = "{test}"\n\n'
            f'[lora]\nrank = 4\nalpha = 8\ntarget-modules = {json.dumps(extra["targets"])}\n\n'
            f"[privacy]\ntarget-epsilon = 8.0\ndelta = 1e-4\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n"
            f'[training]\nexpected-batch-size = 16\nmax-physical-batch = 8\nsteps = 4\nlearning-rate = {extra["lr"]}\n\n'
            f'[output]\ndir = "{os.path.join(tmp, name)}"\n'
        )
    dptrain("--config", cfg)
    # The publishable part of the run folder is what PEFT loads.
    return os.path.join(tmp, name, "release")


def lora_tensors_match(model, adapter_dir):
    """Every LoRA tensor of the file is in the PEFT model, with the same values."""
    want = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    have = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    lora = [k for k in want if "lora_" in k]
    missing = [k for k in lora if k not in have]
    worst = max((float((have[k].float() - want[k].float()).abs().max()) for k in lora if k in have), default=0.0)
    # Trained B != 0: otherwise the adapter is the identity and agreement would prove nothing.
    b = max((float(want[k].abs().max()) for k in lora if "lora_B" in k), default=0.0)
    ok = len(lora) > 0 and not missing and worst == 0.0 and b > 0.0
    return ok, f"{len(lora)} LoRA tensors, missing {missing[:3]}, max |diff| {worst}, max |B| {b:.3g}"


def wrapped_modules_match(model, adapter_dir):
    """The set of modules PEFT wrapped with LoRA equals the set dptrain trained (PEFT matches short
    target names by suffix; dptrain writes full names so nothing else is wrapped)."""
    want = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    ours = {k[len("base_model.model."):-len(".lora_A.weight")] for k in want if k.endswith(".lora_A.weight")}
    theirs = {n[len("base_model.model."):] for n, m in model.named_modules() if hasattr(m, "lora_A") and n.startswith("base_model.model.")}
    return ours == theirs and len(ours) > 0, f"{len(ours)} trained, {len(theirs)} wrapped by PEFT, differ: {sorted(ours ^ theirs)[:4]}"


MINILM = os.path.join(ROOT, ".cache/models/all-MiniLM-L6-v2")
SMOLLM2 = os.path.join(ROOT, ".cache/models/SmolLM2-135M-Instruct")


def tiny_model(tmp, name, config, model_cls, tokenizer_dir):
    """A tiny random model of `config` saved by transformers into tmp/name, with the tokenizer
    of `tokenizer_dir` (its vocabulary size is the config's)."""
    torch.manual_seed(0)
    d = os.path.join(tmp, name)
    model_cls(config).eval().save_pretrained(d)
    import shutil
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), d)
    return d


def tiny_families(tmp):
    """(name, model folder, tokenizer folder, kind, LoRA targets) of every tiny architecture."""
    enc = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, max_position_embeddings=130, type_vocab_size=1, layer_norm_eps=1e-5)
    dec = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
               max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    T = transformers
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return [
        ("roberta", tiny_model(tmp, "tiny-roberta", T.RobertaConfig(**enc), T.RobertaModel, MINILM), MINILM,
         "encoder", ["query", "value", "output.dense"]),
        ("xlm-roberta", tiny_model(tmp, "tiny-xlmr", T.XLMRobertaConfig(**enc), T.XLMRobertaModel, MINILM), MINILM,
         "encoder", ["key", "intermediate.dense"]),
        ("distilbert", tiny_model(tmp, "tiny-distilbert", T.DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=4,
         hidden_dim=96, max_position_embeddings=130), T.DistilBertModel, MINILM), MINILM, "encoder", ["q_lin", "v_lin", "lin2"]),
        ("llama3", tiny_model(tmp, "tiny-llama3", T.LlamaConfig(rope_parameters=llama3, **dec), T.LlamaForCausalLM, SMOLLM2),
         SMOLLM2, "decoder", ["q_proj", "v_proj", "down_proj"]),
        ("mistral", tiny_model(tmp, "tiny-mistral", T.MistralConfig(sliding_window=None, **dec), T.MistralForCausalLM, SMOLLM2),
         SMOLLM2, "decoder", ["q_proj", "k_proj", "up_proj"]),
        ("qwen2", tiny_model(tmp, "tiny-qwen2", T.Qwen2Config(**dec), T.Qwen2ForCausalLM, SMOLLM2), SMOLLM2, "decoder",
         ["q_proj", "v_proj", "o_proj"]),
        ("qwen3", tiny_model(tmp, "tiny-qwen3", T.Qwen3Config(**dec), T.Qwen3ForCausalLM, SMOLLM2), SMOLLM2, "decoder",
         ["q_proj", "k_proj", "gate_proj"]),
        ("phi3", tiny_model(tmp, "tiny-phi3", T.Phi3Config(**{**dec, "tie_word_embeddings": False}), T.Phi3ForCausalLM, SMOLLM2),
         SMOLLM2, "decoder", ["qkv_proj", "gate_up_proj", "down_proj"]),
        ("gemma2", tiny_model(tmp, "tiny-gemma2", T.Gemma2Config(**{**dec, "sliding_window": 128}), T.Gemma2ForCausalLM,
         SMOLLM2), SMOLLM2, "decoder", ["q_proj", "o_proj", "up_proj"]),
        ("gemma3", tiny_model(tmp, "tiny-gemma3", T.Gemma3TextConfig(**{**dec, "sliding_window": 128}),
         T.Gemma3ForCausalLM, SMOLLM2), SMOLLM2, "decoder", ["q_proj", "k_proj", "down_proj"]),
    ]


def bert(tmp, name="bert", model_dir=MINILM, tokenizer_dir=MINILM, targets=("query", "value", "output.dense")):
    data, test = os.path.join(tmp, "spam-train.jsonl"), os.path.join(tmp, "spam-test.jsonl")
    sample_lines(os.path.join(ROOT, ".cache/data/spamassassin/train.jsonl"), data, 400)
    sample_lines(os.path.join(ROOT, ".cache/data/spamassassin/test.jsonl"), test, 64)
    # output.dense as well: its short name is a suffix of attention.output.dense, which PEFT would
    # also wrap if the adapter config listed short names.
    adapter = train(tmp, name, model_dir, data, test, {"len": 64, "targets": list(targets), "lr": 0.05})
    ours = json.loads(dptrain("eval", "--model", model_dir, "--adapter", adapter, "--data", test, "--max-seq-len", "64", "--json"))
    labels = json.load(open(os.path.join(adapter, "privacy_report.json")))["dataset"]["labels"]

    base = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ok, detail = lora_tensors_match(model, adapter)
    check(f"{name}: PeftModel.from_pretrained loads every LoRA tensor unchanged", ok, detail)
    ok, detail = wrapped_modules_match(model, adapter)
    check(f"{name}: PEFT wraps exactly the modules dptrain trained", ok, detail)
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    w, b = tensors["base_model.model.classifier.weight"], tensors["base_model.model.classifier.bias"]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    records = [json.loads(l) for l in open(test)]
    correct = 0
    for r in records:
        enc = tok(r["text"], truncation=True, max_length=64, return_tensors="pt")
        if base.config.model_type == "distilbert":
            enc.pop("token_type_ids", None)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        pred = int((pooled @ w.T + b).argmax(-1))
        correct += labels[pred] == str(r["label"])
    acc = correct / len(records)
    check(f"{name}: PEFT accuracy equals dptrain eval", acc == ours["metric"]["accuracy"], f"PEFT {acc} vs dptrain {ours['metric']['accuracy']} on {len(records)} records")


def llama(tmp, name="llama", model_dir=SMOLLM2, tokenizer_dir=SMOLLM2,
          targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    data, test = os.path.join(tmp, "moby-train.jsonl"), os.path.join(tmp, "moby-test.jsonl")
    sample_lines(os.path.join(ROOT, ".cache/data/moby-dick/train.jsonl"), data, 200)
    sample_lines(os.path.join(ROOT, ".cache/data/moby-dick/test.jsonl"), test, 24)
    adapter = train(tmp, name, model_dir, data, test, {"len": 64, "targets": list(targets), "lr": 0.01})
    ours = json.loads(dptrain("eval", "--model", model_dir, "--adapter", adapter, "--data", test, "--max-seq-len", "64", "--json", "--samples", "0"))

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ok, detail = lora_tensors_match(model, adapter)
    check(f"{name}: PeftModel.from_pretrained loads every LoRA tensor unchanged", ok, detail)
    ok, detail = wrapped_modules_match(model, adapter)
    check(f"{name}: PEFT wraps exactly the modules dptrain trained", ok, detail)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    nll, count = 0.0, 0
    for line in open(test):
        ids = tok(json.loads(line)["text"])["input_ids"][:64]
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)[0]
        nll -= float(logp[torch.arange(len(ids) - 1), x[0, 1:]].sum())
        count += len(ids) - 1
    ppl = math.exp(nll / count)
    theirs = ours["metric"]["perplexity"]
    rel = abs(ppl / theirs["perplexity"] - 1)
    check(
        f"{name}: PEFT perplexity equals dptrain eval (relative 1e-4)",
        count == theirs["tokens"] and rel < 1e-4,
        f"PEFT {ppl:.6f} over {count} tokens vs dptrain {theirs['perplexity']:.6f} over {theirs['tokens']} (rel {rel:.2e})",
    )


def main():
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} missing: cargo build --release first")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        bert(tmp)
        llama(tmp)
        for name, model_dir, tokenizer_dir, kind, targets in tiny_families(tmp):
            (bert if kind == "encoder" else llama)(tmp, name, model_dir, tokenizer_dir, targets)
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
