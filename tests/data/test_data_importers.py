"""Importers for Alpaca / Evol-Instruct, MathInstruct and ShareGPT files, and the `data import` command."""

from __future__ import annotations

import json

import pytest

from ultrafuser.cli import main as cli_main
from ultrafuser.config import ConfigError
from ultrafuser.data.importers import classify_domain, import_records
from ultrafuser.data.records import read_records


def _write(path, rows, as_array=False):
    path.write_text(json.dumps(rows) if as_array else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca(tmp_path):
    rows = [
        {
            "instruction": "Give three tips for staying healthy.",
            "input": "",
            "output": "Eat well, sleep, move.",
        },
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {
            "instruction": "Write a Python function that reverses a string.",
            "output": "```python\ndef r(s): return s[::-1]\n```",
        },
        {"instruction": "What is 12 * 7?", "input": "", "output": "84"},
        {"instruction": "", "output": "orphan"},
        {"instruction": "No answer", "output": ""},
        ["not", "an", "object"],
    ]
    recs, rep = import_records(_write(tmp_path / "a.json", rows, as_array=True), "alpaca")
    assert rep.read == 7 and rep.written == 4
    assert dict(rep.skipped) == {"missing_instruction": 1, "missing_output": 1, "not_an_object": 1}
    assert recs[1].messages[0].content == "Translate to French.\n\nGood morning"
    assert [r.domain for r in recs] == ["text", "text", "code", "math"]
    assert all(r.source == "import:alpaca" and r.provenance["file"] == "a.json" for r in recs)
    assert [r.provenance["line"] for r in recs] == [1, 2, 3, 4]


def test_mathinstruct_defaults_to_math(tmp_path):
    rows = [
        {
            "instruction": "Solve x + 2 = 5.",
            "output": "x = 3. The answer is 3.",
            "source": "data/CoT/gsm_rft.json",
        },
        {
            "instruction": "Write a program to sum 1..10",
            "output": "print(sum(range(11)))",
            "source": "data/PoT/x.json",
        },
    ]
    recs, rep = import_records(_write(tmp_path / "m.jsonl", rows), "mathinstruct")
    assert [r.domain for r in recs] == ["math", "math"]
    assert recs[0].provenance["origin"] == "data/CoT/gsm_rft.json" and recs[0].source == "import:mathinstruct"


def test_sharegpt(tmp_path):
    rows = [
        {
            "id": "c1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Fix this bug in my script"},
                {"from": "gpt", "value": "Sure"},
                {"from": "human", "value": "thanks"},
            ],
        },
        {
            "id": "c2",
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "human", "value": "b"},
                {"from": "gpt", "value": "c"},
            ],
        },
        {"id": "c3", "conversations": [{"from": "gpt", "value": "I start"}]},
        {"id": "c4", "conversations": [{"from": "alien", "value": "?"}]},
        {
            "id": "c5",
            "conversations": [
                {"from": "user", "value": "How many legs do 3 cats have?"},
                {"from": "assistant", "value": "12"},
            ],
        },
    ]
    recs, rep = import_records(_write(tmp_path / "s.jsonl", rows), "sharegpt")
    assert rep.written == 2 and dict(rep.skipped) == {"not_alternating": 2, "unknown_role": 1}
    first = recs[0]
    assert [m.role for m in first.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]  # trailing user dropped
    assert first.domain == "code" and first.provenance["original_id"] == "c1"
    assert recs[1].domain == "math"


@pytest.mark.parametrize(
    "text, domain",
    [
        ("Write a function that adds two numbers", "code"),
        ("Why does my JavaScript code throw a TypeError?", "code"),
        ("def f(x): what does it return?", "code"),
        ("What is 3 + 4?", "math"),
        ("Solve the equation 2x = 10", "math"),
        ("What is the probability of two heads?", "math"),
        ("Tell me about the class of 2020", "text"),
        ("Explain the function of the liver", "text"),
        ("Write a poem about the sea", "text"),
    ],
)
def test_domain_rules(text, domain):
    assert (
        classify_domain([{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]) == domain
    )


def test_fence_in_answer_means_code():
    assert (
        classify_domain(
            [{"role": "user", "content": "Show me"}, {"role": "assistant", "content": "```\nls\n```"}]
        )
        == "code"
    )


def test_import_command(tmp_path, capsys):
    src = _write(
        tmp_path / "a.jsonl",
        [{"instruction": "Say hi", "output": "hi"}, {"instruction": "What is 2 + 2?", "output": "4"}],
    )
    out = tmp_path / "out.parquet"
    assert cli_main(["data", "import", "--format", "alpaca", str(src), "--out", str(out)]) == 0
    assert "imported 2 of 2" in capsys.readouterr().out
    assert [r.domain for r in read_records(out)] == ["text", "math"]
    out2 = tmp_path / "out.jsonl"
    assert (
        cli_main(["data", "import", "--format", "alpaca", str(src), "--out", str(out2), "--domain", "chat"])
        == 0
    )
    assert {r.domain for r in read_records(out2)} == {"chat"}
    # user errors: exit code 2 with a message
    assert (
        cli_main(["data", "import", "--format", "alpaca", str(tmp_path / "nope.jsonl"), "--out", str(out2)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    assert cli_main(["data", "import", "--format", "alpaca", str(bad), "--out", str(out2)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_nothing_usable_is_an_error(tmp_path):
    from ultrafuser.data.importers import import_file

    src = _write(tmp_path / "e.jsonl", [{"foo": 1}])
    with pytest.raises(ConfigError, match="no usable"):
        import_file(src, tmp_path / "o.jsonl", "alpaca")
