"""The LoRA-shared group's (x·A)·B on the CPU, per layer, the measurement behind `fast_llama.CPU_FP32_B_ROWS`: the
base's product `ye` (G·M rows; each member's x·A as G·R extra columns) gets every member's (x·A_g)·B_g added into
its output columns, two ways —

- half: one half-precision `baddbmm_` over the zero-padded batched B (G, R, out) per projection (the way for many
  rows, and on CUDA);
- fp32: one fp32 `bmm` per projection over B·scale in fp32 cut into equal chunks (`Proj._b_chunks`), added into
  the modules' columns (`fast_llama.add_lora_b32_ops`: the CPU decode step's way up to CPU_FP32_B_ROWS rows per
  member, as PyTorch ops; bf16 models run the same sums in one C kernel where it builds, `cpu_kernels`).

Default shape: SmolLM2-135M with r-16 adapters on all seven projections (q|k|v, o, gate|up, down), three members;
`--rows` counts rows per member (a decode step's batch). Every layer has its own B, so they come from memory as in
a real step; the other work of a step is not there, so absolute times are lower than inside one.

    python bench/cpu_lora_b.py [--rows 1,2,4,8,16 --members 3 --rank 16 --dtype bfloat16 --json OUT.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from cpu_micro import add_row, parse, write_json

from ultrafuser.modeling.fast_llama import Proj, add_lora_b32_ops, lora_b32_plan


def layer_us(M: int, G: int, r: int, hidden: int, inter: int, q_out: int, kv_out: int, layers: int, reps: int,
             half) -> dict:
    """Mean µs per layer of the four projections' B terms, both ways, interleaved; the best of `reps`."""
    gen = torch.Generator().manual_seed(0)
    projs = [[q_out, kv_out, kv_out], [hidden], [inter, inter], [hidden]]  # module widths per projection
    data = []
    for _ in range(layers):
        per = []
        for outs in projs:
            out, R = sum(outs), r * len(outs)
            B = torch.zeros((G, R, out))
            spans, o0 = [], 0
            for j, n in enumerate(outs):
                B[:, j * r : (j + 1) * r, o0 : o0 + n] = torch.randn((G, r, n), generator=gen) * 0.02
                spans.append((j * r, (j + 1) * r))
                o0 += n
            ye = torch.randn((G * M, out + G * R), generator=gen).to(half)
            b32 = Proj._b_chunks(B, spans, outs)
            per.append((ye, out, R, B.to(half), lora_b32_plan(b32, G, R, M, ye.shape[1], out)))
        data.append(per)

    def run_half():
        for per in data:
            for ye, out, R, Bh, _ in per:
                rs = ye.shape[1]
                y = ye.as_strided((G, M, out), (M * rs, rs, 1), 0)
                y.baddbmm_(ye.as_strided((G, M, R), (M * rs + R, rs, 1), out), Bh)

    def run_fp32():
        for per in data:
            for ye, _, _, _, plan in per:
                add_lora_b32_ops(ye, plan)

    best = {"half": float("inf"), "fp32": float("inf")}
    for run in (run_half, run_fp32):  # warm-up
        run()
    for _ in range(reps):
        for name, run in (("half", run_half), ("fp32", run_fp32)):
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - t0) / layers * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16", help="rows per member (a decode step's batch)")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--kv-out", type=int, default=192, help="k / v projection width (KV heads x head dim)")
    ap.add_argument("--layers", type=int, default=30)
    args, half = parse(ap, 5, "µs per layer (4 projections' B terms)")
    rows: list[dict] = []
    with torch.no_grad():
        for m in [int(x) for x in args.rows.split(",")]:
            add_row(rows, "rows_per_member", m, layer_us(m, args.members, args.rank, args.hidden, args.inter,
                                                         args.hidden, args.kv_out, args.layers, args.reps, half))
    write_json(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
