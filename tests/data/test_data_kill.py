"""SIGKILL the builder (`python -m ultrafuser.cli data build CFG`) at several moments and resume each time:
the final dataset is byte-identical to an uninterrupted build, nothing stored is sent again, nothing is stored
twice, and a finished build resumed sends no request (counted server-side)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from ultrafuser.config import load_yaml
from ultrafuser.data.buildconfig import BuildConfig


def _lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _ok_shas(path) -> set[str]:
    if not os.path.exists(path):
        return set()
    out = set()
    for line in open(path, "rb").read().split(b"\n"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e["status"] == "ok":
            out.add(e["messages_sha256"])
    return out


def _cmd(path):
    return [sys.executable, "-m", "ultrafuser.cli", "data", "build", str(path)]


def _points(total: int, many: bool) -> list[int]:
    """After how many stored results to kill; the last point (all stored) kills it while filtering/writing."""
    if not many:
        return [1, total // 2, total]
    return sorted({1, 2, 5, 9, 17, total // 3, total // 2, 2 * total // 3, total - 1, total})


@pytest.mark.parametrize(
    "many", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["3-kills", "10-kills"]
)
def test_sigkill_at_several_moments_then_resume(fake_teacher, build_config, sub_env, finished, many):
    fake_teacher.delay = 0.01  # each answer takes a moment, so kills land between stored results
    path = build_config(fake_teacher.url, "killed")
    cfg = load_yaml(path, BuildConfig)
    store = cfg.store_path
    total = finished.sent  # results an uninterrupted build stores
    env = sub_env()
    kills = 0
    for k in _points(total, many):
        before = _ok_shas(store)
        n0 = fake_teacher.count()
        proc = subprocess.Popen(_cmd(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _lines(store) < k and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        rc = proc.wait()
        assert rc in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        sent = {e["sha"] for e in fake_teacher.log[n0:]}
        assert not sent & before, "a request whose result was already stored was sent again"
    assert kills >= len(_points(total, many)) - 1

    proc = subprocess.run(_cmd(path), env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cfg.output_path.read_bytes() == finished.out  # byte-identical to the uninterrupted build
    assert not list(cfg.output_path.parent.glob(".*.tmp"))  # no temp file of a killed write is left

    entries = [json.loads(x) for x in store.read_text().splitlines() if x.strip()]
    ok = Counter(e["key"] for e in entries if e["status"] == "ok")
    assert len(ok) == total and max(ok.values()) == 1  # nothing lost, nothing stored twice
    # what was in flight at a kill is sent again, nothing more
    assert total <= fake_teacher.count() <= total + kills * cfg.teacher.concurrency

    n0 = fake_teacher.count()
    proc = subprocess.run(_cmd(path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and fake_teacher.count() == n0  # a finished build sends nothing
    assert cfg.output_path.read_bytes() == finished.out
