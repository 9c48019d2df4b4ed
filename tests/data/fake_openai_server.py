"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the data tests.

`FakeTeacher` answers `POST /v1/chat/completions` with deterministic, plausible content per pipeline stage
(read from the `X-Ultrafuser-Stage` header the builder sends): JSON arrays / numbered lists for the topic and
instruction stages, fenced Python for code answers, "The answer is N." for math, and a few planted bad answers
(refusals, cut-off answers, code that does not parse, math without a final answer, near-duplicate
instructions). A `fault(info, attempt)` hook injects HTTP faults; every request is logged server-side.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def messages_sha(messages: list[dict]) -> str:
    # the same formula as ultrafuser.data.store.messages_sha256, written out independently
    blob = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


WORDS = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain cloud forest ocean "
    "signal vector matrix buffer packet socket thread kernel module widget"
).split()


def words_from(h: str, n: int) -> str:
    return " ".join(
        WORDS[int(h[i % 60 : i % 60 + 2], 16) % len(WORDS)] + h[i % 50 : i % 50 + 3] for i in range(n)
    )


def _instruction_in(prompt: str) -> str:
    m = re.search(r"<instruction>\n(.*?)\n</instruction>", prompt, re.S)
    return m.group(1) if m else prompt[:200]


def default_answer(stage: str, messages: list[dict]) -> tuple[str, str]:
    """(content, finish_reason) for a request of `stage`; a pure function of the request."""
    h = messages_sha(messages)
    n = int(h[:8], 16)
    user = messages[-1]["content"]
    if stage == "meta_topics":
        return json.dumps([f"Topic {h[:5]} {i}" for i in range(6)]), "stop"
    if stage == "sub_topics":
        items = [
            {
                "name": f"Sub {h[:5]} {i}",
                "relevance": f"Matters because {h[5:9]}.",
                "example_use": "Daily work.",
            }
            for i in range(6)
        ]
        if n % 2:
            return "```json\n" + json.dumps(items, indent=1) + "\n```", "stop"
        return "\n".join(
            f"{i + 1}. {s['name']} | {s['relevance']} | {s['example_use']}" for i, s in enumerate(items)
        ), "stop"
    if stage == "instructions":
        items = [
            f"Explain {words_from(hashlib.sha256((h + str(i)).encode()).hexdigest(), 24)} with one example."
            for i in range(6)
        ]
        if "mathematics" in user:
            items[1] = items[0] + " Now."  # a planted near-duplicate
            items[2] = items[2] + " (tricky)"  # its answer will state no final answer
        if n % 2:
            return json.dumps(items), "stop"
        return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items)), "stop"
    if stage in ("related_strong", "related_weak"):
        # planted bad items: weakly related ones get answers that fail validation; strongly related math ones
        # get refusals
        marker = " (tricky)" if stage == "related_weak" else " (forbidden)" if "mathematics" in user else ""
        items = [
            f"Describe {words_from(hashlib.sha256((h + str(i)).encode()).hexdigest(), 20)} in detail{marker}."
            for i in range(4)
        ]
        return json.dumps(items), "stop"
    if stage == "complicate":
        return (
            f"In a production setting with strict latency limits: {_instruction_in(user)} Compare two approaches.",
            "stop",
        )
    if stage == "simulate_user":
        return f"ok, and what changes if the input is {h[:6]}?", "stop"
    # respond: domain from the system prompt of the shipped templates, planted faults from the markers above
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    asked = " ".join(m["content"] for m in messages if m["role"] == "user")
    if "(forbidden)" in asked:
        return "I'm sorry, but I can't help with that request.", "stop"
    tricky = "(tricky)" in asked
    if "software engineer" in system:
        if tricky:
            return "Try this:\n\n```python\ndef broken(:\n    pass\n```\n", "stop"
        return (
            f"Here is a solution.\n\n```python\ndef solve_{h[:6]}(x):\n    return x * {n % 97}\n```\n\n"
            f"It scales the input by {n % 97}."
        ), "stop"
    if "mathematician" in system:
        if tricky:
            return f"We add the parts: {n % 50} + {n % 30}. Done.", "stop"
        return f"Step 1: take {n % 50}.\nStep 2: add {n % 30}.\nThe answer is {n % 50 + n % 30}.", "stop"
    if tricky:
        return f"A long answer about {words_from(h, 8)} that was cut", "length"
    return f"Here is an overview: {words_from(h, 30)}.", "stop"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *a):  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802
        ft: FakeTeacher = self.server.fake
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        if not self.path.endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        stage = self.headers.get("X-Ultrafuser-Stage", "")
        msh = messages_sha(body["messages"])
        with ft.lock:
            ft.attempts[msh] += 1
            attempt = ft.attempts[msh]
            info = {
                "stage": stage,
                "sha": msh,
                "t": time.monotonic(),
                "attempt": attempt,
                "auth": self.headers.get("Authorization", ""),
                "body": body,
            }
            ft.log.append(info)
            ft.in_flight += 1
            ft.max_in_flight = max(ft.max_in_flight, ft.in_flight)
        try:
            if ft.delay:
                time.sleep(ft.delay)
            action = ft.fault(info, attempt) if ft.fault else None
            self._act(action, stage, body)
        finally:
            with ft.lock:
                ft.in_flight -= 1

    def _ok_body(self, content: str, finish: str, body: dict) -> bytes:
        prompt_toks = sum(len(m["content"].split()) for m in body["messages"])
        comp = len(content.split())
        return json.dumps(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_toks,
                    "completion_tokens": comp,
                    "total_tokens": prompt_toks + comp,
                },
            }
        ).encode()

    def _act(self, action: str | None, stage: str, body: dict) -> None:
        if action is None or action == "ok":
            content, finish = default_answer(stage, body["messages"])
            self._send(200, self._ok_body(content, finish, body))
        elif action.startswith("http_"):
            status = int(action.split("_")[1])
            headers = {"Retry-After": action.split("_")[2]} if action.count("_") == 2 else None
            self._send(status, json.dumps({"error": {"message": f"injected {status}"}}).encode(), headers)
        elif action == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif action in ("midbody_timeout", "cut_body"):
            full = self._ok_body(*default_answer(stage, body["messages"]), body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(full)))
            self.end_headers()
            self.wfile.write(full[: len(full) // 2])
            self.wfile.flush()
            if action == "midbody_timeout":
                time.sleep(self.server.fake.hang_s)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif action == "truncated_json":
            full = self._ok_body(*default_answer(stage, body["messages"]), body)
            self._send(200, full[: len(full) // 2])
        elif action == "no_choices":
            self._send(200, b'{"id": "chatcmpl-x", "object": "chat.completion"}')
        elif action == "echo_auth_500":  # a careless server that echoes the credentials in its error
            msg = "bad key " + self.headers.get("Authorization", "")
            self._send(500, json.dumps({"error": {"message": msg}}).encode())
        elif action.startswith("content:"):
            self._send(200, self._ok_body(action[len("content:") :], "stop", body))
        else:
            raise AssertionError(f"unknown action {action}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeTeacher"


class FakeTeacher:
    def __init__(self, delay: float = 0.0):
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.attempts: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = delay
        self.hang_s = 2.0
        self.fault = None  # callable(info, attempt) -> action or None
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self) -> int:
        with self.lock:
            return len(self.log)

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.attempts.clear()
            self.max_in_flight = 0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fault_from_content(info: dict, attempt: int) -> str | None:
    """Fault script in the last message: 'FAULT:429,ok' -> attempt 1 gets http 429, attempt 2 ok, later ok."""
    content = info["body"]["messages"][-1]["content"]
    if not content.startswith("FAULT:"):
        return None
    actions = content[len("FAULT:") :].split(";")[0].split(",")
    return actions[min(attempt, len(actions)) - 1]


TEST_KEY_ENV = "UF_DATA_TEST_KEY"


def merge_config(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SMALL_BUILD = {
    "seed": 3,
    "teacher": {
        "model": "fake-teacher",
        "api_key_env": TEST_KEY_ENV,
        "concurrency": 4,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 10,
        "max_attempts": 3,
    },
    "domains": [
        {
            "name": "code",
            "meta_topics": 2,
            "sub_topics_per_meta_topic": 1,
            "instructions_per_sub_topic": 2,
            "multi_turn_share": 0.6,
            "max_extra_turns": 2,
        },
        {
            "name": "math",
            "meta_topics": ["Algebra", "Geometry"],
            "sub_topics_per_meta_topic": 3,
            "sub_topics_used": 1,
            "instructions_per_sub_topic": 3,
            "strong_related": 1,
            "weak_related": 0,
            "complicate_share": 0.0,
        },
    ],
}
