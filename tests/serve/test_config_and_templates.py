"""Limits are named, configurable from the CLI and checked; chat templates cannot run code through the server."""

import httpx
import pytest

from ultrafuser.config import ConfigError
from ultrafuser.serve import protocol as P


def test_limits_defaults_and_checks():
    d = P.Limits()
    assert (d.max_batch, d.max_queue, d.max_n, d.max_stop) == (P.DEFAULT_MAX_BATCH, P.DEFAULT_MAX_QUEUE,
                                                               P.DEFAULT_MAX_N, P.DEFAULT_MAX_STOP)
    assert P.Limits(max_batch=2).max_n == 2  # the default n limit never exceeds a batch
    for bad in ({"max_queue": 0}, {"max_batch": 0}, {"max_body_bytes": 0}, {"max_tokens": 0},
                {"max_batch": 2, "max_n": 3}):
        with pytest.raises(ConfigError):
            P.Limits(**bad)


def test_cli_flags_set_the_limits():
    from ultrafuser.cli import build_parser
    from ultrafuser.serve.cli import limits_from_args

    args = build_parser().parse_args(
        ["serve", "some/dir", "--max-batch", "3", "--max-queue", "5", "--max-tokens", "7", "--max-n", "2",
         "--max-stop", "1", "--max-stop-chars", "9", "--max-messages", "11", "--max-body-bytes", "1000",
         "--max-json-depth", "6", "--context-length", "128", "--api-key-env", "K", "--port", "0",
         "--body-timeout", "2.5"])
    assert limits_from_args(args) == P.Limits(max_batch=3, max_queue=5, max_tokens=7, max_n=2, max_stop=1,
                                              max_stop_chars=9, max_messages=11, max_body_bytes=1000,
                                              max_json_depth=6, context_length=128, body_read_timeout_s=2.5)
    assert args.func.__module__ == "ultrafuser.serve.cli" and args.host == "127.0.0.1"


def test_lowered_context_length_is_enforced(make_server):
    srv = make_server(limits=P.Limits(context_length=40))
    assert srv.health()["status"] == "ok"
    models = httpx.get(srv.url + "/v1/models").json()
    assert models["data"][0]["context_length"] == 40
    body = {"model": "tiny-fused", "prompt": "hello", "max_tokens": 39}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_slow_body_gets_408(make_server):
    import socket

    srv = make_server(limits=P.Limits(body_read_timeout_s=0.5))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b'"request_timeout"' in data


def test_chat_template_cannot_run_code(tiny_dir, tmp_path):
    """A Jinja template that tries to reach `os` when it sees a trigger word: rendered by transformers' sandboxed
    environment, the attempt fails (a 400 for that request), nothing runs, and the server keeps serving."""
    from liveserver import LiveServer

    from ultrafuser.cli import main
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.serve.app import create_app

    marker = tmp_path / "pwned"
    evil = ("{% for message in messages %}{% if message['content'] == 'pwn' %}"
            f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}{{% endif %}}"
            "{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    out = tmp_path / "evil-fused"
    assert main(["fuse", "--specialist", f"text={tiny_dir['text']}", "--specialist", f"code={tiny_dir['code']}",
                 "--template", f"text={evil}", "--gate", "uniform", "--out", str(out)]) == 0
    srv = LiveServer(create_app(FusedModel.from_pretrained(out), model_name="evil", threads=1))
    try:
        url = srv.url + "/v1/chat/completions"
        ok = httpx.post(url, json={"model": "evil", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200
        r = httpx.post(url, json={"model": "evil", "messages": [{"role": "user", "content": "pwn"}], "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "unsafe" in r.json()["error"]["message"] or "security" in r.json()["error"]["message"].lower()
        assert not marker.exists()
        assert srv.health()["status"] == "ok"
    finally:
        srv.close()
