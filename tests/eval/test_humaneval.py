"""HumanEval through the full scoring path (sandbox included), pass@k, code extraction, the CLI contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from ultrafuser.config import ConfigError
from ultrafuser.eval.code import (
    build_program,
    extract_code,
    load_humaneval,
    pass_at_k,
    score_function_task,
    score_function_tasks,
    score_samples,
)
from ultrafuser.eval.sandbox import run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def _canonical(problems):
    return [{"task_id": t, "completion": p.canonical_solution} for t, p in problems.items()]


def _assert_all_pass(summary, verdicts, n):
    failed = [v for v in verdicts if not v["passed"]]
    assert not failed, failed[:3]
    assert summary["n_samples"] == n and summary["statuses"] == {"passed": n}
    assert summary["pass@1"] == 1.0 and list(summary)[-1] == "pass@1"


def test_humaneval_loads_in_instruction_form(problems):
    assert len(problems) == 164
    p = problems["HumanEval/0"]
    assert p.entry_point == "has_close_elements"
    assert p.instruction == f"Complete the following python function:\n```python\n{p.prompt}```"
    assert p.checker.rstrip().endswith("check(has_close_elements)")


def test_canonical_solutions_all_pass(problems):
    summary, verdicts = score_samples(_canonical(problems), workers=2, problems=problems)
    _assert_all_pass(summary, verdicts, 164)


@pytest.mark.slow
def test_canonical_solutions_pass_three_times_in_a_row(problems):
    for _ in range(3):
        summary, verdicts = score_samples(_canonical(problems), workers=2, problems=problems)
        _assert_all_pass(summary, verdicts, 164)


def _empty_wrong_chat(problems, task_ids):
    ids = list(problems)
    samples = []
    for t in task_ids:
        p = problems[t]
        other = problems[ids[(ids.index(t) + 1) % len(ids)]]  # a real solution, of the next problem
        chat = (
            f"Sure! Here is the function:\n\n```python\n{p.prompt}{p.canonical_solution}```\n\n"
            "It handles the edge cases."
        )
        samples += [
            {"task_id": t, "completion": ""},
            {"task_id": t, "completion": other.canonical_solution},
            {"task_id": t, "completion": chat},
        ]
    return samples


def _check_empty_wrong_chat(summary, verdicts, n_tasks):
    kinds = [("empty", verdicts[0::3]), ("wrong", verdicts[1::3]), ("chat", verdicts[2::3])]
    for kind, vs in kinds:
        assert len(vs) == n_tasks
        if kind == "chat":
            assert all(v["passed"] for v in vs), [v for v in vs if not v["passed"]][:3]
        else:
            assert not any(v["passed"] for v in vs), [v for v in vs if v["passed"]][:3]
    assert summary["pass@1"] == pytest.approx(1 / 3)  # 3 samples per task, one right


def test_empty_and_wrong_completions_score_zero_chat_answers_pass(problems):
    """Every 8th problem (21; all 164 in the slow test below): empty and wrong completions fail, a fenced
    chat answer passes."""
    task_ids = list(problems)[::8]
    summary, verdicts = score_samples(_empty_wrong_chat(problems, task_ids), workers=2, problems=problems)
    _check_empty_wrong_chat(summary, verdicts, len(task_ids))
    assert "pass@10" not in summary  # only 3 samples per task


@pytest.mark.slow
def test_empty_and_wrong_completions_score_zero_all_problems(problems):
    summary, verdicts = score_samples(
        _empty_wrong_chat(problems, list(problems)), workers=2, problems=problems
    )
    _check_empty_wrong_chat(summary, verdicts, 164)


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # P(at least one of k draws without replacement is correct), by enumeration
                draws = list(combinations([True] * c + [False] * (n - c), k))
                expected = sum(any(d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_over_several_samples_per_task(problems):
    ids = list(problems)[:2]
    samples = [
        {"task_id": ids[0], "completion": problems[ids[0]].canonical_solution},
        {"task_id": ids[0], "completion": ""},
        {"task_id": ids[1], "completion": ""},
        {"task_id": ids[1], "completion": ""},
    ]
    summary, verdicts = score_samples(samples, workers=2, problems=problems, ks=(1, 2))
    assert [v["completion_id"] for v in verdicts] == [0, 1, 0, 1]
    assert summary["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert summary["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert list(summary)[-1] == "pass@1"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x\n"),
        (
            "Use:\n```py\nprint(f(1))\n```\nCode:\n```python\ndef f(x):\n    return x\n```",
            "def f(x):\n    return x\n",
        ),
        ("```\n    return x\n```", "    return x\n"),
        ("Here you go:\n\ndef f(x):\n    return x\n", "def f(x):\n    return x\n"),
        ("    return x\n", "    return x\n"),
        ("```python\ndef f(x):\n    return x", "def f(x):\n    return x"),  # cut off before the closing fence
        (
            "```js\nfunction f(x) {}\n```\n```python\ndef f(x):\n    return x\n```",
            "def f(x):\n    return x\n",
        ),
    ],
)
def test_extract_code(answer, expected):
    assert extract_code(answer, "f") == expected


def test_build_program_accepts_bodies_and_definitions():
    prompt = 'from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    """Sum."""\n'
    body = build_program(prompt, "    return sum(xs)\n", "f")
    assert body == prompt + "    return sum(xs)\n\n"
    unindented = build_program(prompt, "return sum(xs)", "f")
    assert unindented.endswith("    return sum(xs)\n")
    full = build_program(prompt, "```python\ndef f(xs):\n    return sum(xs)\n```", "f")
    assert full.startswith(prompt) and full.rstrip().endswith("return sum(xs)")
    for program in (body, unindented, full):
        assert run_program(program, checker="assert f([1, 2, 3]) == 6", timeout_s=10).passed, program


def test_samples_are_validated(problems):
    with pytest.raises(ConfigError, match="HumanEval/999"):
        score_samples([{"task_id": "HumanEval/999", "completion": ""}], problems=problems)
    with pytest.raises(ConfigError, match="sample 0"):
        score_samples([{"task_id": "HumanEval/0"}], problems=problems)
    with pytest.raises(ConfigError, match="workers"):
        score_samples([{"task_id": "HumanEval/0", "completion": ""}], problems=problems, workers=0)


TASK = {
    "type": "code",
    "id": "double",
    "entry_point": "double",
    "prompt": 'Write a function:\n```python\ndef double(x: int) -> int:\n    """Twice x."""\n```',
    "tests": "assert double(2) == 4\nassert double(-1) == -2\n",
}


@pytest.mark.parametrize(
    "completion, passed",
    [
        ("```python\ndef double(x):\n    return 2 * x\n```", True),
        ("    return x + x\n", True),  # a body under the prompt's signature
        ("def double(x):\n    return x * x\n", False),
        ("```python\nimport os\nos._exit(0)\n```", False),
        ("", False),
    ],
)
def test_function_tasks(completion, passed):
    assert score_function_task(TASK, completion, timeout_s=10).passed is passed


def test_function_tasks_batch_and_validation():
    records = [
        {"task": TASK, "completion": "    return 2 * x\n"},
        {"task": TASK, "completion": "    return 0\n"},
    ]
    summary, verdicts = score_function_tasks(records, workers=2)
    assert [v["passed"] for v in verdicts] == [True, False]
    assert summary["pass@1"] == 0.5 and list(summary)[-1] == "pass@1"
    with pytest.raises(ConfigError, match="tests"):
        score_function_task({**TASK, "tests": ""}, "")
    with pytest.raises(ConfigError, match="record 0"):
        score_function_tasks([{"completion": ""}])


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ultrafuser.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_score_contract(problems, tmp_path):
    ids = list(problems)[:5]
    samples = tmp_path / "samples.jsonl"
    with samples.open("w") as f:
        for i, t in enumerate(ids):
            completion = problems[t].canonical_solution if i < 3 else "    return None\n"
            f.write(json.dumps({"task_id": t, "completion": completion}) + "\n")
    out = tmp_path / "out"
    proc = _cli(
        "eval",
        "score",
        "--task",
        "humaneval",
        "--samples",
        str(samples),
        "--out",
        str(out),
        "--workers",
        "2",
        "--timeout",
        "20",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the summary: {proc.stdout!r}"
    summary = json.loads(lines[-1])
    assert list(summary)[-1] == "pass@1" and summary["pass@1"] == pytest.approx(3 / 5)
    verdicts = [json.loads(ln) for ln in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["task_id"] for v in verdicts] == ids
    assert [v["passed"] for v in verdicts] == [True, True, True, False, False]
    assert {"index", "task_id", "completion_id", "passed", "status", "detail"} <= set(verdicts[0])
    assert json.loads((out / "summary.json").read_text()) == summary


def test_cli_score_code_task(tmp_path):
    samples = tmp_path / "code.jsonl"
    samples.write_text(json.dumps({"task": TASK, "completion": "    return 2 * x\n"}) + "\n")
    proc = _cli("eval", "score", "--task", "code", "--samples", str(samples), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["pass@1"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "mbpp", "--samples", "s.jsonl"], "--task 'mbpp'"),
        (["--task", "humaneval", "--samples", "missing.jsonl"], "no such file"),
        (["--task", "humaneval", "--samples", "bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (["--task", "humaneval", "--samples", "unknown.jsonl"], "HumanEval/999"),
        (["--task", "humaneval", "--samples", "s.jsonl", "--workers", "0"], "--workers 0"),
    ],
)
def test_cli_score_user_errors(args, message, tmp_path, monkeypatch, capsys):
    """In-process (the subprocess contract is tested above): exit status 2, "error: ..." on stderr."""
    from ultrafuser.cli import main

    good = json.dumps({"task_id": "HumanEval/0", "completion": ""})
    (tmp_path / "s.jsonl").write_text(good + "\n")
    (tmp_path / "bad.jsonl").write_text(good + "\n{not json\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "score", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error: " in captured.err and message in captured.err, captured.err
