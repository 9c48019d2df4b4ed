"""Per-sample caches for the tasks that run their own protocol (MT-Bench, AlpacaEval, TruthfulQA-MC2).

Such a task is one unit for the runner (its result file is written when the whole task finishes), but its
expensive parts — the model's answers and the judge's verdicts — are cached here one batch at a time, so an
interrupted unit resumes where it stopped instead of starting over:

    generations/VARIANT/TASK.answers.jsonl   {"key": sha256(conversation, max_new_tokens), "answer": ...}
    generations/VARIANT/TASK.judge.jsonl     {"key": sha256(judge model, messages), "judgement": {...}}

Only judgements that scored are cached: a judge error is asked again on the next run (it may have been
transient), never remembered as a verdict. Rows are appended and fsync'ed; a torn last line is ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _load(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            rows[r["key"]] = r
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    from ultrafuser.eval.runner import (
        _append as append_rows,  # the eval caches' one append (torn line, fsync)
    )

    append_rows(path, rows)


def caching_answerer(inner: Callable, path: Path, batch_size: int) -> Callable:
    """Wrap an answerer (conversations, max_new_tokens) -> answers: cached answers are reused, the rest are
    produced `batch_size` at a time and appended after each batch."""

    def answer(conversations: list[list[dict]], max_new_tokens: int) -> list[str | None]:
        keys = [_key([c, max_new_tokens]) for c in conversations]
        have = _load(path)
        todo = [i for i, k in enumerate(keys) if k not in have]
        for b in range(0, len(todo), batch_size):
            idx = todo[b : b + batch_size]
            outs = inner([conversations[i] for i in idx], max_new_tokens)
            rows = [{"key": keys[i], "answer": a} for i, a in zip(idx, outs)]
            _append(path, rows)
            have.update({r["key"]: r for r in rows})
        return [have[k]["answer"] for k in keys]

    return answer


class CachingJudge:
    """A `Judge` whose scored verdicts are remembered per request (keyed by the judge model and the messages)."""

    def __init__(self, judge, path: Path):
        self.judge, self.path = judge, path

    def describe(self) -> dict:
        return self.judge.describe()

    def grade(self, requests: Sequence) -> list:
        from ultrafuser.eval.judge import Judgement

        model = self.judge.describe().get("model")
        keys = [_key([model, r.messages]) for r in requests]
        have = _load(self.path)
        out: list = [None] * len(requests)
        todo = []
        for i, k in enumerate(keys):
            if k in have:
                out[i] = Judgement(**have[k]["judgement"])
            else:
                todo.append(i)
        if todo:
            fresh = self.judge.grade([requests[i] for i in todo])
            _append(self.path, [{"key": keys[i], "judgement": j.to_dict()} for i, j in zip(todo, fresh)
                                if j.status == "scored"])
            for i, j in zip(todo, fresh):
                out[i] = j
        return out
