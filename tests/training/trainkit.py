"""Helpers for the training tests (plain functions; the fixtures are in conftest.py).

Training runs happen in this process or in a *forked* child (no fresh interpreter: importing torch and
transformers costs ~10-20 s on the 2-core machines); SIGKILL tests need the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import traceback
from pathlib import Path

from ultrafuser.config import TrainConfig

DOMAINS = ("text", "code", "math")
WORDS = ("the quick brown fox jumps over lazy dog hello world def add return print import math apples answer "
         "is sum of list for range explain function").split()


@contextlib.contextmanager
def one_intraop_thread():
    """Tiny models: one intra-op thread (on a shared 2-core machine OpenMP's second thread mostly waits:
    a 6x slowdown measured). Forked children inherit it."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def make_records(counts=(8, 6, 4), seed: int = 0, multi_turn_every: int = 3):
    from ultrafuser.data.records import make_record

    rng = random.Random(seed)
    out = []
    for d, n in zip(DOMAINS, counts):
        for i in range(n):
            turns = 2 if i % multi_turn_every == 0 else 1
            msgs = []
            for t in range(turns):
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                msgs += [{"role": "user", "content": f"{d} {i}.{t} {q}"}, {"role": "assistant", "content": a}]
            out.append(make_record(domain=d, messages=msgs, source="test"))
    return out


def fuse_dir(out, specs: list[str]) -> str:
    from ultrafuser.cli import main

    args = ["fuse", "--out", str(out)]
    for s in specs:
        args += ["--specialist", s]
    assert main(args) == 0
    return str(out)


def train_config(out, model, data, **over) -> TrainConfig:
    """A small exact run: fp32, 2 per domain per step in micro-batches of 4 (2 micro-batches per step)."""
    tree = {
        "model": model,
        "data": {"train": [data], "max_length": 128},
        "output_dir": str(out),
        "precision": "fp32",
        "save_every": 1,
        "keep_last": 2,
        "stage1": {"steps": 3, "per_domain": 2, "micro_batch": 4, "lr": 5e-2},
        "stage2": {"steps": 2, "per_domain": 2, "micro_batch": 4, "lr": 1e-2, "trainable": "lora", "lora_r": 4},
    }
    for k, v in over.items():
        node = tree
        keys = k.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = v
    return TrainConfig.model_validate(tree)


def run_inproc(cfg: TrainConfig, **kw) -> int:
    from ultrafuser.training.loop import run

    return run(cfg, **kw)


def fork_training(cfg: TrainConfig, env: dict | None = None, **kw) -> int:
    """Start training in a forked child (with `env` added to its environment); return the child's pid."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.environ.update(env or {})
            import torch
            from accelerate.state import AcceleratorState, PartialState

            # After a fork PyTorch rebuilds its CPU thread pool on first use, and not thread-safely: when the first
            # use came from transformers' weight-loading threads, one of them could see the pool half-built
            # ("pool INTERNAL ASSERT FAILED ... Invalid thread pool!", seen once in a full run). Rebuild it here,
            # while the child has one thread.
            torch.set_num_threads(torch.get_num_threads())

            AcceleratorState._reset_state(True)
            PartialState._reset_state()
            code = run_inproc(cfg, **kw)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def run_forked(cfg: TrainConfig, env: dict | None = None, **kw) -> int:
    """Run training in a forked child; returns its exit code (negative: killed by that signal)."""
    _, status = os.waitpid(fork_training(cfg, env, **kw), 0)
    return os.waitstatus_to_exitcode(status)


def read_jsonl(path) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


EXACT_KEYS = ("step", "stage", "stage_step", "loss", "loss_by_domain", "gate", "lr", "grad_norm", "tokens", "seq_tokens")


def exact_view(metrics: list[dict]) -> list[dict]:
    """The deterministic part of metrics.jsonl lines (timings excluded)."""
    return [{k: m[k] for k in EXACT_KEYS} for m in metrics]
