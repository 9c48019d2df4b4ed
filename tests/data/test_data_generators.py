"""Offline generators: every math answer re-checks, every code reference passes its tests, determinism under
seed, held-out families disjoint from train."""

from __future__ import annotations

import importlib.util
import random
import re

import pytest

from ultrafuser.cli import main as cli_main
from ultrafuser.config import ConfigError
from ultrafuser.data.generators.code_families import CODE_FAMILIES
from ultrafuser.data.generators.code_tasks import DEFAULT_HELD_OUT as CODE_HELD_OUT
from ultrafuser.data.generators.code_tasks import check_code_record, generate_code, verify_references
from ultrafuser.data.generators.math_families import FAMILIES
from ultrafuser.data.generators.math_problems import DEFAULT_HELD_OUT as MATH_HELD_OUT
from ultrafuser.data.generators.math_problems import check_math_record, final_answer, generate_math
from ultrafuser.data.records import read_records


def test_enough_families_and_wordings():
    assert len(FAMILIES) >= 30 and len(FAMILIES) - len(MATH_HELD_OUT) >= 30
    assert all(len(f.wordings) >= 2 for f in FAMILIES.values())
    assert len(CODE_FAMILIES) >= 30 and len(CODE_FAMILIES) - len(CODE_HELD_OUT) >= 30


def test_every_math_answer_passes_its_independent_check():
    recs = generate_math(1500, seed=11) + generate_math(300, seed=11, split="heldout")
    assert {r.provenance["family"] for r in recs} == set(FAMILIES)
    for r in recs:
        assert check_math_record(r) is None, (r.provenance, r.messages)
        last = r.messages[-1].content.splitlines()[-1]
        assert last == f"The answer is {r.task.answer}."
        assert r.domain == "math" and r.source == "generator:math-word-problems"
        assert len(r.messages[-1].content.splitlines()) >= 3  # at least two steps before the answer
        # every integer parameter is stated in the problem
        numbers = re.findall(r"\d+", r.messages[0].content)
        params = r.provenance["params"]
        for k, v in params.items():
            if isinstance(v, int) and not isinstance(v, bool) and f"{k}_word" not in params:
                assert str(v) in numbers, (r.provenance["family"], k, v, r.messages[0].content)
    assert len({r.messages[0].content for r in recs}) == len(recs)  # no repeated problem
    wordings = {(r.provenance["family"], r.provenance["wording"]) for r in recs}
    assert len(wordings) >= 75


def test_the_math_checker_catches_wrong_answers():
    r = generate_math(1, seed=2)[0]
    wrong = r.model_copy(update={"task": r.task.model_copy(update={"answer": str(int(r.task.answer) + 1)})})
    assert "recomputed" in check_math_record(wrong)
    msgs = list(r.messages)
    msgs[-1] = msgs[-1].model_copy(update={"content": msgs[-1].content.replace("The answer is", "Maybe")})
    assert "final line" in check_math_record(r.model_copy(update={"messages": msgs}))
    assert final_answer("x\nThe answer is -7.") == "-7" and final_answer("The answer is 7") is None


def test_every_code_reference_passes_its_tests():
    recs = generate_code(600, seed=5) + generate_code(120, seed=5, split="heldout")
    assert {r.provenance["family"] for r in recs} == set(CODE_FAMILIES)
    assert verify_references(recs) == {}
    for r in recs:
        t = r.task
        assert r.messages[-1].content.startswith("```python\n" + t.prompt) and r.messages[
            -1
        ].content.endswith("```")
        assert t.prompt in r.messages[0].content and f"def {t.entry_point}(" in t.prompt
        assert t.tests.count("assert ") >= 3
    assert len({r.task.prompt + r.task.tests for r in recs}) == len(recs)


def test_code_tests_catch_a_wrong_solution():
    r = generate_code(1, seed=3)[0]
    body_start = r.messages[-1].content.index(r.task.prompt) + len(r.task.prompt)
    broken = r.messages[-1].content[:body_start] + "    return None\n```"
    msgs = [r.messages[0], r.messages[1].model_copy(update={"content": broken})]
    bad = verify_references([r.model_copy(update={"messages": msgs})])
    assert list(bad) == [r.id] and "AssertionError" in bad[r.id]


@pytest.mark.skipif(
    importlib.util.find_spec("ultrafuser.eval.sandbox") is None, reason="needs the eval sandbox"
)
def test_references_pass_in_the_sandbox():
    rng = random.Random(0)
    recs = generate_code(200, seed=9)
    sample = rng.sample(recs, 6)
    for r in sample:
        assert check_code_record(r) is None, r.provenance["family"]
    broken = sample[0].model_copy(
        update={
            "messages": [
                sample[0].messages[0],
                sample[0]
                .messages[1]
                .model_copy(update={"content": "```python\ndef nothing():\n    pass\n```"}),
            ]
        }
    )
    assert check_code_record(broken) is not None


@pytest.mark.parametrize("gen", [generate_math, generate_code])
def test_deterministic_under_seed_and_prefix_stable(gen):
    a, b = gen(40, seed=7), gen(40, seed=7)
    assert [r.to_json_line() for r in a] == [r.to_json_line() for r in b]
    assert [r.id for r in gen(10, seed=7)] == [r.id for r in a[:10]]
    assert [r.id for r in gen(40, seed=8)] != [r.id for r in a]


@pytest.mark.parametrize(
    "gen, families, held",
    [(generate_math, FAMILIES, MATH_HELD_OUT), (generate_code, CODE_FAMILIES, CODE_HELD_OUT)],
)
def test_held_out_families_are_disjoint_from_train(gen, families, held):
    train = {r.provenance["family"] for r in gen(400, seed=1)}
    heldout = {r.provenance["family"] for r in gen(100, seed=1, split="heldout")}
    assert heldout == set(held) and not train & heldout and train == set(families) - set(held)
    custom = sorted(families)[:2]
    tr = {r.provenance["family"] for r in gen(300, seed=1, held_out_templates=custom)}
    ho = {r.provenance["family"] for r in gen(50, seed=1, split="heldout", held_out_templates=custom)}
    assert ho == set(custom) and not tr & ho
    with pytest.raises(ConfigError, match="do not exist"):
        gen(1, held_out_templates=["no_such_family"])
    with pytest.raises(ConfigError, match="no .*families"):
        gen(1, split="heldout", held_out_templates=[])


def test_generate_command(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert cli_main(["data", "generate", "math", "--n", "25", "--seed", "4", "--out", str(out)]) == 0
    recs = read_records(out)
    assert len(recs) == 25 and all(check_math_record(r) is None for r in recs)
    assert recs == generate_math(25, seed=4)
    out2 = tmp_path / "c.parquet"
    assert (
        cli_main(
            ["data", "generate", "code", "--n", "12", "--seed", "4", "--out", str(out2), "--split", "heldout"]
        )
        == 0
    )
    recs = read_records(out2)
    assert {r.provenance["family"] for r in recs} <= set(CODE_HELD_OUT) and verify_references(recs) == {}
    assert "wrote 12 code records" in capsys.readouterr().out
    assert cli_main(["data", "generate", "math", "--n", "3", "--out", str(out), "--held-out", "nope"]) == 2
    assert cli_main(["data", "generate", "math", "--n", "0", "--out", str(out)]) == 2
