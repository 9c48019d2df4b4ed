"""Grade-school multi-step word problems with step-by-step solutions and exact, independently checked answers.

    generate_math(n, seed=0, split="train", held_out_templates=None) -> list[Record]
    check_math_record(record) -> str | None     # None when the record is right, else what is wrong

Each record: one user message (the problem, in one of the family's paraphrased wordings), one assistant
message (numbered reasoning steps, then a last line "The answer is N."), `task = {"type": "math", "answer": "N"}`,
and `provenance` with the family, wording index and parameters, so the answer can be recomputed by the family's
independent `check` formula. Families in `held_out_templates` (default `DEFAULT_HELD_OUT`) never appear in
the train split; the heldout split draws only from them. Item i depends only on (seed, split, held-out set, i),
so a larger n extends a smaller one.
"""

from __future__ import annotations

import random
import re

from ultrafuser.config import ConfigError
from ultrafuser.data.generators.math_families import FAMILIES, Family
from ultrafuser.data.records import MathTask, Record, make_record

GENERATOR = "math-word-problems"
GENERATOR_VERSION = 1
SOURCE = f"generator:{GENERATOR}"
DEFAULT_HELD_OUT = (
    "heads_legs",
    "consecutive_sum",
    "fruit_basket",
    "commission_pay",
    "tank_fill_time",
    "test_average_needed",
    "rectangle_from_perimeter",
)
FINAL_RE = re.compile(r"^The answer is (-?\d+)\.$")


def split_families(split: str, held_out_templates: list[str] | tuple[str, ...] | None = None) -> list[Family]:
    """The families a split draws from (in a fixed order)."""
    held = tuple(DEFAULT_HELD_OUT if held_out_templates is None else held_out_templates)
    unknown = sorted(set(held) - set(FAMILIES))
    if unknown:
        raise ConfigError(
            f"held-out template families {unknown} do not exist; known: {', '.join(sorted(FAMILIES))}"
        )
    if split == "train":
        fams = [f for name, f in sorted(FAMILIES.items()) if name not in held]
    elif split == "heldout":
        fams = [FAMILIES[name] for name in sorted(set(held))]
    else:
        raise ConfigError(f"split {split!r}: use train or heldout")
    if not fams:
        raise ConfigError(f"split {split!r} has no template families (held out: {list(held)})")
    return fams


def render_problem(fam: Family, params: dict, wording: int) -> str:
    return fam.wordings[wording].format(**params)


def solution_text(steps: list[str], answer: int) -> str:
    return "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1)) + f"\nThe answer is {answer}."


def _int_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool)}


def generate_math(
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
        for attempt in range(100):
            r = random.Random(f"math:{seed}:{split}:{held_key}:{i}:{attempt}")
            fam = fams[r.randrange(len(fams))]
            params, steps, answer = fam.build(r)
            wording = r.randrange(len(fam.wordings))
            expect = fam.check(params)
            if expect != answer:  # a bug in a family: never emit an unchecked answer
                raise AssertionError(
                    f"family {fam.name}: solution says {answer}, check says {expect} for {params}"
                )
            problem = render_problem(fam, params, wording)
            if problem not in seen:
                break
        else:
            raise ConfigError(
                f"could not draw {n} distinct problems from {len(fams)} families; ask for fewer"
            )
        seen.add(problem)
        out.append(
            make_record(
                domain="math",
                meta_topic=fam.topic,
                sub_topic=fam.name,
                messages=[
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": solution_text(steps, answer)},
                ],
                source=SOURCE,
                provenance={
                    "generator": GENERATOR,
                    "generator_version": GENERATOR_VERSION,
                    "family": fam.name,
                    "wording": wording,
                    "params": params,
                    "seed": seed,
                    "index": i,
                    "split": split,
                },
                task=MathTask(answer=str(answer)),
            )
        )
    return out


def final_answer(text: str) -> str | None:
    """The N of the last line "The answer is N.", or None."""
    lines = text.strip().splitlines()
    m = FINAL_RE.match(lines[-1].strip()) if lines else None
    return m.group(1) if m else None


def check_math_record(rec: Record) -> str | None:
    """Recompute the answer from the stored parameters with the family's own formula; None if all agree."""
    prov = rec.provenance
    fam = FAMILIES.get(prov.get("family", ""))
    if fam is None:
        return f"unknown family {prov.get('family')!r}"
    expect = str(fam.check(prov["params"]))
    if rec.task is None or rec.task.type != "math":
        return "no math task"
    if rec.task.answer != expect:
        return f"task answer {rec.task.answer} != recomputed {expect}"
    stated = final_answer(rec.messages[-1].content)
    if stated != expect:
        return f"final line states {stated!r}, recomputed {expect}"
    if rec.messages[0].content != render_problem(fam, prov["params"], prov["wording"]):
        return "problem text does not match its parameters"
    return None
