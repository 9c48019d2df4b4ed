"""The construction pipeline end to end against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fake_openai_server import messages_sha

from ultrafuser.cli import main as cli_main
from ultrafuser.config import ConfigError, load_yaml
from ultrafuser.data.buildconfig import BuildConfig
from ultrafuser.data.pipeline import Builder, run_build
from ultrafuser.data.prompting import PACKAGE_PROMPTS
from ultrafuser.data.records import read_records


def _build(path: Path, *overrides: str, echo=lambda s: None):
    cfg = load_yaml(path, BuildConfig, list(overrides))
    return cfg, run_build(cfg, echo=echo)


def _store_lines(cfg: BuildConfig) -> list[dict]:
    return [json.loads(line) for line in cfg.store_path.read_text().splitlines()]


def _clone(finished, path: Path) -> BuildConfig:
    """Give the build config at `path` a copy of the finished build's store."""
    cfg = load_yaml(path, BuildConfig)
    cfg.store_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(finished.cfg.store_path, cfg.store_path)
    return cfg


def test_end_to_end_build(finished):
    cfg, rep, printed = finished.cfg, finished.report, finished.printed
    assert rep.complete and rep.records > 0

    # the plan is printed first; its exact stages match what was sent (the server returns enough items)
    plan = Builder(cfg).plan()
    assert "plan:" in printed[0] and "meta_topics" in printed[0]
    stages = finished.stages
    for stage in ("meta_topics", "sub_topics", "instructions", "related_strong", "related_weak"):
        assert stages[stage] == sum(plan[stage].values()), stage
    assert stages["respond"] >= sum(plan["respond"].values()) * 0.5

    # output: valid records, loadable with `datasets`, with provenance, no duplicate ids
    import datasets

    ds = datasets.load_dataset("json", data_files=str(cfg.output_path), split="train")
    recs = read_records(cfg.output_path)
    assert len(ds) == len(recs) == rep.records
    assert len({r.id for r in recs}) == len(recs)
    assert {r.domain for r in recs} == {"code", "math"}
    for r in recs:
        assert r.source == "ultrachat2-pipeline" and r.meta_topic and r.sub_topic
        p = r.provenance
        assert p["teacher"] == {"model": "fake-teacher"} and p["seed"] == 3
        assert p["sampling"]["temperature"] == 0.7
        assert len(p["answers"]) == sum(m.role == "assistant" for m in r.messages)
        assert all(
            len(a["sha256"]) == 64 and a["attempts"] == 1 and a["finish_reason"] == "stop"
            for a in p["answers"]
        )
        assert set(p["prompt_versions"]) >= {"sub_topics", "instructions", "respond_system"}
        if r.domain == "math":
            assert r.meta_topic in ("Algebra", "Geometry") and "meta_topics" not in p["prompt_versions"]
            assert r.messages[-1].content.rstrip().split("\n")[-1].startswith("The answer is")
        else:
            assert "```python" in r.messages[1].content
    # multi-turn conversations exist (code: 60 % continued)
    multi = [r for r in recs if len(r.messages) > 2]
    assert multi and all(r.domain == "code" for r in multi)
    assert any(r.provenance["complicated"] for r in recs) and not all(
        r.provenance["complicated"] for r in recs
    )
    # (the fake teacher's weakly related items and strongly related math items are all planted bad ones)
    assert {r.provenance["origin"] for r in recs} == {"seed", "strongly_related"}

    # what was removed, and why
    rejected = [json.loads(line) for line in cfg.rejected_path.read_text().splitlines()]
    reasons = Counter(r["reason"] for r in rejected)
    assert reasons["refusal"] >= 1 and reasons["code_syntax_error"] >= 1 and reasons["near_duplicate"] >= 1
    assert reasons["math_no_final_answer"] >= 1
    assert all(
        r["reason"] and r["id"] and r["stage"] in ("validation", "dedup", "decontamination") for r in rejected
    )
    stats = json.loads(cfg.stats_path.read_text())
    assert stats["complete"] and stats["records"] == len(recs)
    assert set(stats["domains"]) == {"code", "math"}
    assert stats["domains"]["code"]["meta_topics"] == 2 and stats["domains"]["math"]["sub_topics"] <= 4
    assert stats["domains"]["code"]["avg_words_per_conversation"] > 0
    assert stats["removed"] == dict(sorted(reasons.items()))


def test_rerun_sends_nothing_and_concurrency_does_not_change_the_output(fake_teacher, build_config, finished):
    path = build_config(fake_teacher.url, "a")
    cfg = _clone(finished, path)
    _, rep = _build(path)
    assert fake_teacher.count() == 0 and rep.sent == 0 and rep.complete
    assert cfg.output_path.read_bytes() == finished.out
    # a fresh build with its own store, one request at a time (so in another order): the same bytes
    cfg1, _ = _build(build_config(fake_teacher.url, "b", teacher={"concurrency": 1}))
    assert fake_teacher.count() == finished.sent
    assert cfg1.output_path.read_bytes() == finished.out


def test_failures_are_recorded_with_a_reason_and_retried_on_the_next_run(
    fake_teacher, build_config, finished
):

    def flaky(info, attempt):  # a fifth of the answers fail hard (no retry) during the first run
        return "http_400" if info["stage"] == "respond" and int(info["sha"][:4], 16) % 5 == 0 else None

    fake_teacher.fault = flaky
    cfg, rep = _build(build_config(fake_teacher.url, "flaky"))
    assert not rep.complete and rep.stats["run"]["failed"]["http_400"] >= 1
    failed = [e for e in _store_lines(cfg) if e["status"] == "failed"]
    assert failed and all(
        e["reason"] == "http_400" and e["retryable"] is False and e["attempts"] == 1 for e in failed
    )
    ok_before = {e["messages_sha256"] for e in _store_lines(cfg) if e["status"] == "ok"}
    failed_shas = {e["messages_sha256"] for e in failed}

    fake_teacher.fault = None
    fake_teacher.reset_log()
    _, rep2 = _build(build_config(fake_teacher.url, "flaky"))
    resent = {e["sha"] for e in fake_teacher.log}
    assert rep2.complete
    assert failed_shas <= resent  # every failure was sent again
    assert not resent & ok_before  # nothing that had succeeded was
    # the same dataset as a build that never failed, except that the answers that needed two runs say so
    recs, base = read_records(cfg.output_path), read_records(finished.cfg.output_path)
    attempts = [a["attempts"] for r in recs for a in r.provenance["answers"]]
    assert max(attempts) == 2 and 1 <= attempts.count(2) <= len(failed_shas)

    def norm(r):
        d = r.to_dict()
        for a in d["provenance"]["answers"]:
            a["attempts"] = 1
        return d

    assert [norm(r) for r in recs] == [norm(r) for r in base]


def test_torn_and_garbled_store_lines_are_tolerated(fake_teacher, build_config, finished):
    cfg = _clone(finished, build_config(fake_teacher.url))
    out = finished.out
    size = cfg.store_path.stat().st_size
    with open(cfg.store_path, "ab") as f:
        f.write(b'{"key": "abc", "stage": "respond", "status": "o')  # what a SIGKILL mid-write leaves
    _build(build_config(fake_teacher.url))
    assert fake_teacher.count() == 0 and cfg.output_path.read_bytes() == out
    assert cfg.store_path.stat().st_size == size  # the torn tail was cut off
    with open(cfg.store_path, "ab") as f:
        f.write(b"not json at all\n")
    _build(build_config(fake_teacher.url))
    assert fake_teacher.count() == 0 and cfg.output_path.read_bytes() == out


def test_parquet_output_from_the_same_store(fake_teacher, build_config, tmp_path, finished):
    pq = tmp_path / "run" / "data.parquet"
    cfg = _clone(finished, build_config(fake_teacher.url, output=str(pq)))
    _build(build_config(fake_teacher.url, output=str(pq)))
    assert fake_teacher.count() == 0
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(pq), split="train")
    assert read_records(pq) == read_records(finished.cfg.output_path) and cfg.output_path == pq
    assert len(ds) == len(read_records(pq)) and isinstance(ds[0]["provenance"], dict)


def test_editing_a_prompt_resends_only_the_requests_that_use_it(
    fake_teacher, build_config, tmp_path, finished
):
    _clone(finished, build_config(fake_teacher.url))
    prompts = tmp_path / "prompts"
    shutil.copytree(PACKAGE_PROMPTS, prompts)
    (prompts / "respond_system.math.txt").write_text(
        "You are a careful math tutor. End with 'The answer is X.'\n"
    )
    _build(build_config(fake_teacher.url, prompts_dir=str(prompts)))
    assert fake_teacher.count() > 0
    assert all(
        e["stage"] == "respond" and "math tutor" in e["body"]["messages"][0]["content"]
        for e in fake_teacher.log
    )


def test_plan_only_sends_nothing_and_needs_no_key(fake_teacher, build_config, monkeypatch, capsys):
    path = build_config(fake_teacher.url)
    monkeypatch.delenv("UF_DATA_TEST_KEY")
    assert cli_main(["data", "build", str(path), "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert fake_teacher.count() == 0
    for stage in (
        "meta_topics",
        "sub_topics",
        "instructions",
        "related_strong",
        "complicate",
        "respond",
        "total",
    ):
        assert stage in out
    # without --plan-only the missing key is a clear error (exit 2), before any request
    assert cli_main(["data", "build", str(path)]) == 2
    assert "UF_DATA_TEST_KEY" in capsys.readouterr().err and fake_teacher.count() == 0


def test_auth_failure_stops_the_build(fake_teacher, build_config):
    fake_teacher.fault = lambda info, attempt: "http_401"
    cfg, rep = _build(build_config(fake_teacher.url))
    assert not rep.complete and "http_401" in rep.stats["run"]["stopped"]
    assert fake_teacher.count() == 1  # the first meta-topic request; everything else was not sent
    assert rep.stats["run"]["not_sent"] >= 1


def test_config_errors_are_clear(build_config, tmp_path):
    path = build_config("http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="unknown key"):
        load_yaml(path, BuildConfig, ["teacher.concurency=3"])
    with pytest.raises(ConfigError, match=r"\.jsonl or \.parquet"):
        load_yaml(path, BuildConfig, ["output=out.csv"])
    with pytest.raises(ConfigError, match="sub_topics_used"):
        load_yaml(
            path, BuildConfig, ["domains=[{name: x, sub_topics_per_meta_topic: 2, sub_topics_used: 3}]"]
        )
    bad = tmp_path / "badprompts"
    bad.mkdir()
    (bad / "complicate.txt").write_text("Rewrite {instrution} harder.")
    cfg = load_yaml(path, BuildConfig, [f"prompts_dir={bad}"])
    with pytest.raises(ConfigError, match=r"unknown slot\(s\) \['instrution'\]"):
        Builder(cfg)
    cfg = load_yaml(path, BuildConfig, ["quality.decontaminate.eval_sets=[gsm9k]"])
    with pytest.raises(ConfigError, match="unknown set 'gsm9k'"):
        Builder(cfg)


def test_decontamination_in_a_build(fake_teacher, build_config, tmp_path, finished):
    _clone(finished, build_config(fake_teacher.url, "clean"))
    recs = read_records(finished.cfg.output_path)
    victim = recs[0].messages[0].content  # pretend this instruction is a test question
    evalset = tmp_path / "heldout.jsonl"
    evalset.write_text(json.dumps({"question": "Q: " + victim, "answer": "1"}) + "\n")
    cfg2, rep = _build(
        build_config(
            fake_teacher.url,
            "clean",
            quality={
                "decontaminate": {
                    "eval_sets": ["humaneval"],
                    "files": [{"path": str(evalset), "fields": ["question"], "name": "myset"}],
                }
            },
        )
    )
    assert fake_teacher.count() == 0
    gone = [json.loads(x) for x in cfg2.rejected_path.read_text().splitlines() if '"contaminated"' in x]
    assert [g["id"] for g in gone] == [recs[0].id] and "myset" in gone[0]["detail"]
    assert rep.records == len(recs) - 1


def test_api_key_never_reaches_data_or_logs(fake_teacher, build_config, sub_env, tmp_path):
    secret = "sk-uf-SECRET-9c1d4e"
    # a few transient errors, one from a server that echoes the credentials back
    fake_teacher.fault = lambda info, attempt: (
        ("echo_auth_500" if int(info["sha"][:2], 16) % 2 else "http_503")
        if attempt == 1 and int(info["sha"][2:4], 16) % 4 == 0
        else None
    )
    path = build_config(fake_teacher.url)
    proc = subprocess.run(
        [sys.executable, "-m", "ultrafuser.cli", "-v", "data", "build", str(path)],
        env=sub_env({"UF_DATA_TEST_KEY": secret}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fake_teacher.log and all(e["auth"] == f"Bearer {secret}" for e in fake_teacher.log)
    assert "Retrying" not in proc.stderr  # the client's own retries are off: the policy is ours
    assert secret not in proc.stdout and secret not in proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert yaml.safe_load(path.read_text())["teacher"]["api_key_env"] == "UF_DATA_TEST_KEY"
    assert messages_sha([{"role": "user", "content": "x"}])  # the helper the kill test relies on works


def test_many_instructions_per_sub_topic_are_asked_for_in_batches(fake_teacher, build_config):
    path = build_config(
        fake_teacher.url,
        "batches",
        domains=[
            {
                "name": "code",
                "meta_topics": ["Web Development"],
                "sub_topics_per_meta_topic": 1,
                "instructions_per_sub_topic": 5,
                "instructions_per_request": 2,
                "strong_related": 0,
                "weak_related": 0,
                "complicate_share": 0.0,
            }
        ],
    )
    cfg, rep = _build(path)
    asks = [e for e in fake_teacher.log if e["stage"] == "instructions"]
    assert len(asks) == 3 and len({e["sha"] for e in asks}) == 3
    assert sum("request 2 of 3" in e["body"]["messages"][0]["content"] for e in asks) == 1
    assert sum(e["stage"] == "respond" for e in fake_teacher.log) == 5
    assert len({r.messages[0].content for r in read_records(cfg.output_path)}) == rep.records
