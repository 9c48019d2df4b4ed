"""Graceful shutdown: SIGTERM under load lets in-flight requests finish, refuses new ones, exits 0, leaves no
child process; the API key never reaches the logs."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from liveserver import MODEL_NAME

KEY = "sk-shutdown-test-secret-4242"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmd.read_bytes():
                out.append(int(cmd.parent.name))
        except OSError:
            continue
    return out


def test_draining_server_answers_503(make_server):
    srv = make_server()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    srv.engine.begin_drain()
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "shutting_down" and r.json()["error"]["type"] == "service_unavailable_error"
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "draining"


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(fused_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UF_SERVE_TEST_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ultrafuser.cli", "serve", str(fused_dir), "--port", "0", "--threads", "1",
           "--api-key-env", "UF_SERVE_TEST_KEY", "--served-model-name", MODEL_NAME, "--graceful-timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"ultrafuser serve: http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(90), "".join(log)
        started = time.monotonic()
        url = f"http://127.0.0.1:{port[0]}"
        auth = {"Authorization": "Bearer " + KEY}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
            time.sleep(0.1)
        print(f"server up {time.monotonic() - started:.1f} s after its first line")
        assert _children(proc.pid) == []  # the server runs in one process (threads only)

        n_tokens = 200
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": n_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[str] = []
        first = threading.Event()

        def consume():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        first.set()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        assert first.wait(60), lines
        proc.send_signal(signal.SIGTERM)
        # a new request is refused: 503 while the socket is still open, then no connection at all
        time.sleep(0.05)
        refused = []
        for _ in range(3):
            try:
                r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1},
                               headers=auth, timeout=10)
                assert r.status_code == 503, r.text
                refused.append(503)
            except httpx.TransportError:
                refused.append("closed")
            time.sleep(0.2)
        assert len(refused) == 3
        t.join(120)
        assert not t.is_alive()
        assert lines and lines[-1] == "data: [DONE]", lines[-3:]
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["length"] and chunks[-1]["usage"]["completion_tokens"] == n_tokens  # finished, not cut
        assert proc.wait(60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(log)
    assert "Waiting for connections to close" in out, out  # the stream was in flight when the signal came
    assert KEY not in out
    assert _procs_mentioning(str(fused_dir)) == []  # nothing left behind
