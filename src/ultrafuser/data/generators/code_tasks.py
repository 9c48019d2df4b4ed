"""Python function tasks with unit tests and a reference solution that passes them.

    generate_code(n, seed=0, split="train", held_out_templates=None) -> list[Record]
    check_code_record(record, timeout_s=10) -> str | None      # runs the assistant's code in the eval sandbox
    verify_references(records) -> dict[id, error]              # our own references, batched (trusted code only)

Each record: the user asks for a function given as a HumanEval-style prompt (signature + docstring with two
examples) in one of several wordings; the assistant message is the reference solution in a ```python fence;
`task = {"type": "code", "entry_point", "prompt", "tests"}` where `tests` are `assert f(...) == expected`
lines whose expected values come from the family's independent oracle (`code_families`). Families in
`held_out_templates` (default `DEFAULT_HELD_OUT`) appear only in the heldout split.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
import textwrap

from ultrafuser.config import ConfigError
from ultrafuser.data.generators.code_families import CODE_FAMILIES, CodeFamily, Spec
from ultrafuser.data.quality import fenced_blocks
from ultrafuser.data.records import CodeTask, Record, make_record

GENERATOR = "python-function-tasks"
GENERATOR_VERSION = 1
SOURCE = f"generator:{GENERATOR}"
DEFAULT_HELD_OUT = (
    "collatz_steps",
    "to_roman",
    "balanced_brackets",
    "count_overlapping",
    "max_subarray",
    "camel_to_snake",
)

USER_WORDINGS = (
    "Complete the following Python function.\n\n```python\n{prompt}```",
    "Write the body of this Python function so that it does what its docstring says:\n\n```python\n{prompt}```",
    "Implement `{fname}` in Python.\n\n```python\n{prompt}```",
    "{doc} Write it as a Python function with this signature and docstring:\n\n```python\n{prompt}```",
)


def split_families(
    split: str, held_out_templates: list[str] | tuple[str, ...] | None = None
) -> list[CodeFamily]:
    held = tuple(DEFAULT_HELD_OUT if held_out_templates is None else held_out_templates)
    unknown = sorted(set(held) - set(CODE_FAMILIES))
    if unknown:
        raise ConfigError(
            f"held-out code families {unknown} do not exist; known: {', '.join(sorted(CODE_FAMILIES))}"
        )
    if split == "train":
        fams = [f for name, f in sorted(CODE_FAMILIES.items()) if name not in held]
    elif split == "heldout":
        fams = [CODE_FAMILIES[name] for name in sorted(set(held))]
    else:
        raise ConfigError(f"split {split!r}: use train or heldout")
    if not fams:
        raise ConfigError(f"split {split!r} has no code families (held out: {list(held)})")
    return fams


def _call(fname: str, args: tuple) -> str:
    return f"{fname}({', '.join(repr(a) for a in args)})"


def render_task(spec: Spec) -> tuple[str, str, str]:
    """(prompt, solution, tests) for a spec; the expected values come from the oracle."""
    assert spec.fname.isidentifier(), spec.fname
    cases = [(args, spec.oracle(*copy.deepcopy(args))) for args in spec.inputs]
    doc = "\n".join(textwrap.wrap(spec.doc, 96, initial_indent="    ", subsequent_indent="    ")).lstrip()
    examples = "".join(f"    >>> {_call(spec.fname, a)}\n    {e!r}\n" for a, e in cases[1:3])
    prompt = (
        f"{spec.imports}{chr(10) if spec.imports else ''}"
        f'def {spec.fname}({spec.args}) -> {spec.ret}:\n    """{doc}\n\n{examples}    """\n'
    )
    tests = "".join(f"assert {_call(spec.fname, a)} == {e!r}\n" for a, e in cases)
    return prompt, prompt + spec.body, tests


def generate_code(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    held_out_templates: list[str] | tuple[str, ...] | None = None,
) -> list[Record]:
    fams = split_families(split, held_out_templates)
    held_key = ",".join(sorted(DEFAULT_HELD_OUT if held_out_templates is None else held_out_templates))
    out: list[Record] = []
    seen: set[str] = set()
    for i in range(n):
        for attempt in range(200):
            r = random.Random(f"code:{seed}:{split}:{held_key}:{i}:{attempt}")
            fam = fams[r.randrange(len(fams))]
            spec = fam.build(r)
            prompt, solution, tests = render_task(spec)
            if prompt + tests not in seen:
                break
        else:
            raise ConfigError(
                f"could not draw {n} distinct code tasks from {len(fams)} families; ask for fewer"
            )
        seen.add(prompt + tests)
        wording = r.randrange(len(USER_WORDINGS))
        user = USER_WORDINGS[wording].format(prompt=prompt, fname=spec.fname, doc=spec.doc)
        out.append(
            make_record(
                domain="code",
                meta_topic=fam.topic,
                sub_topic=fam.name,
                messages=[
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": f"```python\n{solution}```"},
                ],
                source=SOURCE,
                provenance={
                    "generator": GENERATOR,
                    "generator_version": GENERATOR_VERSION,
                    "family": fam.name,
                    "params": spec.params,
                    "wording": wording,
                    "seed": seed,
                    "index": i,
                    "split": split,
                },
                task=CodeTask(entry_point=spec.fname, prompt=prompt, tests=tests),
            )
        )
    return out


def solution_code(rec: Record) -> str:
    """The Python code of the record's last answer (its python-tagged fenced blocks, joined)."""
    blocks = [code for tag, code in fenced_blocks(rec.messages[-1].content) if tag in ("python", "py", "")]
    return "\n".join(blocks)


def check_code_record(rec: Record, timeout_s: float = 10) -> str | None:
    """Run the record's answer code, then its tests, in the eval sandbox; None if they pass, else the reason.

    Answer code is treated as untrusted: this needs `ultrafuser.eval.sandbox` and never falls back to running
    it in-process (use `verify_references` for the generator's own reference solutions)."""
    try:
        from ultrafuser.eval.sandbox import run_program
    except ImportError as e:
        raise RuntimeError(f"check_code_record needs ultrafuser.eval.sandbox ({e})") from None
    if rec.task is None or rec.task.type != "code":
        return "no code task"
    res = run_program(solution_code(rec), checker=rec.task.tests, timeout_s=timeout_s)
    return None if res.status == "passed" else f"{res.status}: {getattr(res, 'detail', '')}"


_RUNNER = r"""
import json, sys
tasks = json.load(sys.stdin)
out = {}
for t in tasks:
    ns = {"__name__": "__task__"}
    try:
        exec(compile(t["code"], "<solution>", "exec"), ns)
        exec(compile(t["tests"], "<tests>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001
        out[t["id"]] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def verify_references(records: list[Record], timeout_s: float = 120) -> dict[str, str]:
    """Run every record's reference solution against its tests in one child interpreter (`-I`).

    For the generator's OWN reference solutions only (trusted code; no isolation beyond a separate process
    with a timeout). Returns {record id: error} for the ones that fail (empty when all pass)."""
    tasks = [
        {"id": r.id, "code": solution_code(r), "tests": r.task.tests} for r in records if r.task is not None
    ]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _RUNNER],
        input=json.dumps(tasks),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference runner failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
