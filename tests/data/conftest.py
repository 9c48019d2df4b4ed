"""Fixtures for the data tests: a scripted OpenAI-compatible server (fake_openai_server.py), build configs,
and an environment for `python -m ultrafuser.cli` children."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import SMALL_BUILD, TEST_KEY_ENV, FakeTeacher, merge_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def fake_teacher():
    ft = FakeTeacher()
    yield ft
    ft.close()


SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def sub_env():
    """Environment for `python -m ultrafuser.cli` children: this checkout first on the path."""

    def make(extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra or {})
        return env

    return make


@pytest.fixture
def build_config(tmp_path, monkeypatch):
    """Write a small build config for a server URL: build_config(url, name, **overrides) -> path."""
    import yaml

    monkeypatch.setenv(TEST_KEY_ENV, "sk-test-key-0000")

    def make(url: str, name: str = "run", **over) -> Path:
        cfg = merge_config(
            SMALL_BUILD, {"output": str(tmp_path / name / "data.jsonl"), "teacher": {"base_url": url}}
        )
        cfg = merge_config(cfg, over)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """One complete build of the small config (its own server), shared by the tests that start from a finished
    store: .cfg, .out (output bytes), .sent (requests it took), .stages (requests per stage), .printed."""
    from collections import Counter
    from types import SimpleNamespace

    from ultrafuser.data.buildconfig import BuildConfig
    from ultrafuser.data.pipeline import run_build

    root = tmp_path_factory.mktemp("finished")
    ft = FakeTeacher()
    old = os.environ.get(TEST_KEY_ENV)
    os.environ[TEST_KEY_ENV] = "sk-test-key-0000"
    try:
        tree = dict(
            SMALL_BUILD,
            output=str(root / "data.jsonl"),
            teacher=dict(SMALL_BUILD["teacher"], base_url=ft.url),
        )
        cfg = BuildConfig.model_validate(tree)
        printed: list[str] = []
        rep = run_build(cfg, echo=printed.append)
    finally:
        ft.close()
        if old is None:
            os.environ.pop(TEST_KEY_ENV, None)
        else:
            os.environ[TEST_KEY_ENV] = old
    assert rep.complete
    return SimpleNamespace(
        cfg=cfg,
        out=cfg.output_path.read_bytes(),
        sent=ft.count(),
        report=rep,
        printed=printed,
        stages=Counter(e["stage"] for e in ft.log),
    )
