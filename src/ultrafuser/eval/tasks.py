"""Evaluation tasks: one small definition each, in a visible registry (`TASKS`).

A task loads samples (a prompt conversation + what scoring needs) and scores a model's answer. Two kinds:

- `generate`: the model answers each prompt (greedy, zero-shot, no chain-of-thought prompt, in each
  specialist's template — the paper's protocol, paper.md §4.1) and the answer is scored;
- `teacher_forced`: the model reads a reference conversation and is scored on its reply tokens (no
  generation): token accuracy (greedy next-token = reference token) and loss. Used for held-out text.

Local data: benchmark loaders read `DATA_DIR/<task>/test.jsonl` (or `.parquet`), or a user's `datasets` cache
when the hub copy was downloaded before; a missing dataset is a clear error saying how to get it. Nothing
is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError


@dataclass
class Sample:
    id: str
    messages: list[dict]  # generate: the prompt (ends with user); teacher_forced: the full conversation
    reference: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    name: str
    domain: str  # text | code | math (how the report averages it)
    kind: str  # generate | teacher_forced
    metric: str  # what the score means
    load: Callable[[str], list[Sample]]  # data_dir -> samples
    score: Callable[[Sample, str], float] | None = None  # generate tasks: (sample, answer) -> 0..1
    max_new_tokens: int = 256
    batch_score: Callable[[list[Sample], list[str]], list[float]] | None = None  # e.g. sandboxed code
    # Tasks with their own protocol (kinds `loglik`: the model's own probabilities, e.g. TruthfulQA-MC2;
    # `judged`: answers graded by an LLM judge, e.g. MT-Bench, AlpacaEval): the runner calls
    # evaluate(samples, ctx: text_tasks.EvalContext) -> text_tasks.TaskResult instead of generate + score.
    evaluate: Callable[[list[Sample], Any], Any] | None = None
    # auxiliary tasks (held-out loss of a generation domain) are reported on their own, not in domain averages
    aux: bool = False


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _local_or_cache(data_dir: str, name: str, hub: tuple[str, str | None, str], how: str) -> list[dict]:
    """`DATA_DIR/name/test.{jsonl,parquet}`, else the user's datasets cache (offline), else a clear error."""
    for ext in ("jsonl", "parquet", "json"):
        p = Path(data_dir) / name / f"test.{ext}"
        if p.is_file():
            return _read_rows(p)
    try:
        import datasets

        repo, config, split = hub
        return list(datasets.load_dataset(repo, config, split=split))
    except Exception:
        pass
    raise ConfigError(
        f"task {name!r}: no local data at {Path(data_dir) / name}/test.jsonl and no cached copy of {hub[0]!r}. "
        f"{how} (--data-dir sets the folder; default data/benchmarks)"
    )


# ------------------------------------------------------------------------------------------- embedded sets


def _embedded(domain: str, whole: bool = False) -> Callable[[str], list[Sample]]:
    """The embedded default's held-out set of `domain`: prompts (+ reference and task) for generation, or the
    whole conversations (`whole`, and always for text) for teacher-forced scoring."""

    def load(data_dir: str) -> list[Sample]:
        p = Path(os.environ.get("ULTRAFUSER_EMBEDDED_DATA", "data/embedded")) / f"{domain}-heldout.jsonl"
        if not p.is_file():
            raise ConfigError(f"held-out set {p} is missing; it ships in the repository (data/embedded/)")
        out = []
        for r in _read_rows(p):
            msgs = r["messages"]
            if domain == "text" or whole:
                out.append(Sample(r["id"], msgs, {}))
            else:
                out.append(Sample(r["id"], msgs[:-1], {"task": r.get("task"), "reference": msgs[-1]["content"]}))
        return out

    return load


def _score_math(sample: Sample, answer: str) -> float:
    from ultrafuser.eval.mathans import is_equivalent

    return float(is_equivalent(answer, sample.reference["answer"] if "answer" in sample.reference
                               else sample.reference["task"]["answer"]))


def _batch_score_code(samples: list[Sample], answers: list[str]) -> list[float]:
    from ultrafuser.eval.code import score_function_tasks

    recs = [{"task": {**s.reference["task"], "id": s.id}, "completion": a} for s, a in zip(samples, answers)]
    _, verdicts = score_function_tasks(recs)
    return [float(v["passed"]) for v in verdicts]


# ------------------------------------------------------------------------------------------- benchmarks


def _humaneval(data_dir: str) -> list[Sample]:
    from ultrafuser.eval.code import load_humaneval

    return [Sample(tid, [{"role": "user", "content": p.instruction}], {"task_id": tid})
            for tid, p in load_humaneval().items()]


def _batch_score_humaneval(samples: list[Sample], answers: list[str]) -> list[float]:
    from ultrafuser.eval.code import score_samples

    _, verdicts = score_samples([{"task_id": s.id, "completion": a} for s, a in zip(samples, answers)])
    return [float(v["passed"]) for v in verdicts]


def _gsm8k(data_dir: str) -> list[Sample]:
    rows = _local_or_cache(data_dir, "gsm8k", ("openai/gsm8k", "main", "test"),
                           "Get GSM8K's test.jsonl (fields question, answer with '#### N') from its GitHub "
                           "repository (openai/grade-school-math) or run datasets.load_dataset('openai/gsm8k', "
                           "'main') once while online.")
    return [Sample(f"gsm8k/{i}", [{"role": "user", "content": r["question"]}], {"answer": r["answer"]})
            for i, r in enumerate(rows)]


def _math(data_dir: str) -> list[Sample]:
    rows = _local_or_cache(data_dir, "math", ("hendrycks/competition_math", None, "test"),
                           "Put MATH's test problems as JSONL (fields problem, solution with \\boxed{...}) there.")
    from ultrafuser.eval.mathans import extract_answer

    return [Sample(f"math/{i}", [{"role": "user", "content": r["problem"]}],
                   {"answer": r.get("answer") or extract_answer(r["solution"], "latex") or ""})
            for i, r in enumerate(rows)]


def _agieval(name: str, hub: str) -> Callable[[str], list[Sample]]:
    def load(data_dir: str) -> list[Sample]:
        rows = _local_or_cache(data_dir, name, (hub, None, "test"),
                               f"Put AGIEval's {name} as JSONL (fields question, options ['(A)...', ...], label "
                               "'A'..'E'; passage optional) there.")
        out = []
        for i, r in enumerate(rows):
            q = (r.get("passage") or "") + ("\n" if r.get("passage") else "") + r["question"]
            opts = "\n".join(r["options"])
            out.append(Sample(f"{name}/{i}", [{"role": "user", "content": f"{q}\n{opts}\nAnswer with the letter."}],
                              {"answer": str(r["label"]).strip("()"), "kind": "choice"}))
        return out

    return load


def _score_choice(sample: Sample, answer: str) -> float:
    from ultrafuser.eval.mathans import is_equivalent

    return float(is_equivalent(answer, sample.reference["answer"], kind="choice"))


def _text(name: str) -> Callable:
    """A function of `ultrafuser.eval.text_tasks`, imported on first use (keeps this module cheap)."""

    def call(*args, **kwargs):
        from ultrafuser.eval import text_tasks

        return getattr(text_tasks, name)(*args, **kwargs)

    call.__name__ = name
    return call


TASKS: dict[str, Task] = {
    "embedded-text": Task("embedded-text", "text", "teacher_forced",
                          "token accuracy on held-out replies (greedy next token = reference)", _embedded("text")),
    "embedded-code": Task("embedded-code", "code", "generate", "unit-test pass rate (sandboxed)",
                          _embedded("code"), batch_score=_batch_score_code, max_new_tokens=192),
    "embedded-math": Task("embedded-math", "math", "generate", "exact final answer (math-verify)",
                          _embedded("math"), score=_score_math, max_new_tokens=128),
    "embedded-code-loss": Task("embedded-code-loss", "code", "teacher_forced",
                               "held-out reply loss (nats/token; token accuracy as score)",
                               _embedded("code", whole=True), aux=True),
    "embedded-math-loss": Task("embedded-math-loss", "math", "teacher_forced",
                               "held-out reply loss (nats/token; token accuracy as score)",
                               _embedded("math", whole=True), aux=True),
    "humaneval": Task("humaneval", "code", "generate", "pass@1 (greedy, sandboxed)", _humaneval,
                      batch_score=_batch_score_humaneval, max_new_tokens=384),
    "gsm8k": Task("gsm8k", "math", "generate", "exact final answer", _gsm8k, score=_score_math, max_new_tokens=384),
    "math": Task("math", "math", "generate", "equivalent final answer (math-verify)", _math, score=_score_math,
                 max_new_tokens=512),
    "sat-math": Task("sat-math", "math", "generate", "accuracy (choice letter)", _agieval("sat-math", "hails/agieval-sat-math"),
                     score=_score_choice, max_new_tokens=256),
    "aqua": Task("aqua", "math", "generate", "accuracy (choice letter)", _agieval("aqua", "hails/agieval-aqua-rat"),
                 score=_score_choice, max_new_tokens=256),
    "truthfulqa-mc2": Task("truthfulqa-mc2", "text", "loglik",
                           "MC2 (paper's Yes/No protocol: P(Yes)/(P(Yes)+P(No)) per option, mass on true ones)",
                           _text("load_truthfulqa"), evaluate=_text("evaluate_truthfulqa"), max_new_tokens=1),
    "alpacaeval": Task("alpacaeval", "text", "judged", "win rate vs reference (judge; tie = 1/2; errors excluded)",
                       _text("load_alpacaeval"), evaluate=_text("evaluate_alpacaeval"), max_new_tokens=1024),
    "mt-bench": Task("mt-bench", "text", "judged", "judge rating 1-10 per turn (per category + overall)",
                     _text("load_mtbench"), evaluate=_text("evaluate_mtbench"), max_new_tokens=1024),
}


def get_tasks(names: list[str]) -> list[Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]
