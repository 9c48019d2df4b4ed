"""What more rows cost in one CPU decode step's projections: bytes or arithmetic. The step's four projections per
layer (q|k|v, o, gate|up, down, oneDNN-packed as the fast path keeps them) over all layers at

- `single`: B rows, the base's columns only (one model at batch B);
- `lora`: 3·B rows, with three members' x·A as extra columns (the LoRA-shared group at batch B: r-16 adapters on
  all seven modules, so q|k|v + 144, o + 48, gate|up + 96, down + 48 columns);

each timed twice, interleaved: `cold`, the layers' own weights in turn (read from memory, as in a step) and `hot`,
one layer's weights again and again (from cache: the arithmetic alone). Against the machine's copy bandwidth and
its bf16 GEMM rate at many rows (`ceiling`: a 512-row gate|up product, hot), it shows which bound each case is
near. No LM head, attention or low-rank products: the projections alone.

    python bench/cpu_rows.py [--shape smollm2-135m --batches 1,4 --reps 15 --dtype bfloat16 --json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_micro import median_ms
from decode import SHAPES, copy_bandwidth

from ultrafuser.modeling.fast_llama import mkldnn_linear, mkldnn_pack, mkldnn_packing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dt = getattr(torch, a.dtype)
    if not mkldnn_packing(dt):
        raise SystemExit(f"this PyTorch build has no oneDNN-packed linear in {a.dtype}; try --dtype bfloat16")
    s = SHAPES[a.shape]
    H, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    D = H // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * D
    xa = a.members * a.rank  # one module's x·A columns over the members
    # (in, base out, x·A columns) per projection
    projs = [(H, H + 2 * kv, 3 * xa), (H, H, xa), (H, 2 * I, 2 * xa), (I, H, xa)]
    g = torch.Generator().manual_seed(0)

    def weights(extra: bool):
        def one(k, n, x):
            return mkldnn_pack((torch.randn(n + (x if extra else 0), k, generator=g) * 0.02).to(dt))

        return [[one(*p) for p in projs] for _ in range(L)]

    W = {False: weights(False), True: weights(True)}
    bpe = torch.empty((), dtype=dt).element_size()

    def case(M: int, extra: bool, hot: bool):
        xs = [torch.randn(M, k, generator=g).to(dt) for k, _, _ in projs]
        Ws = W[extra]

        def run():
            for i in range(L):
                for x, P in zip(xs, Ws[0 if hot else i]):
                    mkldnn_linear(x, P, None)

        flop = 2 * M * L * sum(k * (n + (x if extra else 0)) for k, n, x in projs)
        byt = bpe * L * sum(k * (n + (x if extra else 0)) for k, n, x in projs)
        return run, flop, byt

    big = torch.randn(512, H, generator=g).to(dt)
    gu = W[False][0][2]
    ceil_ms = median_ms(lambda: mkldnn_linear(big, gu, None), a.reps)
    ceiling = 2 * 512 * H * 2 * I / ceil_ms / 1e6  # GFLOP/s
    bw = copy_bandwidth("cpu", 0.5) / 1e9
    print(f"# CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {a.dtype}, "
          f"{a.shape} ({L} layers); copy bandwidth {bw:.1f} GB/s, GEMM ceiling {ceiling:.0f} GFLOP/s")
    out = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "dtype": a.dtype, "shape": a.shape, "date": time.strftime("%Y-%m-%d"), "args": vars(a),
           "copy_bandwidth_GBps": round(bw, 2), "gemm_ceiling_GFLOPs": round(ceiling, 1), "batches": {}}
    print(f"{'batch':>5} {'mode':>6} {'rows':>4} {'cold ms':>8} {'GB/s':>6} {'GFLOP/s':>8} {'of ceiling':>10} "
          f"{'hot ms':>7} {'of ceiling':>10}")
    for B in [int(b) for b in a.batches.split(",")]:
        modes = {"single": (B, False), "lora": (a.members * B, True)}
        runs = {(m, hot): case(M, extra, hot) for m, (M, extra) in modes.items() for hot in (False, True)}
        times = {k: [] for k in runs}
        for _ in range(a.reps):  # interleaved, one pass of each at a time
            for k, (fn, _, _) in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
        res = {}
        for m, (M, _) in modes.items():
            cold, flop, byt = statistics.median(times[(m, False)]), runs[(m, False)][1], runs[(m, False)][2]
            hot = statistics.median(times[(m, True)])
            r = res[m] = {"rows": M, "cold_ms": round(cold, 3), "hot_ms": round(hot, 3),
                          "cold_GBps": round(byt / cold / 1e6, 1), "cold_GFLOPs": round(flop / cold / 1e6, 1),
                          "cold_of_ceiling": round(flop / cold / 1e6 / ceiling, 3),
                          "hot_of_ceiling": round(flop / hot / 1e6 / ceiling, 3)}
            print(f"{B:5d} {m:>6} {M:4d} {cold:8.2f} {r['cold_GBps']:6.1f} {r['cold_GFLOPs']:8.0f} "
                  f"{r['cold_of_ceiling']:10.0%} {hot:7.2f} {r['hot_of_ceiling']:10.0%}")
        res["lora_over_single_cold"] = round(res["lora"]["cold_ms"] / res["single"]["cold_ms"], 3)
        res["lora_minus_single_cold_ms"] = round(res["lora"]["cold_ms"] - res["single"]["cold_ms"], 3)
        out["batches"][str(B)] = res
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
