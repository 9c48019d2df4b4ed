"""Bad input gets its documented 4xx in OpenAI's error shape, never a 5xx; a property-based fuzzer agrees."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from liveserver import MODEL_NAME

from ultrafuser.serve.protocol import Limits

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
LIMITS = Limits(max_tokens=8, max_queue=64, max_body_bytes=64 * 1024, max_n=2)
OK_MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def srv(fused_model):
    from liveserver import LiveServer

    from ultrafuser.serve.app import create_app

    s = LiveServer(create_app(fused_model, model_name=MODEL_NAME, limits=LIMITS, threads=1))
    s.http = httpx.Client(base_url=s.url, timeout=30)
    yield s
    s.http.close()
    s.close()


def chat(**kw):
    return {"model": MODEL_NAME, "messages": OK_MSGS, "max_tokens": 2, **kw}


def comp(**kw):
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **kw}


J = "application/json"
# (id, path, body (dict -> JSON, bytes -> raw), content type, status, code, param)
CASES = [
    ("max_tokens=0", CHAT, chat(max_tokens=0), J, 400, "invalid_value", "max_tokens"),
    ("max_tokens<0", COMP, comp(max_tokens=-5), J, 400, "invalid_value", "max_tokens"),
    ("max_tokens over limit", CHAT, chat(max_tokens=9), J, 400, "invalid_value", "max_tokens"),
    ("max_tokens string", CHAT, chat(max_tokens="2"), J, 400, "invalid_value", "max_tokens"),
    ("max_tokens vs max_completion_tokens", CHAT, chat(max_completion_tokens=3), J, 400, "invalid_value",
     "max_completion_tokens"),
    ("empty prompt", COMP, comp(prompt=""), J, 400, "invalid_value", "prompt"),
    ("empty prompt in a list", COMP, comp(prompt=["hi", ""]), J, 400, "invalid_value", "prompt"),
    ("prompt past the context", COMP, comp(prompt="hello world " * 200), J, 400, "context_length_exceeded", "prompt"),
    ("messages past the context", CHAT, chat(messages=[{"role": "user", "content": "x y " * 300}]), J, 400,
     "context_length_exceeded", "messages"),
    ("temperature<0", CHAT, chat(temperature=-0.1), J, 400, "invalid_value", "temperature"),
    ("temperature>2", COMP, comp(temperature=2.5), J, 400, "invalid_value", "temperature"),
    ("temperature huge", COMP, b'{"model": "tiny-fused", "prompt": "x", "temperature": 1e999}', J, 400,
     "invalid_value", "temperature"),
    ("top_p=0", CHAT, chat(top_p=0), J, 400, "invalid_value", "top_p"),
    ("top_p>1", CHAT, chat(top_p=1.5), J, 400, "invalid_value", "top_p"),
    ("top_k<0", CHAT, chat(top_k=-1), J, 400, "invalid_value", "top_k"),
    ("n=0", CHAT, chat(n=0), J, 400, "invalid_value", "n"),
    ("n over limit", CHAT, chat(n=3), J, 400, "invalid_value", "n"),
    ("prompts x n over limit", COMP, comp(prompt=["a", "b"], n=2), J, 400, "invalid_value", "prompt"),
    ("too many stops", CHAT, chat(stop=["a", "b", "c", "d", "e"]), J, 400, "invalid_value", "stop"),
    ("stop too long", CHAT, chat(stop="x" * 65), J, 400, "invalid_value", "stop"),
    ("empty stop", CHAT, chat(stop=[""]), J, 400, "invalid_value", "stop"),
    ("stop wrong type", CHAT, chat(stop=5), J, 400, "invalid_value", "stop"),
    ("seed out of range", CHAT, chat(seed=2**70), J, 400, "invalid_value", "seed"),
    ("empty messages", CHAT, chat(messages=[]), J, 400, "invalid_value", "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), J, 400, "invalid_value", "messages"),
    ("missing messages", CHAT, {"model": MODEL_NAME}, J, 400, "missing_required_parameter", "messages"),
    ("missing model", CHAT, {"messages": OK_MSGS}, J, 400, "missing_required_parameter", "model"),
    ("bad role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), J, 400, "invalid_value",
     "messages[0].role"),
    ("tool role", CHAT, chat(messages=[{"role": "tool", "content": "hi"}]), J, 400, "invalid_value",
     "messages[0].role"),
    ("content null", CHAT, chat(messages=[{"role": "user", "content": None}]), J, 400, "invalid_value",
     "messages[0].content"),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), J,
     400, "invalid_value", "messages[0].content[0].type"),
    ("ends with assistant", CHAT, chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     J, 400, "invalid_value", "messages"),
    ("two users in a row", CHAT, chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     J, 400, "invalid_value", "messages"),
    ("system only", CHAT, chat(messages=[{"role": "system", "content": "a"}]), J, 400, "invalid_value", "messages"),
    ("unknown top-level field", CHAT, chat(frobnicate=True), J, 400, "unknown_field", "frobnicate"),
    ("unknown message field", CHAT, chat(messages=[{"role": "user", "content": "a", "x": 1}]), J, 400,
     "unknown_field", "messages[0].x"),
    ("tools unsupported", CHAT, chat(tools=[]), J, 400, "unknown_field", "tools"),
    ("penalty unsupported", CHAT, chat(presence_penalty=0.5), J, 400, "invalid_value", "presence_penalty"),
    ("logprobs unsupported", CHAT, chat(logprobs=True), J, 400, "invalid_value", "logprobs"),
    ("echo unsupported", COMP, comp(echo=True), J, 400, "invalid_value", "echo"),
    ("token-id prompt", COMP, comp(prompt=[1, 2, 3]), J, 400, "invalid_value", "prompt[0]"),
    ("empty prompt list", COMP, comp(prompt=[]), J, 400, "invalid_value", "prompt"),
    ("wrong model", CHAT, chat(model="gpt-4"), J, 404, "model_not_found", "model"),
    ("malformed JSON", CHAT, b'{"model": "tiny-fused", "messages": [', J, 400, "invalid_json", None),
    ("trailing garbage", CHAT, b'{"model": "tiny-fused"} x', J, 400, "invalid_json", None),
    ("NaN", CHAT, b'{"model": "tiny-fused", "messages": [], "temperature": NaN}', J, 400, "invalid_json", None),
    ("JSON array body", CHAT, b"[1, 2]", J, 400, "invalid_json", None),
    ("empty body", CHAT, b"", J, 400, "invalid_json", None),
    ("no content type", CHAT, json.dumps(chat()).encode(), None, 415, "unsupported_media_type", None),
    ("text/plain", CHAT, json.dumps(chat()).encode(), "text/plain", 415, "unsupported_media_type", None),
    ("form", COMP, b"model=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type", None),
    ("latin-1 charset", CHAT, json.dumps(chat()).encode(), "application/json; charset=latin-1", 415,
     "unsupported_media_type", None),
    ("oversized body", CHAT, json.dumps(chat(messages=[{"role": "user", "content": "a" * 70_000}])).encode(), J,
     413, "request_too_large", None),
    ("deep nesting", CHAT, b'{"model": "tiny-fused", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", J, 400,
     "too_deeply_nested", None),
    ("deep nesting, unclosed", COMP, b'{"a":' * 100_00, J, 400, "too_deeply_nested", None),
    ("invalid UTF-8", CHAT, b'{"model": "tiny-fused", "messages": [{"role": "user", "content": "\xff\xfe"}]}', J, 400,
     "invalid_encoding", None),
    ("lone surrogate", CHAT, b'{"model": "tiny-fused", "messages": [{"role": "user", "content": "\\ud800"}]}', J, 400,
     "invalid_encoding", "messages[0].content"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_table(srv, case):
    _, path, body, ctype, status, code, param = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {} if ctype is None else {"content-type": ctype}
    r = srv.http.post(path, content=raw, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code, err
    assert err["param"] == param, err


def test_routing_errors_have_openai_shape(srv):
    r = httpx.get(srv.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.put(srv.url + CHAT, json=chat())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(srv.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chunked_oversized_body_refused(srv):
    def gen():  # no Content-Length: the server must count while reading
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(srv.url + CHAT, content=gen(), headers={"content-type": J}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_ok_requests_still_work_after_the_table(srv):
    r = httpx.post(srv.url + CHAT, json=chat(), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert srv.health()["status"] == "ok"


# ------------------------------------------------------------------------------------------ fuzzing
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
valid_message = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=40)})
message = valid_message | st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]) | junk},
    optional={"content": st.text(max_size=40) | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                  "text": st.text(max_size=10)}),
                                                         max_size=2) | junk,
              "name": st.text(max_size=5)},
)
common = {
    "max_tokens": st.integers(-2, 12) | junk,
    "temperature": st.floats(-1, 3, allow_nan=False) | junk,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False) | junk,
    "top_k": st.integers(-1, 50),
    "n": st.integers(-1, 4),
    "seed": st.integers(-(2**65), 2**65),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=70), max_size=6) | junk,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
    "return_gate_weights": st.booleans(),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.sampled_from([0, 0.0, 1]),
    "user": st.text(max_size=5),
}
chat_body = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL_NAME, MODEL_NAME, "other"]), "messages": st.lists(message, max_size=4) | junk},
    optional={**common, "max_completion_tokens": st.integers(-1, 10)},
)
comp_body = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL_NAME, MODEL_NAME, "other"]), "prompt": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=3) | junk},
    optional={**common, "echo": st.booleans(), "best_of": junk},
)
# in range: these run the engine (sampling, stop strings, streams, gate weights, n)
in_range = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 400),
    "n": st.integers(1, 2),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "return_gate_weights": st.booleans(),
    "ignore_eos": st.booleans(),
}
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL_NAME), "messages": st.lists(valid_message, min_size=1, max_size=1)}, optional=in_range)
valid_comp = st.fixed_dictionaries(
    {"model": st.just(MODEL_NAME), "prompt": st.text(max_size=40) | st.lists(st.text(max_size=8), min_size=1,
                                                                             max_size=1)}, optional=in_range)
extra_keys = st.dictionaries(st.text(min_size=1, max_size=6), junk, max_size=2)


def _check(r: httpx.Response) -> None:
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in r.text
    else:
        assert r.json()["choices"]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=st.one_of(chat_body.map(lambda b: (CHAT, b)), comp_body.map(lambda b: (COMP, b)),
                      valid_chat.map(lambda b: (CHAT, b)), valid_comp.map(lambda b: (COMP, b))),
       extra=extra_keys, drop_extra=st.booleans())
def test_fuzz_request_bodies_never_5xx(srv, body, extra, drop_extra):
    path, b = body
    if not drop_extra and extra:  # unknown fields: always a 400 (documented policy)
        b = {**extra, **b}
    _check(srv.http.post(path, json=b))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       path=st.sampled_from([CHAT, COMP, "/v1/models", "/health"]),
       ctype=st.sampled_from([J, "application/json; charset=utf-8", "text/plain", "", "application/JSON"]))
def test_fuzz_raw_bytes_never_5xx(srv, raw, path, ctype):
    r = srv.http.post(path, content=raw, headers={"content-type": ctype})
    assert r.status_code < 500 and r.status_code != 200, r.text
