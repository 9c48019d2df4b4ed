"""Prompt templates (shipped, overridable, versioned) and the parsers of the teacher's answers; the example
build configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultrafuser.config import ConfigError, load_yaml
from ultrafuser.data.buildconfig import STAGES, BuildConfig
from ultrafuser.data.pipeline import TEMPLATE_STAGES, Builder
from ultrafuser.data.prompting import (
    PACKAGE_PROMPTS,
    SLOTS,
    ParseError,
    load_template,
    parse_list,
    parse_sub_topics,
    parse_text,
)
from ultrafuser.data.store import request_key

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def test_every_stage_has_a_shipped_template_for_every_default_domain():
    for domain in ("text", "code", "math", "my-domain"):
        for stage in TEMPLATE_STAGES:
            t = load_template(stage, domain)
            assert Path(t.path).parent == PACKAGE_PROMPTS and len(t.version) == 12
    assert load_template("instructions", "code").path.endswith("instructions.code.txt")
    assert load_template("instructions", "text").path.endswith("instructions.txt")
    assert load_template("respond_system", "text").text.strip() == ""  # no system prompt for text answers
    assert set(SLOTS) == set(TEMPLATE_STAGES)


def test_user_templates_win_and_change_the_version(tmp_path):
    (tmp_path / "complicate.txt").write_text("Make this harder: {instruction}")
    t = load_template("complicate", "code", tmp_path)
    assert t.path == str(tmp_path / "complicate.txt")
    assert t.version != load_template("complicate", "code").version
    assert (
        t.render(instruction="Sort a list.", domain="code", domain_description="d")
        == "Make this harder: Sort a list."
    )
    (tmp_path / "complicate.txt").write_text('JSON like {"a": 1} is left alone: {instruction}')
    assert '{"a": 1}' in load_template("complicate", "x", tmp_path).render(instruction="i")
    (tmp_path / "complicate.txt").write_text("Use {count} here")
    with pytest.raises(ConfigError, match=r"unknown slot\(s\) \['count'\]"):
        load_template("complicate", "code", tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        load_template("complicate", "code", tmp_path / "nope")


@pytest.mark.parametrize(
    "text, items",
    [
        ('["A", "B", "C"]', ["A", "B", "C"]),
        ('```json\n["A", "B"]\n```', ["A", "B"]),
        ('Sure! Here they are:\n["A", "B"]', ["A", "B"]),
        ("1. A\n2. B\n3) C", ["A", "B", "C"]),
        ("- A\n- B\n* C", ["A", "B", "C"]),
        (
            "1. Write code:\n```python\nx = 1\n```\n2. Second",
            ["Write code:\n```python\nx = 1\n```", "Second"],
        ),
        ("A\nB\n\nC", ["A", "B", "C"]),
        ('["A", "a", " A "]', ["A"]),
        ('[{"instruction": "X"}, {"name": "Y"}]', ["X", "Y"]),
    ],
)
def test_parse_list(text, items):
    assert parse_list(text) == items


def test_parse_list_truncated_answers_keep_only_whole_items():
    assert parse_list('["First item", "Second item", "Thi', truncated=True) == ["First item", "Second item"]
    assert parse_list("1. First\n2. Second\n3. Thi", truncated=True) == ["First", "Second"]
    with pytest.raises(ParseError):
        parse_list("   ")
    with pytest.raises(ParseError):
        parse_list("[]")


def test_parse_sub_topics():
    objs = [
        {"name": "HTML Basics", "relevance": "The web's base.", "example_use": "A page."},
        {"name": "CSS"},
    ]
    got = parse_sub_topics("```json\n" + json.dumps(objs) + "\n```")
    assert got == [objs[0], {"name": "CSS", "relevance": "", "example_use": ""}]
    assert parse_sub_topics("1. Graph Theory | Networks. | Routing.\n2. Combinatorics: Counting things.") == [
        {"name": "Graph Theory", "relevance": "Networks.", "example_use": "Routing."},
        {"name": "Combinatorics", "relevance": "Counting things.", "example_use": ""},
    ]
    with pytest.raises(ParseError):
        parse_sub_topics("[]")


def test_parse_text():
    assert parse_text('Rewritten instruction: "Do X under Y."') == "Do X under Y."
    assert parse_text("User: thanks, and what about Z?") == "thanks, and what about Z?"
    with pytest.raises(ParseError):
        parse_text("")
    with pytest.raises(ParseError):
        parse_text("half a sent", truncated=True)


def test_request_keys_depend_on_every_input():
    msgs = [{"role": "user", "content": "hi"}]
    base = request_key("respond", msgs, "v1", "m", {"temperature": 0.7})
    assert base == request_key("respond", [dict(msgs[0])], "v1", "m", {"temperature": 0.7})
    others = [
        request_key("complicate", msgs, "v1", "m", {"temperature": 0.7}),
        request_key("respond", [{"role": "user", "content": "hi!"}], "v1", "m", {"temperature": 0.7}),
        request_key("respond", msgs, "v2", "m", {"temperature": 0.7}),
        request_key("respond", msgs, "v1", "m2", {"temperature": 0.7}),
        request_key("respond", msgs, "v1", "m", {"temperature": 0.8}),
        request_key("respond", msgs, "v1", "m", {"temperature": 0.7}, variant=2),
    ]
    assert len({base, *others}) == 7


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid_and_documented(path):
    text = path.read_text()
    assert text.startswith("#") and "ultrafuser data build configs/data/" + path.name in text
    cfg = load_yaml(path, BuildConfig)
    plan = Builder(cfg).plan()
    assert set(plan) == set(STAGES) and sum(plan["respond"].values()) > 0


def test_sampling_overrides_and_batches(tmp_path):
    cfg = BuildConfig.model_validate(
        {
            "output": str(tmp_path / "o.jsonl"),
            "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
            "sampling": {"temperature": 0.5, "max_tokens": 100},
            "stage_sampling": {"respond": {"max_tokens": 900}},
            "domains": [
                {
                    "name": "x",
                    "meta_topics": 1,
                    "sub_topics_per_meta_topic": 1,
                    "instructions_per_sub_topic": 7,
                    "instructions_per_request": 3,
                }
            ],
        }
    )
    assert cfg.sampling_for("respond").max_tokens == 900 and cfg.sampling_for("respond").temperature == 0.5
    assert cfg.sampling_for("complicate").max_tokens == 100
    assert cfg.domains[0].instruction_batches == [3, 3, 1]
    assert Builder(cfg).plan()["instructions"] == {"x": 3}
    with pytest.raises(Exception, match="unknown|Input should be"):
        BuildConfig.model_validate({**cfg.model_dump(), "stage_sampling": {"respnd": {}}})
