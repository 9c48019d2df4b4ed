"""`ultrafuser eval ...`: evaluation subcommands (names, flags and outputs are a contract; see README).

`eval` is a parser with its own subcommands so that more can join it (the model evaluation `eval run`
is added by its own module); this module provides `eval score`:

    ultrafuser eval score --task humaneval --samples FILE.jsonl [--out DIR] [--workers N] [--timeout S]

It runs every sample in the sandbox and prints ONE line of JSON to stdout (nothing else goes to stdout),
whose last key is "pass@1"; with --out it writes DIR/verdicts.jsonl (one JSON object per sample, in input
order: index, task_id, completion_id (humaneval), passed, status, detail, returncode, elapsed_s,
stderr_tail) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError

log = logging.getLogger(__name__)
SCORE_TASKS = ("humaneval", "code")
VERDICTS_NAME = "verdicts.jsonl"
SUMMARY_NAME = "summary.json"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` (a parser with subcommands) to the `ultrafuser` command."""
    p = sub.add_parser("eval", help="evaluate: `eval run MODEL --tasks ...` (or `eval MODEL ...`), `eval score`")
    eval_sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    eval_sub.required = True
    register_score(eval_sub)
    from ultrafuser.eval.runner import register_run

    register_run(eval_sub)


def register_score(eval_sub: argparse._SubParsersAction) -> None:
    s = eval_sub.add_parser(
        "score",
        help="score a samples file (code runs in the sandbox); prints a JSON summary, pass@1 last",
        description='Score generated samples. humaneval: lines {"task_id": "HumanEval/0", "completion": '
        '"..."}; code: lines {"task": {"type": "code", "entry_point", "tests", "prompt"}, '
        '"completion": "..."}.',
    )
    s.add_argument(
        "--task", required=True, help=f"which task the samples belong to: {', '.join(SCORE_TASKS)}"
    )
    s.add_argument("--samples", required=True, help="JSONL file of samples")
    s.add_argument("--out", help=f"directory for {VERDICTS_NAME} and {SUMMARY_NAME} (created if missing)")
    s.add_argument("--workers", type=int, default=2, help="samples run in parallel (default 2)")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per sample (default 10)")
    s.add_argument(
        "--memory-mb", type=int, default=1024, help="address-space limit per sample (default 1024)"
    )
    s.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    s.set_defaults(func=run_score)


def read_jsonl(path: str) -> list[Any]:
    """Records of a JSONL file; a bad line is a ConfigError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--samples {path}: no such file (expected a JSONL file, one sample per line)")
    records = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from e
    if not records:
        raise ConfigError(f"--samples {path}: the file holds no samples")
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_score(args: argparse.Namespace) -> int:
    from ultrafuser.eval.code import score_function_tasks, score_samples

    if args.task not in SCORE_TASKS:
        raise ConfigError(
            f"--task {args.task!r} is not a task that can be scored here; use one of: "
            f"{', '.join(SCORE_TASKS)}"
        )
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout}: must be > 0 seconds")
    records = read_jsonl(args.samples)
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
    scorer = score_samples if args.task == "humaneval" else score_function_tasks
    summary, verdicts = scorer(
        records,
        workers=args.workers,
        timeout_s=args.timeout,
        memory_mb=args.memory_mb,
        progress=args.progress,
    )
    summary = {"samples": str(args.samples), **summary}
    if out is not None:
        _write_atomic(
            out / VERDICTS_NAME, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in verdicts)
        )
        _write_atomic(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        log.info("wrote %s and %s", out / VERDICTS_NAME, out / SUMMARY_NAME)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0
