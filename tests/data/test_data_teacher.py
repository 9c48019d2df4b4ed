"""The teacher's retry policy against a real HTTP server on 127.0.0.1 that injects faults (attempts counted
server-side)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from fake_openai_server import fault_from_content

from ultrafuser.config import ConfigError
from ultrafuser.data.prompting import parse_list
from ultrafuser.data.teacher import (
    BudgetExhausted,
    RunAborted,
    SamplingConfig,
    Teacher,
    TeacherConfig,
    TeacherFailure,
    parse_retry_after,
)

SAMPLING = SamplingConfig(temperature=0.0, max_tokens=64)


def _cfg(url: str, **kw) -> TeacherConfig:
    base = dict(
        base_url=url,
        model="fake",
        api_key_env=None,
        concurrency=4,
        timeout_s=5.0,  # generous: a busy CI machine must not turn a slow answer into a timeout
        max_attempts=4,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        retry_after_max_s=5,
    )
    return TeacherConfig(**(base | kw))


def _ask(ft, script: str, case: str, **kw):
    """One completion whose fault script is `script` (e.g. 'http_429,ok'); returns (result or failure, attempts
    seen by the server, the server's log entries)."""
    ft.fault = fault_from_content
    content = f"FAULT:{script};{case}"

    async def go():
        async with Teacher(_cfg(ft.url, **kw.pop("cfg", {}))) as t:
            try:
                return await t.complete([{"role": "user", "content": content}], SAMPLING, **kw)
            except TeacherFailure as f:
                return f

    out = asyncio.run(go())
    log = [e for e in ft.log if e["body"]["messages"][-1]["content"] == content]
    return out, len(log), log


@pytest.mark.parametrize(
    "script, reasons",
    [
        ("http_429,ok", ["http_429"]),
        ("http_500,http_503,ok", ["http_500", "http_503"]),
        ("http_502,http_504,ok", ["http_502", "http_504"]),
        ("midbody_timeout,ok", ["timeout"]),
        ("reset,ok", ["connection_error"]),
        ("cut_body,ok", ["connection_error"]),
        ("truncated_json,ok", ["malformed_response"]),
        ("no_choices,ok", ["malformed_response"]),
        ("http_408,reset,http_429,ok", ["http_408", "connection_error", "http_429"]),
    ],
)
def test_transient_faults_are_retried_until_success(fake_teacher, script, reasons):
    fake_teacher.hang_s = 3.0  # the server stalls mid-body longer than the client waits
    res, seen, _ = _ask(
        fake_teacher, script, "transient", cfg={"timeout_s": 1.0} if "midbody" in script else {}
    )
    assert not isinstance(res, TeacherFailure), res
    assert res.attempts == len(reasons) + 1 == seen
    assert res.errors == reasons
    assert res.content and res.finish_reason == "stop"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(fake_teacher, status):
    res, seen, _ = _ask(fake_teacher, f"http_{status},ok", f"client{status}")
    assert isinstance(res, TeacherFailure)
    assert (res.reason, res.attempts, seen, res.retryable) == (f"http_{status}", 1, 1, False)


def test_attempts_are_bounded_and_the_last_reason_is_reported(fake_teacher):
    res, seen, _ = _ask(fake_teacher, "http_500", "always500")
    assert isinstance(res, TeacherFailure)
    assert (res.reason, res.attempts, seen, res.retryable) == ("http_500", 4, 4, True)
    fake_teacher.hang_s = 3.0
    res, seen, _ = _ask(
        fake_teacher,
        "midbody_timeout,midbody_timeout",
        "alwaystimeout",
        cfg={"max_attempts": 2, "timeout_s": 1.0},
    )
    assert isinstance(res, TeacherFailure) and (res.reason, res.attempts, seen) == ("timeout", 2, 2)


def test_retry_after_is_honoured(fake_teacher):
    res, seen, log = _ask(fake_teacher, "http_429_1,ok", "retryafter")
    assert res.attempts == 2 == seen
    assert log[1]["t"] - log[0]["t"] >= 0.95  # Retry-After: 1 beats the 0.01-0.05 s backoff
    # without the header the backoff is short
    res, seen, log = _ask(fake_teacher, "http_429,ok", "noretryafter")
    assert log[1]["t"] - log[0]["t"] < 0.9


def test_retry_after_is_capped(fake_teacher):
    t0 = time.monotonic()
    res, seen, log = _ask(fake_teacher, "http_503_30,ok", "capped", cfg={"retry_after_max_s": 0.2})
    assert res.attempts == 2 and time.monotonic() - t0 < 5
    assert log[1]["t"] - log[0]["t"] >= 0.18


def test_unparseable_answers_are_retried(fake_teacher):
    res, seen, _ = _ask(fake_teacher, "content:,content:   ,ok", "unparseable", parse=parse_list)
    assert res.errors == ["unparseable_output", "unparseable_output"] and seen == 3
    assert isinstance(res.parsed, list) and res.parsed


def test_concurrency_is_bounded(fake_teacher):
    fake_teacher.delay = 0.3

    async def go():
        async with Teacher(_cfg(fake_teacher.url, concurrency=3, timeout_s=5)) as t:
            await asyncio.gather(
                *(t.complete([{"role": "user", "content": f"q{i}"}], SAMPLING) for i in range(9))
            )

    asyncio.run(go())
    assert fake_teacher.count() == 9 and fake_teacher.max_in_flight == 3


def test_requests_per_minute_spaces_requests(fake_teacher):
    async def go():
        async with Teacher(_cfg(fake_teacher.url, concurrency=8, requests_per_minute=600)) as t:
            await asyncio.gather(
                *(t.complete([{"role": "user", "content": f"r{i}"}], SAMPLING) for i in range(5))
            )

    t0 = time.monotonic()
    asyncio.run(go())
    times = sorted(e["t"] for e in fake_teacher.log)
    assert len(times) == 5
    # 60 / 600 = 0.1 s apart: the 5th request cannot start before 0.4 s (arrival gaps jitter on a busy CPU)
    assert times[-1] - t0 >= 0.4


def test_token_budget_stops_sending(fake_teacher):
    async def go():
        async with Teacher(_cfg(fake_teacher.url, concurrency=1, token_budget=5)) as t:
            out = []
            for i in range(3):
                try:
                    out.append(
                        await t.complete([{"role": "user", "content": f"b{i} with some words"}], SAMPLING)
                    )
                except BudgetExhausted as e:
                    out.append(e)
            return out, t.stats.tokens

    out, tokens = asyncio.run(go())
    assert fake_teacher.count() == 1 and tokens > 5
    assert isinstance(out[1], BudgetExhausted) and isinstance(out[2], BudgetExhausted)


def test_auth_failure_stops_the_run(fake_teacher):
    fake_teacher.fault = lambda info, attempt: "http_401"

    async def go():
        async with Teacher(_cfg(fake_teacher.url, concurrency=1)) as t:
            with pytest.raises(TeacherFailure):
                await t.complete([{"role": "user", "content": "a"}], SAMPLING)
            with pytest.raises(RunAborted, match="API key"):
                await t.complete([{"role": "user", "content": "b"}], SAMPLING)

    asyncio.run(go())
    assert fake_teacher.count() == 1


def test_api_key_is_sent_but_never_logged(fake_teacher, monkeypatch, caplog):
    secret = "sk-uf-SECRET-teacher-7f3a"
    monkeypatch.setenv("UF_TEACHER_KEY", secret)
    # a careless server echoes the Authorization header in its error body: the key must still not be logged
    fake_teacher.fault = lambda info, attempt: "ok" if attempt > 1 else "echo_auth_500"
    caplog.set_level(logging.DEBUG)

    async def go():
        async with Teacher(_cfg(fake_teacher.url, api_key_env="UF_TEACHER_KEY")) as t:
            return await t.complete([{"role": "user", "content": "hello"}], SAMPLING, tag="respond")

    res = asyncio.run(go())
    assert res.attempts == 2
    assert [e["auth"] for e in fake_teacher.log] == [f"Bearer {secret}"] * 2
    assert "bad key Bearer ***" in caplog.text  # the echoed key was redacted
    assert secret not in caplog.text


def test_missing_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("UF_NOT_SET_KEY", raising=False)
    with pytest.raises(ConfigError, match="UF_NOT_SET_KEY"):
        Teacher(TeacherConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="UF_NOT_SET_KEY"))


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
