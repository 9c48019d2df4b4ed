"""Shared by the CPU micro-benchmarks that time one piece of the decode step in a half-precision dtype vs fp32
(bench/cpu_attention.py, bench/cpu_lora_b.py): one result row, and the JSON they write; and the median timer of
bench/cpu_head.py and bench/cpu_rows.py."""

from __future__ import annotations

import json
import platform
import time

import torch


def parse(ap, reps: int, what: str):
    """Add the common options (--reps, --dtype, --threads, --json), parse, set the thread count and print the header
    line (`what`: the unit measured); return (args, the half-precision dtype)."""
    ap.add_argument("--reps", type=int, default=reps, help="interleaved repetitions; the best is reported")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# CPU {platform.machine()}, {args.threads} threads, torch {torch.__version__}, {args.dtype}; {what} "
          f"(best of {args.reps})")
    return args, getattr(torch, args.dtype)


def add_row(rows: list[dict], key: str, value: int, best: dict) -> None:
    """Append {key: value, half_us, fp32_us, half_over_fp32} (from the best µs of each way) and print it (the first
    row prints the column header)."""
    r = {key: value, "half_us": round(best["half"], 1), "fp32_us": round(best["fp32"], 1),
         "half_over_fp32": round(best["half"] / best["fp32"], 2)}
    if not rows:
        print(f"{key:>16} {'half':>9} {'fp32':>9} {'half/fp32':>10}")
    rows.append(r)
    print(f"{value:16d} {r['half_us']:9.1f} {r['fp32_us']:9.1f} {r['half_over_fp32']:10.2f}")


def write_json(args, rows: list[dict]) -> None:
    """The run's rows with the machine, thread count, torch version, dtype and arguments, to args.json (if set)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.machine(), "threads": args.threads, "torch": torch.__version__,
                       "dtype": args.dtype, "args": vars(args), "rows": rows}, f, indent=1)


def median_ms(fn, reps: int) -> float:
    """The median ms of `reps` calls of fn after 3 warm-up calls (the upper middle one for an even count)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]
