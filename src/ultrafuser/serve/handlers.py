"""Engine-agnostic request handlers: body -> validated request -> job rows; job events -> OpenAI responses.

They talk to the engine only through `check_capacity`, `encode`, `prompt_tokens`, `context_lengths`,
`context_length`, `specialist_names`, `domains` and `submit` (see engine.py), and return plain dicts (a
complete response) or an async iterator of SSE `data:` payloads (a stream, ending with "[DONE]"). The routes
(app.py) only read the body, call these and wrap the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from ultrafuser.config import ConfigError
from ultrafuser.data.conversation import Aligned
from ultrafuser.modeling.generation import SamplingParams
from ultrafuser.modeling.templates import validate_messages
from ultrafuser.serve.engine import Job, Row
from ultrafuser.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    bad_request,
    error_body,
    new_id,
    now,
    parse_request,
    usage,
)

# ------------------------------------------------------------------------------------------ the body
_JSON_TOKENS = re.compile(r'[\[\]{}"\\]')


def json_depth(text: str, limit: int) -> int:
    """Nesting depth of arrays/objects in JSON text (strings skipped); stops counting past `limit`."""
    depth = deepest = 0
    in_string = False
    skip = -1
    for m in _JSON_TOKENS.finditer(text):
        pos = m.start()
        if pos <= skip:
            continue
        c = text[pos]
        if in_string:
            if c == "\\":
                skip = pos + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif c in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(obj, path: str = "") -> None:
    """Strings must be encodable as UTF-8 (JSON escapes can smuggle in lone surrogates like \\ud800)."""
    stack = [(obj, path)]
    while stack:
        o, p = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{p or 'body'} contains a lone surrogate (invalid Unicode)", p or None,
                                  "invalid_encoding") from None
        elif isinstance(o, dict):
            for k, v in o.items():
                stack.append((k, p))
                stack.append((v, f"{p}.{k}" if p else str(k)))
        elif isinstance(o, list):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(o))


def check_content_type(content_type: str | None) -> None:
    media, *params = (content_type or "").split(";")
    if media.strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {content_type!r}", "invalid_request_error",
                       None, "unsupported_media_type")
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset" and v.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise APIError(415, f"the body must be UTF-8 encoded JSON, not charset {v.strip()!r}",
                           "invalid_request_error", None, "unsupported_media_type")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", "invalid_request_error", None,
                    "request_too_large")


def parse_json_body(raw: bytes, limits: Limits) -> dict:
    """Bytes -> a JSON object, or a 4xx: size, UTF-8, nesting depth, syntax, top-level type, surrogates."""
    if len(raw) > limits.max_body_bytes:
        raise too_large(limits.max_body_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not valid UTF-8 (byte {e.start})", None, "invalid_encoding") from None
    if json_depth(text, limits.max_json_depth) > limits.max_json_depth:
        raise bad_request(f"the body nests arrays/objects deeper than {limits.max_json_depth} levels", None,
                          "too_deeply_nested")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the body must be a JSON object, not {type(obj).__name__}", None, "invalid_json")
    _check_strings(obj)
    return obj


# ------------------------------------------------------------------------------------------ requests
@dataclass
class Prepared:
    kind: str  # "chat" | "completion"
    req: ChatCompletionRequest | CompletionRequest
    rows: list[Row]
    prompt_tokens: int  # summed over distinct prompts (each counted once, whatever n is)
    model_name: str
    id: str = ""
    created: int = field(default_factory=now)

    @property
    def want_weights(self) -> bool:
        return self.req.return_gate_weights


def _check_limits(req, limits: Limits, choices: int) -> None:
    if choices > limits.max_n:
        param = "n" if choices == req.n else "prompt"
        raise bad_request(f"this request asks for {choices} choices (prompts x n); this server allows at most "
                          f"{limits.max_n}", param)
    stops = req.stop_list()
    if len(stops) > limits.max_stop:
        raise bad_request(f"{len(stops)} stop strings given; at most {limits.max_stop} are allowed", "stop")
    for s in stops:
        if len(s) > limits.max_stop_chars:
            raise bad_request(f"stop string {s[:20]!r}... is {len(s)} characters; at most {limits.max_stop_chars}",
                              "stop")


def _max_new_tokens(engine, prompt: Aligned, requested: int | None, limits: Limits, param: str) -> int:
    """Check the prompt and max_tokens against every specialist's context; the default fills what is left."""
    cap = limits.max_tokens or engine.context_length
    if requested is not None and requested > cap:
        raise bad_request(f"max_tokens={requested} is more than this server allows ({cap})", "max_tokens")
    room = [c - n for c, n in zip(engine.context_lengths, prompt.lengths)]
    k = min(range(len(room)), key=lambda i: room[i])
    name, ctx, n = engine.specialist_names[k], engine.context_lengths[k], prompt.lengths[k]
    if room[k] < 1:
        raise bad_request(f"This model's maximum context length is {ctx} tokens, but the {param} is {n} tokens for "
                          f"specialist {name!r} (each specialist sees the prompt in its own template); shorten it",
                          param, "context_length_exceeded")
    want = min(cap, room[k]) if requested is None else requested
    if want > room[k]:
        raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested {n + want} "
                          f"tokens ({n} in the {param} for specialist {name!r}, {want} in the completion). Please "
                          "reduce the length of the prompt or max_tokens.", param, "context_length_exceeded")
    return want


def _sampling(req, max_new: int, choice: int) -> SamplingParams:
    seed = None if req.seed is None else (req.seed + choice) % (1 << 64)
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=seed, stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos)
    except ConfigError as e:
        raise bad_request(str(e)) from None


def _check_model(req, model_name: str) -> None:
    if req.model != model_name:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves {model_name!r}",
                       "invalid_request_error", "model", "model_not_found")


async def prepare_chat(body: dict, engine, limits: Limits, model_name: str) -> Prepared:
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    _check_model(req, model_name)
    _check_limits(req, limits, req.n)
    if len(req.messages) > limits.max_messages:
        raise bad_request(f"{len(req.messages)} messages; at most {limits.max_messages}", "messages")
    requested = req.requested_max_tokens()
    engine.check_capacity()
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        # A generation prompt must end with the user's turn (the core's encode_prompt would take a conversation
        # ending with an assistant reply as a training example and generate past its end-of-reply token).
        validate_messages(messages, final="user")
        prompt = await run_in_threadpool(engine.encode, messages, True)
    except (ConfigError, ValueError) as e:  # TemplateError: roles, order, a template that fails to render
        raise bad_request(str(e), "messages") from None
    max_new = _max_new_tokens(engine, prompt, requested, limits, "messages")
    rows = [Row(prompt, _sampling(req, max_new, i)) for i in range(req.n)]
    return Prepared("chat", req, rows, engine.prompt_tokens(prompt), model_name, new_id("chatcmpl"))


async def prepare_completion(body: dict, engine, limits: Limits, model_name: str) -> Prepared:
    req: CompletionRequest = parse_request(CompletionRequest, body)
    _check_model(req, model_name)
    texts = req.prompt_list()
    _check_limits(req, limits, len(texts) * req.n)
    requested = req.requested_max_tokens()
    engine.check_capacity()

    def encode_all() -> list[Aligned]:
        return [engine.encode(t, False) for t in texts]

    try:
        prompts = await run_in_threadpool(encode_all)
    except (ConfigError, ValueError) as e:
        raise bad_request(str(e), "prompt") from None
    rows: list[Row] = []
    for i, p in enumerate(prompts):
        if min(p.lengths) == 0:  # nothing to condition on: no specialist can start from an empty context
            where = f"prompt[{i}]" if not isinstance(req.prompt, str) else "prompt"
            raise bad_request(f"{where} is empty after tokenization; give at least one token of text", "prompt")
        max_new = _max_new_tokens(engine, p, requested, limits, "prompt")
        rows += [Row(p, _sampling(req, max_new, i)) for i in range(req.n)]
    return Prepared("completion", req, rows, sum(engine.prompt_tokens(p) for p in prompts), model_name,
                    new_id("cmpl"))


def submit(prep: Prepared, engine) -> Job:
    job = Job(prep.rows, prep.want_weights)
    engine.submit(job)
    return job


# ------------------------------------------------------------------------------------------ responses
def _gate_entry(e, text: str) -> dict:
    return {"token": text, "id": e.token_id, "weights": e.weights}


async def collect(prep: Prepared, job: Job) -> dict:
    """Wait for every row; the complete response."""
    n = len(prep.rows)
    texts, counts, finish = [""] * n, [0] * n, ["length"] * n
    weights: list[list[dict]] = [[] for _ in range(n)]
    async for items in job.steps():
        for i, e, tok_text in items:
            texts[i] += e.text
            if not e.is_eos:
                counts[i] += 1
                if prep.want_weights and tok_text is not None:
                    weights[i].append(_gate_entry(e, tok_text))
            if e.finish_reason:
                finish[i] = e.finish_reason
    choices = []
    for i in range(n):
        if prep.kind == "chat":
            c = {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                 "finish_reason": finish[i]}
        else:
            c = {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
        if prep.want_weights:
            c["gate_weights"] = weights[i]
        choices.append(c)
    return {
        "id": prep.id,
        "object": "chat.completion" if prep.kind == "chat" else "text_completion",
        "created": prep.created,
        "model": prep.model_name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(prep.prompt_tokens, sum(counts)),
    }


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def sse(prep: Prepared, job: Job) -> AsyncIterator[str]:
    """The stream's `data:` payloads: chunks per choice and step, [usage], then "[DONE]"."""
    chat = prep.kind == "chat"
    include_usage = prep.req.stream_options is not None and prep.req.stream_options.include_usage

    def chunk(choices: list[dict], **extra) -> str:
        out = {"id": prep.id, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": prep.created, "model": prep.model_name, "system_fingerprint": None, "choices": choices}
        if include_usage:
            out["usage"] = None
        out.update(extra)
        return _dumps(out)

    def choice(i: int, text: str | None, finish: str | None, gate: list[dict] | None) -> dict:
        if chat:
            c = {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": None,
                 "finish_reason": finish}
        else:
            c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        if gate is not None:
            c["gate_weights"] = gate
        return c

    if chat:
        for i in range(len(prep.rows)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    completion_tokens = 0
    try:
        async for items in job.steps():
            for i, e, tok_text in items:
                gate = None
                if not e.is_eos:
                    completion_tokens += 1
                    if prep.want_weights and tok_text is not None:
                        gate = [_gate_entry(e, tok_text)]
                if e.text or gate:
                    yield chunk([choice(i, e.text, None, gate)])
                if e.finish_reason:
                    yield chunk([choice(i, None, e.finish_reason, [] if prep.want_weights else None)])
    except APIError as e:
        yield _dumps(error_body(e.message, e.type, e.param, e.code))
        yield "[DONE]"
        return
    if include_usage:
        yield chunk([], usage=usage(prep.prompt_tokens, completion_tokens))
    yield "[DONE]"


def models_list(model_name: str, created: int, engine) -> dict:
    from ultrafuser.serve.protocol import model_card

    return {"object": "list", "data": [model_card(model_name, created, engine.domains, engine.context_length)]}
