#!/usr/bin/env python3
r"""Peer benchmark: LoRA and DP-LoRA with PEFT + Opacus in PyTorch, the step `dptrain bench` times.

Two model families, chosen by --family or from the model folder's config.json (model_type):
  - bert (default model all-MiniLM-L6-v2): LoRA on the target modules (default query,value) of
    every layer plus a linear head (2 labels) on the attention-masked mean of the last hidden
    states (dptrain's classifier); the loss of a record is the cross-entropy of its label.
  - llama (default model SmolLM2-135M-Instruct; also qwen2 / mistral folders): the causal LM with
    LoRA on the target modules (default q_proj,v_proj) of every layer and the frozen (tied) LM
    head, applied only at the target positions as dptrain does; the loss of a record is the mean
    next-token NLL over its tokens after the first.
LoRA: rank r, alpha 2r (dptrain bench's default), no dropout; LoRA A, B (and the BERT head) set
to U(-0.05, 0.05) as dptrain bench does (B = 0 would make A's gradient zero). No dropout anywhere
(dptrain has none): the model is in eval mode except the modules that own trainable parameters,
which Opacus's hooks need in training mode. Batch: B records of --seq-len random token ids (no
padding, labels i mod 2), the same every step, moved to the device inside the timed step.
Each step: zero grads, forward, backward, optimiser step (AdamW, lr 1e-4, no weight decay),
then a device synchronisation before the clock is read.

Variants (--variants, default all three):
  - non-private: PEFT LoRA, backward of the mean loss, AdamW;
  - opacus-hooks: PrivacyEngine.make_private(grad_sample_mode="hooks"): GradSampleModule
    per-sample gradients, DPOptimizer clipping each record's gradient to C, adding N(0, σ²C²)
    noise and dividing by the expected batch size B, AdamW;
  - opacus-ghost: make_private(grad_sample_mode="ghost"): ghost clipping (per-sample gradient
    norms without per-sample gradients, then a second backward of the clip-weighted loss via
    DPLossFastGradientClipping), the same noise, division and AdamW. If Opacus cannot do it for
    the model, the reason is printed and the variant is skipped (no fallback to hooks); if some
    trainable module has no ghost norm sampler (Opacus then uses per-sample gradients for it),
    that is printed too.
Opacus's loss_reduction is "mean" (per-sample gradients are those of each record's loss), and
make_private gets a DataLoader of the same B records with poisson_sampling=False, so the expected
batch size is B and every step uses the fixed batch, as `dptrain bench` does.

Processes and order: each variant runs alone in its own Python subprocess (this script with the
internal --only VARIANT), which loads the model, takes --warmup untimed and --steps timed steps,
and reports its step times and its memory. That gives every variant its own peak memory, but
variants are not interleaved step by step as in `dptrain bench`: instead the sequence of
variants is repeated --rounds times (default 3), the order reversed every other round, and the
reported step time of a variant is the median over rounds of each round's median step. Memory:
the process's peak resident set (getrusage ru_maxrss: model loading included, the max over
rounds), and the peak resident set of the timed steps alone (Linux: VmHWM after resetting it
through /proc/self/clear_refs before the timed steps, as dptrain bench's "RSS" column; the max
over rounds); on CUDA also torch.cuda.max_memory_allocated over the timed steps.

Prints median step time, examples/s, tokens/s (all B·T tokens, as dptrain bench), memory and the
ratios to non-private; --json FILE writes all of it. Run by hand: it needs torch, transformers,
peft and opacus (python3 -m venv .cache/pyenv && .cache/pyenv/bin/pip install torch transformers
peft opacus); no test runs it. The recorded comparisons (BENCHMARKS.md, "Peer benchmark: PEFT
LoRA vs Opacus DP-LoRA, MiniLM and SmolLM2"), from the repository root:

  .cache/pyenv/bin/python benches/peers/opacus_peft.py --family bert \
      --model .cache/models/all-MiniLM-L6-v2 --targets query,value --batch 32 --seq-len 64 \
      --steps 10 --warmup 2 --rounds 3 --json .cache/peer-minilm-32x64.json
  .cache/pyenv/bin/python benches/peers/opacus_peft.py --family bert \
      --model .cache/models/all-MiniLM-L6-v2 --targets query,value --batch 32 --seq-len 128 \
      --steps 10 --warmup 2 --rounds 3 --json .cache/peer-minilm-32x128.json
  .cache/pyenv/bin/python benches/peers/opacus_peft.py --family llama \
      --model .cache/models/SmolLM2-135M-Instruct --targets q_proj,v_proj --batch 8 --seq-len 128 \
      --steps 10 --warmup 2 --rounds 3 --json .cache/peer-smollm2-8x128.json

Smoke test (seconds per variant): add --batch 2 --seq-len 16 --steps 2 --warmup 1 --rounds 1.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODELS = {
    "bert": os.path.join(ROOT, ".cache/models/all-MiniLM-L6-v2"),
    "llama": os.path.join(ROOT, ".cache/models/SmolLM2-135M-Instruct"),
}
DEFAULT_TARGETS = {"bert": "query,value", "llama": "q_proj,v_proj"}
# model_type (config.json) → family.
FAMILIES = {"bert": "bert", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
VARIANTS = ["non-private", "opacus-hooks", "opacus-ghost"]
LR = 1e-4


def family_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in FAMILIES:
        sys.exit(f"{model_dir}: model_type {model_type!r} is not one of {sorted(FAMILIES)}; give --family")
    return FAMILIES[model_type]


def proc_status_bytes(key):
    """A size line of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Child: one variant in this process.


def child(args):
    import warnings

    import torch
    import transformers
    import peft
    import opacus
    from opacus import PrivacyEngine

    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and accountant notes
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

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

    class CausalLm(torch.nn.Module):
        """PEFT-wrapped decoder; logits at the target positions only (all but the last)."""

        def __init__(self, peft_model):
            super().__init__()
            self.lm = peft_model

        def forward(self, ids):
            inner = self.lm.base_model.model  # the *ForCausalLM with LoRA layers injected
            h = inner.model(input_ids=ids).last_hidden_state
            return inner.lm_head(h[:, :-1])

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(args.model)
    ids_cpu = torch.randint(1, cfg.vocab_size, (args.batch, args.seq_len))
    labels_cpu = torch.arange(args.batch) % 2
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=args.targets.split(",")
    )
    auto = transformers.AutoModel if args.family == "bert" else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    if args.family == "bert":
        model = Classifier(peft.get_peft_model(base, lora), base.config.hidden_size, 2)
    else:
        model = CausalLm(peft.get_peft_model(base, lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for q in model.parameters():
            if q.requires_grad:
                q.uniform_(-0.05, 0.05)
    # No dropout anywhere; the modules that own trainable parameters in training mode (Opacus's
    # hooks skip modules in eval mode).
    model.eval()
    for m in model.modules():
        if any(q.requires_grad for q in m.parameters(recurse=False)):
            m.train()
    model.training = True  # the wrapper alone (no dropout of its own): Opacus's validator asks for it
    model.to(device)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    ce = torch.nn.CrossEntropyLoss()

    def record_losses(out, ids, labels):
        """Each record's loss, [B]."""
        if args.family == "bert":
            return torch.nn.functional.cross_entropy(out, labels, reduction="none")
        nll = torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return nll.view(ids.shape[0], -1).mean(1)

    def inputs(ids):
        return (ids, torch.ones_like(ids)) if args.family == "bert" else (ids,)

    notes = []
    variant = args.only
    if variant == "non-private":
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR, weight_decay=0.0)

        def step():
            ids, labels = ids_cpu.to(device), labels_cpu.to(device)
            opt.zero_grad(set_to_none=True)
            loss = record_losses(model(*inputs(ids)), ids, labels).mean()
            loss.backward()
            opt.step()
            return loss

    else:
        mode = {"opacus-hooks": "hooks", "opacus-ghost": "ghost"}[variant]
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR, weight_decay=0.0)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(ids_cpu, labels_cpu), batch_size=args.batch
        )
        engine = PrivacyEngine(accountant="rdp")
        try:
            made = engine.make_private(
                module=model,
                optimizer=opt,
                criterion=ce,
                data_loader=loader,
                noise_multiplier=args.sigma,
                max_grad_norm=args.clip,
                loss_reduction="mean",
                poisson_sampling=False,
                grad_sample_mode=mode,
            )
        except Exception as e:  # noqa: BLE001 — ghost: reported, the variant skipped; hooks: an error
            if mode != "ghost":
                raise
            return {"variant": variant, "skipped": f"make_private(grad_sample_mode='ghost') failed: {type(e).__name__}: {e}"}
        if mode == "ghost":
            gsm, dp_opt, dp_loss, _ = made
            missing = sorted(
                {
                    type(m).__name__
                    for m in gsm._module.modules()
                    if any(q.requires_grad for q in m.parameters(recurse=False)) and type(m) not in gsm.NORM_SAMPLERS
                }
            )
            if missing:
                notes.append(f"no ghost norm sampler for {missing}: Opacus uses per-sample gradients for them")
        else:
            gsm, dp_opt, _ = made
        if dp_opt.expected_batch_size != args.batch:
            sys.exit(f"{variant}: expected batch size {dp_opt.expected_batch_size}, not {args.batch}")

        def step():
            ids, labels = ids_cpu.to(device), labels_cpu.to(device)
            dp_opt.zero_grad(set_to_none=True)
            out = gsm(*inputs(ids))
            if mode == "hooks":
                loss = record_losses(out, ids, labels).mean()
            elif args.family == "bert":
                loss = dp_loss(out, labels)
            else:
                # Per-token losses viewed as [B, T-1] and averaged within each record.
                loss = dp_loss(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1), shape=out.shape[:2])
            loss.backward()
            dp_opt.step()
            return loss

    dropping = [type(m).__name__ for m in model.modules() if m.training and isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropping:
        sys.exit(f"{variant}: dropout in training mode ({dropping}); dptrain has none")

    times, losses = [], []
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                rss_before_steps = proc_status_bytes("VmRSS")
                try:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # resets VmHWM to the current RSS (Linux)
                    hwm_reset = True
                except OSError:
                    hwm_reset = False
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            dt = time.perf_counter() - t0
            losses.append(float(loss.item()))
            if i >= args.warmup:
                times.append(dt)
    except Exception as e:  # noqa: BLE001
        if variant == "opacus-ghost" and not times:
            return {"variant": variant, "skipped": f"ghost clipping step failed: {type(e).__name__}: {e}"}
        raise
    steps_hwm = proc_status_bytes("VmHWM") if hwm_reset else None
    maxrss = max(maxrss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "variant": variant,
        "times_s": times,
        "losses": losses,
        "peak_rss_bytes": maxrss,
        "steps_peak_rss_bytes": steps_hwm,
        "rss_before_steps_bytes": rss_before_steps,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "trainable_params": trainable,
        "notes": notes,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "opacus": opacus.__version__,
        },
    }


# ---------------------------------------------------------------------------------------------
# Parent: rounds of subprocesses, then the report.


def child_argv(args, variant, result_file):
    argv = [sys.executable, os.path.abspath(__file__), "--family", args.family, "--model", args.model]
    for flag, value in (
        ("--batch", args.batch),
        ("--seq-len", args.seq_len),
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--rank", args.rank),
        ("--targets", args.targets),
        ("--sigma", args.sigma),
        ("--clip", args.clip),
        ("--threads", args.threads),
        ("--device", args.device),
        ("--attn", args.attn),
    ):
        argv += [flag, str(value)]
    return argv + ["--only", variant, "--result-file", result_file]


def run_child(args, variant):
    fd, path = tempfile.mkstemp(prefix="opacus_peft_", suffix=".json")
    os.close(fd)
    try:
        p = subprocess.run(child_argv(args, variant, path), capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
            sys.exit(f"variant {variant} failed (exit {p.returncode})")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["bert", "llama"], help="default: from the model's config.json, else bert")
    p.add_argument("--model", help="HF model folder (default: the family's model under .cache/models)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant (order reversed every other round)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", help="comma-separated LoRA targets (default query,value / q_proj,v_proj)")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attention implementation")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, some of {VARIANTS}")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # internal: where --only writes
    args = p.parse_args()

    if args.family is None:
        args.family = family_of(args.model) if args.model else "bert"
    if args.model is None:
        args.model = DEFAULT_MODELS[args.family]
    if args.targets is None:
        args.targets = DEFAULT_TARGETS[args.family]
    if args.batch < 1 or args.seq_len < 2 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        sys.exit("batch ≥ 1, seq-len ≥ 2, steps ≥ 1, rounds ≥ 1 and warmup ≥ 0 are required")

    if args.only:
        result = child(args)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r} (expected some of {VARIANTS})")
    runs = {v: [] for v in variants}
    skipped = {}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            if v in skipped:
                continue
            t0 = time.perf_counter()
            res = run_child(args, v)
            if "skipped" in res:
                skipped[v] = res["skipped"]
                print(f"round {r + 1}: {v} SKIPPED: {res['skipped']}", flush=True)
                continue
            runs[v].append(res)
            print(
                f"round {r + 1}: {v:<13} median step {statistics.median(res['times_s']) * 1e3:9.1f} ms "
                f"(process {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            for n in res["notes"]:
                print(f"  note ({v}): {n}", flush=True)

    tokens = args.batch * args.seq_len
    any_run = next((rs[0] for rs in runs.values() if rs), None)
    out = {
        "peer": "peft + opacus",
        "versions": any_run["versions"] if any_run else None,
        "family": args.family,
        "model": args.model,
        "device": args.device,
        "attn_implementation": args.attn,
        "threads": args.threads,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_batch": tokens,
        "rank": args.rank,
        "lora_alpha": 2 * args.rank,
        "targets": args.targets.split(","),
        "trainable_params": any_run["trainable_params"] if any_run else None,
        "sigma": args.sigma,
        "clip": args.clip,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "method": "each variant in its own subprocess, rounds in alternating order; step time = median over "
        "rounds of the round's median; memory = max over rounds",
        "results": [],
        "skipped": skipped,
    }
    for v in variants:
        rs = runs[v]
        if not rs:
            continue
        per_round = [statistics.median(r["times_s"]) for r in rs]
        every = [t for r in rs for t in r["times_s"]]
        med = statistics.median(per_round)
        maxof = lambda key: max((r[key] for r in rs if r[key] is not None), default=None)  # noqa: E731
        out["results"].append(
            {
                "variant": v,
                "median_step_ms": med * 1e3,
                "round_median_step_ms": [t * 1e3 for t in per_round],
                "min_step_ms": min(every) * 1e3,
                "max_step_ms": max(every) * 1e3,
                "examples_per_s": args.batch / med,
                "tokens_per_s": tokens / med,
                "peak_rss_bytes": maxof("peak_rss_bytes"),
                "steps_peak_rss_bytes": maxof("steps_peak_rss_bytes"),
                "rss_before_steps_bytes": maxof("rss_before_steps_bytes"),
                "cuda_peak_allocated_bytes": maxof("cuda_peak_allocated_bytes"),
                "first_losses": [r["losses"][0] for r in rs],
                "notes": sorted({n for r in rs for n in r["notes"]}),
            }
        )
    base = next((x for x in out["results"] if x["variant"] == "non-private"), None)
    for x in out["results"]:
        x["throughput_vs_non_private"] = x["examples_per_s"] / base["examples_per_s"] if base else None
        for key in ("peak_rss_bytes", "steps_peak_rss_bytes", "cuda_peak_allocated_bytes"):
            b = base[key] if base else None
            x[key.replace("_bytes", "_vs_non_private")] = x[key] / b if b and x[key] is not None else None

    v = out["versions"] or {}
    print(
        f"\nPEFT {v.get('peft')} + Opacus {v.get('opacus')}, torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}; {args.device}, {args.threads} threads, {args.attn} attention\n"
        f"{args.model} ({args.family}), batch {args.batch} x {args.seq_len} random tokens, LoRA r {args.rank} / "
        f"alpha {2 * args.rank} on {args.targets} ({out['trainable_params']} trainable); sigma {args.sigma}, C {args.clip}\n"
        f"median over {args.rounds} round(s) of the median of {args.steps} steps (after {args.warmup} warm-up), "
        "each variant in its own process"
    )
    cuda = args.device.startswith("cuda")
    header = (
        f"{'variant':<13} {'median ms':>10} {'examples/s':>11} {'tokens/s':>10} {'vs non-priv':>11} "
        f"{'RSS MiB':>8} {'steps RSS':>9} {'before':>7}"
    )
    print(header + (f" {'CUDA MiB':>9}" if cuda else ""))
    for x in out["results"]:
        ratio = "-" if x["throughput_vs_non_private"] is None else f"{x['throughput_vs_non_private']:.3f}x"
        line = (
            f"{x['variant']:<13} {x['median_step_ms']:10.1f} {x['examples_per_s']:11.2f} {x['tokens_per_s']:10.1f} "
            f"{ratio:>11} {mib(x['peak_rss_bytes']):>8} {mib(x['steps_peak_rss_bytes']):>9} "
            f"{mib(x['rss_before_steps_bytes']):>7}"
        )
        print(line + (f" {mib(x['cuda_peak_allocated_bytes']):>9}" if cuda else ""))
    for name, why in skipped.items():
        print(f"{name:<13} skipped: {why}")
    print(
        "RSS MiB: the process's peak resident set, model loading included; steps RSS: the peak resident set "
        "of the timed steps (VmHWM reset before them); before: the resident set just before them (after warm-up)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
