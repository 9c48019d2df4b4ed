"""The wire format: OpenAI request / response models, the error shape, and the serving limits.

Request models use OpenAI's field names, so the official `openai` client works unchanged.

Unknown-field policy (one policy, everywhere): **unknown fields are rejected** with a 400
`invalid_request_error` whose `param` names the field (`code: "unknown_field"`), at the top level and inside
messages alike, as OpenAI's own API does ("Unrecognized request argument supplied"). A field we silently
ignored would silently change what the caller asked for. Some OpenAI fields are accepted only at the value
that means "off" (`presence_penalty: 0`, `frequency_penalty: 0`, `logprobs: false/null`, `echo: false`,
`suffix: null`, `best_of` = `n`): any other value is a 400 naming the field (`code: "unsupported_value"`).
`user` is accepted and ignored (it is metadata). Types are strict: `"max_tokens": "5"` is a 400, not 5.

Extensions (not in OpenAI's API; pass them from the `openai` client with `extra_body={...}`):

- `return_gate_weights: bool = false` - each choice gets `gate_weights`: one entry per generated token
  (the end-of-reply token excluded; tokens of a stop string that was cut from the text included), in order,
  `{"token": str, "id": int, "weights": {domain: float}}`; the weights are the gate's softmax over the
  specialists that produced the token (they sum to 1). In a stream, each chunk's choice carries the entries
  of the tokens generated in that step (possibly with empty `delta.content` while text is held back for a
  possible stop string or an incomplete UTF-8 character).
- `top_k: int = 0` (0 = off) and `ignore_eos: bool = false`, as in vLLM.

Usage counts: `prompt_tokens` is the prompt's length in the *response tokenizer's* specialist
(`FuseConfig.response_tokenizer`, the first specialist by default) - each specialist sees the prompt in its
own template, so their counts can differ; the context check uses every specialist's own count.
`completion_tokens` counts generated tokens without the end-of-reply token (= `len(gate_weights)`).

Sampling defaults follow OpenAI: `temperature` 1.0, `top_p` 1.0, `n` 1; chat `max_tokens` defaults to the
room left in the context (capped by the server's max-tokens limit), completions to 16. With `seed` and
`n > 1`, choice `i` uses seed `seed + i` (so choices differ but the response is reproducible).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ------------------------------------------------------------------------------------------ limits
# Named defaults; each is a `ultrafuser serve` flag (see serve/cli.py).
DEFAULT_MAX_BATCH = 8  # rows (prompts x n) decoded together in one engine batch
DEFAULT_MAX_QUEUE = 16  # requests waiting for a batch; one more gets 429 at once
DEFAULT_MAX_N = 4  # choices per request (`n`); also the most prompts in one /v1/completions request
DEFAULT_MAX_STOP = 4  # stop strings per request (OpenAI's limit)
DEFAULT_MAX_STOP_CHARS = 64  # characters per stop string
DEFAULT_MAX_MESSAGES = 256  # messages per chat request
DEFAULT_MAX_BODY_BYTES = 1 << 20  # request body (1 MiB); larger: 413
DEFAULT_MAX_JSON_DEPTH = 16  # nesting of arrays / objects in a body; deeper: 400 (our schema needs 4)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # /v1/completions default, as OpenAI's
BODY_READ_TIMEOUT_S = 30.0  # a client that takes longer to send its body gets 408


@dataclass(frozen=True)
class Limits:
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_tokens: int | None = None  # per request; None = the model's context length
    max_n: int | None = None  # None: DEFAULT_MAX_N, or max_batch if smaller
    max_stop: int = DEFAULT_MAX_STOP
    max_stop_chars: int = DEFAULT_MAX_STOP_CHARS
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    context_length: int | None = None  # lower the model's context (never raise it)
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S

    def __post_init__(self):
        from ultrafuser.config import ConfigError

        if self.max_n is None:
            object.__setattr__(self, "max_n", min(DEFAULT_MAX_N, max(self.max_batch, 1)))
        for name in ("max_batch", "max_queue", "max_n", "max_stop", "max_stop_chars", "max_messages",
                     "max_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:  # max_queue too: every request passes through the queue
                raise ConfigError(f"serve limit {name}={getattr(self, name)} must be at least 1")
        for name in ("max_tokens", "context_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"serve limit {name}={v} must be at least 1 (or unset)")
        if not self.body_read_timeout_s > 0:
            raise ConfigError(f"serve limit body_read_timeout_s={self.body_read_timeout_s} must be > 0")
        if self.max_n > self.max_batch:
            raise ConfigError(f"serve limit max_n={self.max_n} exceeds max_batch={self.max_batch}: a request with "
                              "n choices must fit one batch; raise --max-batch or lower --max-n")


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _loc(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (pydantic's union/type tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue
        else:
            out += ("." if out else "") + part
    return out


def from_validation_error(e: ValidationError) -> APIError:
    # the deepest location first: for a union (`str | list[TextPart]`) that is the branch that got furthest
    errs = sorted(e.errors(include_url=False), key=lambda err: -len(err["loc"]))
    first = errs[0]
    param = _loc(first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_field")
    if first["type"] == "missing":
        return bad_request(f"missing required parameter: {param}", param, "missing_required_parameter")
    parts = []
    for err in errs[:3]:
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{_loc(err['loc']) or 'body'}: {msg}")
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return bad_request("invalid request: " + "; ".join(parts) + more, param)


# ------------------------------------------------------------------------------------------ requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _off(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by this server (only {' or '.join(map(repr, allowed))})")
    return value


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # accepted, ignored (metadata)
    # extensions
    return_gate_weights: bool = False
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        return _off(info.field_name, v, (0, 0.0))

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        if v == "" or (isinstance(v, list) and any(s == "" for s in v)):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is read as "system"
    content: str | list[TextPart]
    name: str | None = None  # accepted, not rendered (templates have no slot for it)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        return _off("logprobs", v, (None, False))

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        return _off("top_logprobs", v, (None, 0))

    def requested_max_tokens(self) -> int | None:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise bad_request(f"max_tokens={a} and max_completion_tokens={b} disagree; give one of them",
                              "max_completion_tokens")
        return b if b is not None else a


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        return _off("echo", v, (False,))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _off("suffix", v, (None,))

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        return _off("logprobs", v, (None, 0))

    def prompt_list(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int:
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of={self.best_of} is not supported (only best_of = n)", "best_of",
                              "unsupported_value")
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS


def parse_request(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, domains: list[str], context_length: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ultrafuser",
            "domains": domains, "context_length": context_length}
