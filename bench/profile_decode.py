"""Where a fast decode step spends its time: torch.profiler over a few steps of one fast-path mode.

    python bench/profile_decode.py --shape llama2-7b --layers 8 --mode lora --batch 16 --json out.json

Builds random models of a real shape from bench/decode.py (depth truncated with --layers: per-layer costs are
what matters), runs the fast decoder (CUDA graphs on a GPU) and, for comparison, the same step with graphs off,
then profiles `--steps` steps and prints the kernels / operators that took the most device (or CPU) time.
Modes: `single` (one model), `dense` (three models), `lora` (one base + a LoRA adapter per specialist, r = --rank;
`--adapters 2`: the first is the bare base), `lora-nolora` (the same group with its low-rank terms dropped: what the
adapters add).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, add_lora, lora_adapters, build_models, first_only, make_fused, make_prompts, sync


def build(args, dev, dtype):
    from ultrafuser.modeling.fast import FastFusedDecoder

    SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers or SHAPES[args.shape]["num_hidden_layers"]}
    n = 3 if args.mode == "dense" else 1
    models = build_models(args.shape, n, dev, dtype)
    if args.mode.startswith("lora"):
        adapters = lora_adapters(args.adapters)
        base = add_lora(models[0], args.rank, std=SHAPES[args.shape]["std"], names=[n for n in adapters if n])
        # lora-nolora: the same three rows per prompt through the shared base, no member with an adapter
        if args.mode == "lora-nolora":
            adapters = [None, None, None]
        fused = make_fused([base] * 3, adapters=adapters)
    elif args.mode == "dense":
        fused = make_fused(models)
    else:
        fused = make_fused(models, gate="uniform")
    max_len = args.prompt_len + args.steps * 3 + 8

    def decoder(graphs, lora_precision=None):
        return FastFusedDecoder(fused, max_batch=args.batch, max_len=max_len, cuda_graphs=graphs,
                                lora_precision=lora_precision or args.lora_precision)

    prompts = make_prompts(len(fused.specialists), args.batch, args.prompt_len, SHAPES[args.shape]["vocab_size"], 0)
    if args.mode == "single":
        prompts = first_only(prompts)
    return fused, decoder, prompts


def run_steps(dec, prompts, steps, dev):
    from ultrafuser.modeling.generation import SamplingParams

    params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    sync(dev)
    t0 = time.perf_counter()
    stamps = []
    for _ in dec.stream(prompts, params):
        stamps.append(time.perf_counter())
    sync(dev)
    per = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    per.sort()
    return {"prefill_ms": round((stamps[0] - t0) * 1e3, 2), "median_step_ms": round(per[len(per) // 2], 3)}


def check(fused, decoder, prompts, dev):
    """First fused logits (prefill) and 16 greedy tokens of the fast path vs the reference path."""
    from ultrafuser.modeling.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref_z = fused.start_decoding(prompts).logits.float()
    ref_tok = [c.token_ids for c in generate(fused, prompts, params, fast=False)]
    res = {}
    for prec in ("auto", "adapter"):
        dec = decoder(dev.type == "cuda", prec)
        z = dec.start_decoding(prompts)[0].float()
        tok = [c.token_ids for c in dec.generate(prompts, params)]
        agree = sum(a == b for r, f in zip(ref_tok, tok) for a, b in zip(r, f)) / sum(len(r) for r in ref_tok)
        res[prec] = {"max_rel_diff": round(float((z - ref_z).abs().max() / ref_z.abs().max()), 6),
                     "argmax_agree_first": float((z.argmax(-1) == ref_z.argmax(-1)).float().mean()),
                     "greedy_token_agreement_16": round(agree, 4)}
        del dec
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="truncate the depth (0: the real depth)")
    ap.add_argument("--mode", default="lora", choices=["single", "dense", "lora", "lora-nolora"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=3, choices=[1, 2, 3],
                    help="lora modes: how many of the three specialists have an adapter (2: the first is bare)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lora-precision", default="auto", choices=["auto", "adapter", "model"])
    ap.add_argument("--check", action="store_true",
                    help="also compare the first fused logits and 16 greedy tokens with the reference path, for "
                         "lora_precision auto and adapter")
    ap.add_argument("--decode-only", action="store_true",
                    help="profile --steps decode steps with the prefill left out (default: 8 steps with the prefill)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    fused, decoder, prompts = build(args, dev, dtype)
    out = {"args": vars(args), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    graphs = dev.type == "cuda"
    dec = decoder(graphs)
    run_steps(dec, prompts, args.steps, dev)  # warm-up: captures the graphs
    out["timing"] = run_steps(dec, prompts, args.steps, dev)
    if graphs:
        eager = decoder(False)
        run_steps(eager, prompts, 4, dev)
        out["timing_no_graphs"] = run_steps(eager, prompts, args.steps, dev)
        del eager
    if args.check:
        out["check"] = check(fused, decoder, prompts, dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if graphs else [])
    prof_dec = dec if not graphs else decoder(False)  # graph replays hide their kernels' names: profile eager
    run_steps(prof_dec, prompts, 4, dev)
    if args.decode_only:  # the prefill runs before the profiler starts; only the next --steps steps are in it
        from ultrafuser.modeling.generation import SamplingParams

        it = prof_dec.stream(prompts, SamplingParams(max_new_tokens=args.steps + 1, ignore_eos=True))
        next(it)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in it:
                pass
            sync(dev)
    else:
        with torch.profiler.profile(activities=acts) as prof:
            run_steps(prof_dec, prompts, min(args.steps, 8), dev)
    key = "self_device_time_total" if graphs else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key.replace("_total", "_total"), row_limit=args.top)
    print(json.dumps(out, indent=1))
    print(table)
    out["profile_table"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
