"""Matmul layouts on the CPU with few rows, the measurement behind `fast_llama.CPU_FEW_ROWS` / `Group._head`:
`F.linear(h, W)` (h·Wᵀ, the model's own (out, in) weight), `torch.mm(W, hᵀ)ᵀ` (W·hᵀ) and `torch.mm(h, Wt)` with a
contiguous (in, out) copy Wt (the fast path's copies); at one row also W·hᵀ with a zero row added
(`fast_llama.w_xt`). Default shape: SmolLM2-135M's 49,152 × 576 LM head, fp32; `--vocab 3072 --hidden 576` is its
gate|up projection.

    python bench/cpu_head.py [--vocab 49152 --hidden 576 --rows 1,8,24,48,64 --dtype float32 --threads 2 --json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from cpu_micro import median_ms

from ultrafuser.modeling.fast_llama import w_xt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", default="1,8,24,48,64")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    W = torch.randn(a.vocab, a.hidden).to(dt)
    Wt = W.t().contiguous()
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    out = {"machine": platform.machine(), "threads": a.threads, "torch": torch.__version__, "dtype": a.dtype,
           "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags],
           "shape": [a.vocab, a.hidden], "rows": []}
    tol = 1e-4 if dt == torch.float32 else 5e-2
    for m in (int(x) for x in a.rows.split(",")):
        h = torch.randn(m, a.hidden).to(dt)
        ref = F.linear(h.float(), W.float())
        for y in (F.linear(h, W), torch.mm(W, h.t()).t(), torch.mm(h, Wt), w_xt(W, h).t()):
            assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        lin = median_ms(lambda: F.linear(h, W), a.reps)
        wht = median_ms(lambda: torch.mm(W, h.t()).t(), a.reps)
        cp = median_ms(lambda: torch.mm(h, Wt), a.reps)
        # the fast path's "w_xt": W·hᵀ with a single row padded by a zero row (differs from W·hᵀ at 1 row only)
        pad = median_ms(lambda: w_xt(W, h).t(), a.reps) if m == 1 else wht
        out["rows"].append({"rows": m, "linear_ms": round(lin, 3), "w_ht_ms": round(wht, 3), "copy_ms": round(cp, 3),
                            "w_xt_padded_ms": round(pad, 3), "speedup": round(lin / wht, 2)})
        print(f"rows {m:4d}: h·Wᵀ {lin:7.3f} ms   W·hᵀ {wht:7.3f} ms   h·(Wᵀ copy) {cp:7.3f} ms"
              + (f"   W·hᵀ padded to 2 rows {pad:7.3f} ms" if m == 1 else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
