"""The teacher: any OpenAI-compatible chat-completions endpoint, through the official `openai` client.

Policy (ours, not the client's: the client runs with `max_retries=0`):

- bounded concurrency (a semaphore around a request and its retries), a requests-per-minute limit (requests are
  spaced 60/rpm seconds apart, retries included) and a token budget (no request is sent once the tokens
  reported by the server reach it; requests already in flight may overshoot it);
- a per-attempt timeout (the client's httpx timeout and a total wall-clock bound);
- retried, with capped exponential backoff and equal jitter (`d = min(max, initial * 2**(n-1))`, sleep
  `d/2 + U(0, d/2)`), never less than a `Retry-After` / `retry-after-ms` header (capped at
  `retry_after_max_s`): 408, 409, 425, 429, 5xx, timeouts, connection errors (resets, bodies cut short),
  malformed response bodies (not JSON, or no `choices[0].message`), and answers the stage cannot parse;
- not retried: every other 4xx (400, 401, 403, 404, 422 ...). 401, 403 and 404 also stop the run: with a
  wrong key, model or URL every further request would fail the same way;
- at most `max_attempts` attempts; what still fails raises `TeacherFailure` with a reason code
  (`http_429`, `http_500`, `timeout`, `connection_error`, `malformed_response`, `unparseable_output`, ...).

The API key is read from the environment variable named in the config, handed to the client and never
stored, printed or logged; error details are redacted of it before they are logged or recorded. Each request
carries an `X-Ultrafuser-Stage: <stage>` header (for server-side accounting and tests); OpenAI-compatible
servers ignore unknown headers.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from ultrafuser.config import ConfigError

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherConfig(_Frozen):
    """Where the teacher lives and how hard we may push it."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var holding the key; null: no key needed
    concurrency: int = Field(8, ge=1, le=1024)
    requests_per_minute: float | None = Field(None, gt=0)
    token_budget: int | None = Field(None, ge=1)  # total tokens (prompt + completion) this run may use
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    retry_after_max_s: float = Field(300.0, ge=0)


class SamplingConfig(_Frozen):
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1)
    seed: int | None = None  # passed to the API when set (best-effort determinism on the server side)


def safe_url(url: str) -> str:
    """The URL without user:password@ and without query string (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class TeacherResult:
    content: str
    finish_reason: str | None
    usage: dict[str, int]
    attempts: int
    errors: list[str]  # reason codes of the failed attempts before the success
    parsed: Any = None

    @property
    def content_sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


class TeacherFailure(Exception):
    def __init__(self, reason: str, detail: str, attempts: int, errors: list[str], retryable: bool):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts
        self.errors = errors
        self.retryable = retryable


class BudgetExhausted(Exception):
    """The token budget is spent: the request was not sent."""


class RunAborted(Exception):
    """An earlier request failed in a way every request will (401/403/404): the request was not sent."""


class _Attempt(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` (seconds or an HTTP date); None if absent/bad."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _RateLimiter:
    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class TeacherStats:
    requests: int = 0  # HTTP attempts sent
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def resolve_api_key(cfg: TeacherConfig) -> str:
    if cfg.api_key_env is None:
        return "not-needed"
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(
            f"teacher.api_key_env: environment variable {cfg.api_key_env!r} is not set; export it with the API key"
            " (or set api_key_env: null for a local server without keys)"
        )
    return key


class Teacher:
    """Async client for one teacher endpoint. Use as `async with Teacher(cfg) as t: await t.complete(...)`."""

    def __init__(self, cfg: TeacherConfig, *, api_key: str | None = None, rng: random.Random | None = None):
        from openai import AsyncOpenAI

        self.cfg = cfg
        key = api_key if api_key is not None else resolve_api_key(cfg)
        self._secret = key if len(key) >= 4 else None
        self._client = AsyncOpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout_s)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._rate = _RateLimiter(cfg.requests_per_minute)
        self._rng = rng or random.Random()  # jitter only: timing, never content
        self.stats = TeacherStats()
        self.aborted: str | None = None

    async def __aenter__(self) -> "Teacher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.close()

    def redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * (2 ** (attempt - 1)))
        delay = d / 2 + self._rng.uniform(0, d / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.retry_after_max_s))
        return delay

    async def complete(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingConfig,
        *,
        parse: Callable[[str, bool], Any] | None = None,
        tag: str = "",
    ) -> TeacherResult:
        """One chat completion with our retry policy. `parse(content, truncated)` may raise ValueError to mark
        the answer unusable (retried as `unparseable_output`); its value is returned in `.parsed`."""
        errors: list[str] = []
        async with self._sem:
            for attempt in range(1, self.cfg.max_attempts + 1):
                if self.aborted:
                    raise RunAborted(self.aborted)
                if self.cfg.token_budget is not None and self.stats.tokens >= self.cfg.token_budget:
                    raise BudgetExhausted(
                        f"token budget {self.cfg.token_budget} spent ({self.stats.tokens} used)"
                    )
                await self._rate.acquire()
                try:
                    content, finish, usage = await self._attempt(messages, sampling, tag)
                    parsed = None
                    if parse is not None:
                        try:
                            parsed = parse(content, finish == "length")
                        except ValueError as e:
                            raise _Attempt("unparseable_output", str(e), True) from None
                    return TeacherResult(content, finish, usage, attempt, errors, parsed)
                except _Attempt as a:
                    detail = self.redact(a.detail)[:300]
                    errors.append(a.reason)
                    self.stats.errors[a.reason] = self.stats.errors.get(a.reason, 0) + 1
                    if not a.retryable or attempt == self.cfg.max_attempts:
                        if a.reason in {f"http_{s}" for s in FATAL_STATUS}:
                            self.aborted = (
                                f"{a.reason} from the teacher ({detail}); check base_url, model and API key"
                            )
                        log.debug("%s: giving up after attempt %d: %s (%s)", tag, attempt, a.reason, detail)
                        raise TeacherFailure(a.reason, detail, attempt, errors, a.retryable) from None
                    delay = self.backoff_delay(attempt, a.retry_after)
                    log.debug(
                        "%s: attempt %d failed: %s (%s); retrying in %.2fs",
                        tag,
                        attempt,
                        a.reason,
                        detail,
                        delay,
                    )
                    await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(
        self, messages: list[dict[str, str]], sampling: SamplingConfig, tag: str
    ) -> tuple[str, str | None, dict[str, int]]:
        import openai

        kwargs: dict[str, Any] = dict(
            model=self.cfg.model,
            messages=messages,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
        )
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        if tag:
            kwargs["extra_headers"] = {"X-Ultrafuser-Stage": tag}
        self.stats.requests += 1
        try:
            raw = await asyncio.wait_for(
                self._client.chat.completions.with_raw_response.create(**kwargs), timeout=self.cfg.timeout_s
            )
            body = raw.text
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Attempt("timeout", f"no complete answer within {self.cfg.timeout_s}s", True) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            raise _Attempt(
                "connection_error", f"{type(cause).__name__ if cause else 'error'}: {e}", True
            ) from None
        except openai.APIStatusError as e:
            status = e.status_code
            retryable = status in RETRYABLE_STATUS or status >= 500
            body_text = ""
            try:
                body_text = e.response.text[:200]
            except Exception:  # noqa: BLE001 - the body may be unreadable; the status says enough
                pass
            raise _Attempt(
                f"http_{status}", body_text or str(e), retryable, parse_retry_after(e.response.headers)
            ) from None
        except openai.OpenAIError as e:  # anything else the client raises about the response
            raise _Attempt("malformed_response", f"{type(e).__name__}: {e}", True) from None
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
            finish = choice.get("finish_reason")
            if content is None and finish is None:
                raise KeyError("message.content")
            if content is not None and not isinstance(content, str):
                raise TypeError("message.content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Attempt(
                "malformed_response", f"{type(e).__name__}: {str(e)[:100]} in {body[:120]!r}", True
            ) from None
        usage_raw = data.get("usage") or {}
        usage = {
            k: int(usage_raw[k])
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            if isinstance(usage_raw.get(k), (int, float))
        }
        self.stats.tokens += usage.get(
            "total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        )
        return content or "", finish, usage
