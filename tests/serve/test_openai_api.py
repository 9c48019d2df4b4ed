"""The official `openai` client against a real server: chat, completions, streaming, stop, usage, gate weights.

Greedy outputs are compared with the core's own `generate()` on the same model, so the server must return
exactly what the library computes (not merely something shaped right).
"""

import json

import httpx
import pytest
from liveserver import MODEL_NAME

from ultrafuser.modeling.generation import SamplingParams, generate

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a function that adds."}]


def library(model, prompt, max_new, use_template=True, stop=(), weights=False):
    enc = model.encode_prompt(prompt, use_template=use_template)
    out = generate(model, [enc], SamplingParams(max_new_tokens=max_new, stop=tuple(stop), ignore_eos=True),
                   return_weights=weights)[0]
    return enc, out


def test_models_list(client, fused_model):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["domains"] == fused_model.domains == ["text", "code", "math"]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_matches_library_and_counts_usage(client, fused_model):
    enc, want = library(fused_model, MSGS, 12)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_NAME
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content == want.text and c.finish_reason == "length"
    resp_k = fused_model.config.response_tokenizer
    assert r.usage.prompt_tokens == enc.lengths[resp_k]  # documented: the response tokenizer's count
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert "gate_weights" not in (c.model_extra or {})  # the extension is off unless asked


def test_max_completion_tokens_and_developer_role(client):
    r = client.chat.completions.create(model=MODEL_NAME, max_completion_tokens=3, temperature=0,
                                       messages=[{"role": "developer", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}],
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_completion_matches_library(client, fused_model):
    texts = ["def add(a, b):", "The quick brown"]
    r = client.completions.create(model=MODEL_NAME, prompt=texts, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    prompt_tokens = 0
    for c, t in zip(r.choices, texts):
        enc, want = library(fused_model, t, 6, use_template=False)
        prompt_tokens += enc.lengths[0]
        assert c.text == want.text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 12


def test_streaming_equals_non_streaming(client):
    kw = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    ctext = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert ctext == client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0).choices[0].text


def test_raw_stream_is_sse_ending_with_done(server):
    body = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, fused_model, stream):
    _, free = library(fused_model, MSGS, 24)
    text = free.text
    stop = next(s for i in range(3, len(text) - 2)
                if (s := text[i : i + 2]).strip() and "\ufffd" not in s and text.find(s) == i)
    want = text[: text.index(stop)]
    kw = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 24, "temperature": 0, "stop": [stop, "\x00never"],
          "extra_body": {"ignore_eos": True}}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        got = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
        assert finish == ["stop"]
    else:
        c = client.chat.completions.create(**kw).choices[0]
        got = c.message.content
        assert c.finish_reason == "stop"
    assert got == want and stop not in got


def test_gate_weights_extension(client, fused_model):
    _, want = library(fused_model, MSGS, 10, weights=True)
    kw = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 10, "temperature": 0,
          "extra_body": {"return_gate_weights": True, "ignore_eos": True}}
    r = client.chat.completions.create(**kw)
    gw = r.choices[0].model_extra["gate_weights"]
    assert len(gw) == r.usage.completion_tokens == 10
    assert [e["id"] for e in gw] == want.token_ids
    tok = fused_model.response_tokenizer
    for e, w in zip(gw, want.weights):
        assert set(e["weights"]) == set(fused_model.domains)
        assert sum(e["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        assert e["weights"] == pytest.approx(w, abs=1e-6)
        assert e["token"] == tok.decode([e["id"]])
    # the gate is not uniform in this model: routing is visible
    assert max(max(e["weights"].values()) for e in gw) > 0.4
    # streamed: each chunk carries its step's tokens; together the same list
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks for e in (ch.choices[0].model_extra or {}).get("gate_weights") or []]
    assert streamed == gw
    # completions too
    c = client.completions.create(model=MODEL_NAME, prompt="x = ", max_tokens=3, temperature=0,
                                  extra_body={"return_gate_weights": True, "ignore_eos": True}).choices[0]
    assert len(c.model_extra["gate_weights"]) == 3


def test_sampling_seed_and_n(client):
    kw = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 7,
          "extra_body": {"ignore_eos": True}}
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b  # seeded: reproducible
    r = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and texts[0] == a  # choice i uses seed + i
    assert len(set(texts)) > 1 and r.usage.completion_tokens == 36
