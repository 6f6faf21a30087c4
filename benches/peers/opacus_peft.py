#!/usr/bin/env python3
"""Peer benchmark: DP-LoRA with Opacus + PEFT in PyTorch, the same step `dptrain bench` times.

Model: all-MiniLM-L6-v2 (a HF folder, default the one scripts/fetch-assets.sh fetches) with LoRA
(rank r, alpha 2r, no dropout) on the given target modules of every layer, plus a linear head on
the attention-masked mean of the last hidden states (dptrain's classifier). Batch: a fixed batch
of B records of --seq-len tokens (random ids, as `dptrain bench`; no padding), the same every
step. Variants, interleaved step by step after a warm-up, in one process:
  - non-private: PEFT LoRA, plain backward, AdamW;
  - opacus: Opacus GradSampleModule per-sample gradients (hooks), DPOptimizer clipping to C and
    adding N(0, sigma^2 C^2) noise, AdamW.
Prints median step time and examples/s of each, and their ratio, as text and (--json) JSON.
Run by hand (it needs torch, transformers, peft, opacus); see BENCHMARKS.md ("Peer comparison").
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import torch
    import transformers
    import peft
    import opacus
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
except ImportError as e:
    sys.exit(f"needs torch, transformers, peft and opacus: {e}")


class Classifier(torch.nn.Module):
    """PEFT-wrapped encoder + linear head over the masked mean (dptrain's head)."""

    def __init__(self, encoder, hidden, labels):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, labels)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def build(args):
    base = transformers.AutoModel.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=args.targets.split(","))
    enc = peft.get_peft_model(base, cfg)
    model = Classifier(enc, base.config.hidden_size, 2)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, ".cache/models/all-MiniLM-L6-v2"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    vocab = transformers.AutoConfig.from_pretrained(args.model).vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)
    labels = torch.arange(args.batch) % 2
    loss_fn = torch.nn.CrossEntropyLoss()

    plain = build(args)
    plain_opt = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)

    private = build(args)
    gsm = GradSampleModule(private)
    dp_opt = DPOptimizer(
        torch.optim.AdamW([q for q in gsm.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0),
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        expected_batch_size=args.batch,
    )
    trainable = sum(q.numel() for q in plain.parameters() if q.requires_grad)

    def step_plain():
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain(ids, mask), labels).backward()
        plain_opt.step()

    def step_dp():
        dp_opt.zero_grad(set_to_none=True)
        loss_fn(gsm(ids, mask), labels).backward()
        dp_opt.step()

    times = {"non-private": [], "opacus": []}
    for i in range(args.warmup + args.steps):
        for name, f in (("non-private", step_plain), ("opacus", step_dp)):
            t0 = time.perf_counter()
            f()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    out = {
        "peer": "opacus + peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "opacus": opacus.__version__},
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "targets": args.targets.split(","),
        "trainable_params": trainable,
        "threads": args.threads,
        "steps": args.steps,
        "results": [],
    }
    for name, t in times.items():
        med = statistics.median(t)
        out["results"].append({"variant": name, "median_step_ms": med * 1e3, "examples_per_s": args.batch / med})
    out["dp_over_non_private"] = out["results"][1]["examples_per_s"] / out["results"][0]["examples_per_s"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"Opacus {opacus.__version__} + PEFT {peft.__version__}, torch {torch.__version__}, {args.threads} threads; "
              f"{args.model}, batch {args.batch} x {args.seq_len} tokens, LoRA r{args.rank} on {args.targets}, {trainable} trainable")
        for r in out["results"]:
            print(f"  {r['variant']:<12} median step {r['median_step_ms']:9.1f} ms   {r['examples_per_s']:8.1f} examples/s")
        print(f"  DP / non-private throughput: {out['dp_over_non_private']:.3f}")


if __name__ == "__main__":
    main()
