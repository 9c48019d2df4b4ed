"""Training throughput and memory of a fused directory: stage 1 (with and without the hidden-state cache) and
stage 2 (full and LoRA). Prints one JSON object.

    python bench/train_cpu.py FUSED_DIR [--data train.jsonl] [--steps 6] [--per-domain 4] [--micro-batch 4]

Each configuration runs in its own Python process (so `peak_rss_mb` is that configuration's own peak
resident memory, model loading included) through the real entry point (`ultrafuser.training.loop.run`),
with its output in a temporary directory. Throughput comes from the run's metrics.jsonl:
`tok_per_s` = reply (trained) tokens per second, `seq_tok_per_s` = tokens over every specialist's input
sequence per second, both over all steps and over the steps after the first (`warm_*`).

The stage-1 cache only saves work for examples that are drawn again: with the default synthetic data
(`--examples-per-domain`, smaller than steps x per-domain) most draws are repeats, which is the cache's best
case; `draws` / `distinct` are reported so the number can be read for what it is. Without `--data`,
conversations are synthesised from a fixed word list (no network, no files needed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is for with on as by this that from code python function return value list number "
         "sum add two three four answer explain why how write a simple program example result step first then "
         "total each apples price cost").split()


def synth_data(path: Path, domains: list[str], per_domain: int, seed: int = 0) -> None:
    from ultrafuser.data.records import make_record, write_records

    rng = random.Random(seed)
    recs = []
    for d in domains:
        for i in range(per_domain):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 45)))
            recs.append(make_record(domain=d, messages=[{"role": "user", "content": f"{d} {i}: {q}?"},
                                                         {"role": "assistant", "content": a + "."}], source="bench"))
    write_records(recs, path)


def child(spec: dict) -> dict:
    """Run one configuration in this process; return its measurements."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from ultrafuser.config import TrainConfig
    from ultrafuser.training.loop import run

    cfg = TrainConfig.model_validate(spec["config"])
    t0 = time.time()
    code = run(cfg)
    wall = time.time() - t0
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    warm = lines[1:] or lines
    tok, seq, sec = (sum(m[k] for m in lines) for k in ("tokens", "seq_tokens", "seconds"))
    wtok, wseq, wsec = (sum(m[k] for m in warm) for k in ("tokens", "seq_tokens", "seconds"))
    return {
        "exit_code": code,
        "steps": len(lines),
        "tok_per_s": tok / sec,
        "seq_tok_per_s": seq / sec,
        "warm_tok_per_s": wtok / wsec,
        "warm_seq_tok_per_s": wseq / wsec,
        "step_seconds_median": statistics.median(m["seconds"] for m in lines),
        "wall_seconds_incl_load": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": lines[-1]["loss"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fused_dir")
    ap.add_argument("--data", help="training records (.jsonl/.parquet/datasets dir); default: synthetic")
    ap.add_argument("--examples-per-domain", type=int, default=8, help="synthetic data size per domain")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--per-domain", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--stage2", default="full,lora", help="comma-separated stage-2 modes to measure ('' for none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ultrafuser.modeling.fused import read_fused_config

    fuse_cfg, _ = read_fused_config(args.fused_dir)
    with tempfile.TemporaryDirectory(prefix="ufbench-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "synthetic.jsonl")
            synth_data(Path(data), fuse_cfg.domains, args.examples_per_domain)
        base = {"model": str(Path(args.fused_dir).resolve()), "data": {"train": [data], "max_length": args.max_length},
                "precision": args.precision, "save_every": 10**6, "log_every": 10**6}
        stage = {"steps": args.steps, "per_domain": args.per_domain, "micro_batch": args.micro_batch}
        runs = {
            "stage1": {"stage1": stage, "stage2": {"steps": 0}},
            "stage1_cached": {"stage1": {**stage, "cache_hidden_states": True}, "stage2": {"steps": 0}},
        }
        for mode in [m for m in args.stage2.split(",") if m]:
            runs[f"stage2_{mode}"] = {"stage1": {"steps": 0}, "stage2": {**stage, "trainable": mode}}
        results = {}
        for name, over in runs.items():
            spec = {"config": {**base, **over, "output_dir": str(Path(tmp) / name)}, "threads": args.threads}
            r = subprocess.run([sys.executable, __file__, args.fused_dir, "--child", json.dumps(spec)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                results[name] = {"error": r.stderr[-2000:]}
                continue
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        draws = args.steps * args.per_domain
        out = {
            "fused_dir": args.fused_dir,
            "data": args.data or f"synthetic, {args.examples_per_domain} per domain",
            "steps": args.steps, "per_domain": args.per_domain, "micro_batch": args.micro_batch,
            "precision": args.precision, "threads": args.threads or "default",
            "stage1_draws_per_domain": draws,
            "results": results,
        }
        s1, s1c = results.get("stage1", {}), results.get("stage1_cached", {})
        if "tok_per_s" in s1 and "tok_per_s" in s1c:
            out["stage1_cache_speedup"] = s1c["tok_per_s"] / s1["tok_per_s"]
            out["stage1_cache_speedup_warm"] = s1c["warm_tok_per_s"] / s1["warm_tok_per_s"]
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
