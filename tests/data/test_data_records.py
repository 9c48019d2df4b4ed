"""The record format: validation, stable ids, JSONL / Parquet / saved-dataset round trips through `datasets`."""

from __future__ import annotations

import json
import os

import pytest

from ultrafuser.config import ConfigError
from ultrafuser.data.records import CodeTask, MathTask, make_record, read_records, record_id, write_records


def _records():
    return [
        make_record(
            domain="text",
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            source="import:alpaca",
        ),
        make_record(
            domain="math",
            meta_topic="Money",
            sub_topic="shopping_change",
            messages=[
                {"role": "system", "content": "Be exact."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "The answer is 4."},
            ],
            source="generator:math-word-problems",
            provenance={"family": "x", "params": {"a": 2, "b": 0.7, "name": "Ava"}},
            task=MathTask(answer="4"),
        ),
        make_record(
            domain="code",
            messages=[
                {"role": "user", "content": "f?"},
                {"role": "assistant", "content": "```python\ndef f(): return 1\n```"},
                {"role": "user", "content": "and g?"},
                {"role": "assistant", "content": "same"},
            ],
            source="ultrachat2-pipeline",
            provenance={
                "teacher": {"model": "m"},
                "sampling": {"temperature": 0.7, "max_tokens": 10},
                "answers": [{"attempts": 2, "sha256": "ab"}],
            },
            task={"type": "code", "entry_point": "f", "prompt": "def f():\n", "tests": "assert f() == 1\n"},
        ),
    ]


@pytest.mark.parametrize(
    "roles",
    [
        ["user"],
        ["assistant"],
        ["user", "user"],
        ["user", "assistant", "user"],
        ["system"],
        [],
        ["user", "system", "assistant"],
        ["system", "assistant"],
    ],
)
def test_bad_message_sequences_are_refused(roles):
    with pytest.raises(ValueError):
        make_record(domain="t", messages=[{"role": r, "content": "x"} for r in roles], source="s")


def test_ids_are_content_derived_and_stable():
    a, b = _records()[0], _records()[0]
    assert (
        a.id
        == b.id
        == record_id("text", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    )
    c = make_record(domain="code", messages=[m.model_dump() for m in a.messages], source="other")
    assert c.id != a.id  # the domain is part of the identity; the source is not
    assert a.id == "df865f327fb74738d98854f1"  # pinned: changing the id formula changes every dataset's ids


def test_unknown_fields_and_task_types_are_refused():
    d = _records()[0].to_dict()
    with pytest.raises(ConfigError, match="(?i)extra inputs"):
        from ultrafuser.data.records import record_from_dict

        record_from_dict(dict(d, color="red"))
    with pytest.raises(Exception):
        make_record(domain="t", messages=d["messages"], source="s", task={"type": "poem", "answer": "x"})


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip_and_datasets_can_load_it(tmp_path, suffix):
    import datasets

    recs = _records()
    path = tmp_path / f"data{suffix}"
    assert write_records(recs, path) == 3
    assert read_records(path) == recs
    ds = datasets.load_dataset(
        "json" if suffix == ".jsonl" else "parquet", data_files=str(path), split="train"
    )
    assert len(ds) == 3 and ds[1]["task"] == {"type": "math", "answer": "4"} and ds[0]["task"] is None
    assert ds[2]["provenance"]["teacher"] == {"model": "m"} and ds[2]["messages"][3]["content"] == "same"
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "saved") == recs


def test_jsonl_is_canonical_and_atomic(tmp_path):
    path = tmp_path / "d.jsonl"
    write_records(_records(), path)
    first = path.read_bytes()
    write_records(_records(), path)
    assert path.read_bytes() == first
    lines = first.decode().splitlines()
    assert list(json.loads(lines[0])) == [
        "id",
        "domain",
        "meta_topic",
        "sub_topic",
        "messages",
        "source",
        "provenance",
        "task",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_read_errors_name_the_place(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_records()[0].to_dict()) + "\n{not json\n")
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_records(p)
    p.write_text(json.dumps({"id": "x", "domain": "t", "messages": [], "source": "s"}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        read_records(p)
    with pytest.raises(ConfigError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"\.jsonl or \.parquet"):
        write_records(_records(), tmp_path / "x.csv")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="not a saved"):
        read_records(tmp_path / "dir")


def test_code_task_fields():
    t = CodeTask(entry_point="f", prompt="def f():\n", tests="assert f() == 1\n")
    assert t.type == "code" and t.model_dump()["entry_point"] == "f"
