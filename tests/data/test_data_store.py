"""The append-only request store: final ok results, failures that stay pending, torn lines, the lock."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ultrafuser.config import ConfigError
from ultrafuser.data.store import RequestStore


def _ok(key, content="x", stage="respond"):
    return {"key": key, "stage": stage, "status": "ok", "content": content, "attempts": 1}


def test_ok_is_final_and_failures_stay_pending(tmp_path):
    path = tmp_path / "s" / "requests.jsonl"
    with RequestStore(path) as st:
        st.append({"key": "a", "stage": "respond", "status": "failed", "reason": "http_500", "attempts": 3})
        st.append(_ok("b"))
        assert st.get_ok("a") is None and st.last_failure("a")["reason"] == "http_500"
        assert st.get_ok("b")["content"] == "x"
    with RequestStore(path) as st:  # reopened: the same view
        assert st.get_ok("a") is None and st.failed_attempts("a") == 3
        assert list(st.pending_failures()) == ["a"] and st.ok_count_by_stage() == {"respond": 1}
        st.append({"key": "a", "stage": "respond", "status": "failed", "reason": "timeout", "attempts": 2})
        st.append(_ok("a", "late"))
    with RequestStore(path) as st:
        assert st.get_ok("a")["content"] == "late" and st.failed_attempts("a") == 5
        assert st.pending_failures() == {} and st.last_failure("a") is None
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["t"] > 0 for x in lines)


def test_torn_tail_is_cut_and_garbage_skipped(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(
        (json.dumps(_ok("a")) + "\n" + "garbage\n" + json.dumps(_ok("b")) + "\n").encode()
        + b'{"key": "c", "sta'
    )
    ro = RequestStore(path, readonly=True)  # reading only never changes the file
    assert ro.get_ok("b") and ro.torn_bytes > 0 and path.read_bytes().endswith(b'"sta')
    with RequestStore(path) as st:
        assert st.get_ok("a") and st.get_ok("b") and st.get_ok("c") is None and st.skipped_lines == 1
        st.append(_ok("c"))
    text = path.read_text()
    assert text.endswith("\n") and '{"key": "c", "sta' not in text
    assert RequestStore(path, readonly=True).get_ok("c")


def test_one_builder_per_store(tmp_path):
    path = tmp_path / "requests.jsonl"
    with RequestStore(path):
        with pytest.raises(ConfigError, match="another build"):
            RequestStore(path)
        # another process is refused too
        code = f"from ultrafuser.data.store import RequestStore; RequestStore({str(path)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "another build" in proc.stderr
    with RequestStore(path):  # released on close
        pass
