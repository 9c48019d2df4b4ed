"""The LM head on the CPU with few rows: `F.linear(h, W)` (h·Wᵀ) against `torch.mm(W, hᵀ)ᵀ` (W·hᵀ), the layout
`fast_llama.Group._head` uses on the CPU for more than 3 rows. Default shape: SmolLM2-135M's 49,152 × 576 head, fp32.

    python bench/cpu_head.py [--vocab 49152 --hidden 576 --rows 1,8,24,48,64 --threads 2 --json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", default="1,8,24,48,64")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    W = torch.randn(a.vocab, a.hidden)
    out = {"machine": platform.machine(), "threads": a.threads, "torch": torch.__version__,
           "shape": [a.vocab, a.hidden], "rows": []}
    for m in (int(x) for x in a.rows.split(",")):
        h = torch.randn(m, a.hidden)
        assert torch.allclose(F.linear(h, W), torch.mm(W, h.t()).t(), rtol=1e-4, atol=1e-4)
        lin = median_ms(lambda: F.linear(h, W), a.reps)
        wht = median_ms(lambda: torch.mm(W, h.t()).t(), a.reps)
        out["rows"].append({"rows": m, "linear_ms": round(lin, 2), "w_ht_ms": round(wht, 2),
                            "speedup": round(lin / wht, 2)})
        print(f"rows {m:4d}: h·Wᵀ {lin:7.2f} ms   W·hᵀ {wht:7.2f} ms   {lin / wht:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
