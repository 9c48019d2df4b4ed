"""The decode step's attention on the CPU, per layer, the measurement behind `fast_llama.Group.kv_dtype`: one query
token's scores against a cache slice that grows by one slot every step (as in decoding: a new shape each step),
softmax in fp32, then the weighted values — with the cache in the model's half-precision dtype (scores in that
dtype, as the fast path did before), with the cache in fp32 (what it keeps on the CPU now), and with the
half-precision cache through PyTorch's fused attention (`sdpa_half_us`: F.scaled_dot_product_attention, fp32
scores inside, output in the half dtype; half the cache bytes of fp32, the alternative weighed against it).
Default shape: SmolLM2-135M (30 layers, 3 KV heads of 64, 3 query heads each); `--batches` counts batch rows x
members, e.g. 4 prompts x 3 LoRA specialists = 12. `--prompt-len` sets where the attention length starts: the fp32
cache reads twice the bytes, so at long lengths its advantage shrinks.

    python bench/cpu_attention.py [--batches 1,3,4,12 --prompt-len 64 --steps 32 --dtype bfloat16 --json OUT.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cpu_micro import add_row, parse, write_json


def step_us(rows: int, kv_heads: int, rep: int, head_dim: int, layers: int, prompt_len: int, steps: int, kv_dtype,
            q_dtype, sdpa: bool = False) -> float:
    """Mean µs per layer of the decode attention over `steps` steps (attention length prompt_len + 1, + 2, ...),
    each step going through `layers` layers' caches (so they are read from memory, as in a real step); `sdpa`: the
    same through F.scaled_dot_product_attention (a boolean mask of the attended slots, as the fast path passes)."""
    gen = torch.Generator().manual_seed(0)
    n, t_max = rows * kv_heads, prompt_len + steps + 1
    kcs = [torch.randn((n, t_max, head_dim), generator=gen).to(kv_dtype) for _ in range(layers)]
    vcs = [torch.randn((n, t_max, head_dim), generator=gen).to(kv_dtype) for _ in range(layers)]
    q = torch.randn((n, rep, head_dim), generator=gen).to(q_dtype)
    total = 0.0
    for s in range(steps):
        t = prompt_len + 1 + s
        bias = torch.zeros((n, rep, t), dtype=kv_dtype)
        mask = torch.ones((n, 1, 1, t), dtype=torch.bool)
        t0 = time.perf_counter()
        for kc, vc in zip(kcs, vcs):
            k, v = kc[:, :t], vc[:, :t]
            if sdpa:
                F.scaled_dot_product_attention(q.to(kv_dtype).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                               attn_mask=mask, scale=head_dim**-0.5).to(q_dtype)
                continue
            sc = torch.baddbmm(bias, q.to(kv_dtype), k.transpose(1, 2), alpha=head_dim**-0.5)
            p = torch.softmax(sc, dim=-1, dtype=torch.float32).to(kv_dtype)
            torch.bmm(p, v).to(q_dtype)
        total += time.perf_counter() - t0
    return total / steps / layers * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,3,4,12", help="rows x members per step")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--rep", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    args, half = parse(ap, 2, "µs per layer and step")
    rows: list[dict] = []
    for b in [int(x) for x in args.batches.split(",")]:
        best = {"half": float("inf"), "fp32": float("inf"), "sdpa": float("inf")}
        for _ in range(args.reps):
            for name, kd in (("half", half), ("fp32", torch.float32), ("sdpa", half)):
                us = step_us(b, args.kv_heads, args.rep, args.head_dim, args.layers, args.prompt_len, args.steps, kd,
                             half, sdpa=name == "sdpa")
                best[name] = min(best[name], us)
        add_row(rows, "rows", b, best)  # half: the cache in the half-precision dtype
        rows[-1]["sdpa_half_us"] = round(best["sdpa"], 1)
        print(f"{'':16} sdpa on the half cache: {best['sdpa']:.1f} µs")
    write_json(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
