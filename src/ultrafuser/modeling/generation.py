"""Generation with a fused model: batched prompts, greedy or sampling, stop tokens/strings, streaming.

One KV cache per specialist; each step runs every specialist on the new token, fuses the logits with the
gate, picks the next token and appends it to every specialist. Sampling uses transformers' logits
warpers (temperature, top-k, top-p); each prompt has its own seeded generator, so a prompt's sample does
not depend on what else is in the batch. `stream()` yields per-step events with text deltas (held back
while they could still turn into a stop string or an incomplete UTF-8 character) and, on request, the
gate weights that produced each token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ultrafuser.config import ConfigError
from ultrafuser.data.conversation import Aligned


class PromptTooLongError(ConfigError):
    pass


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): logits ÷ 5e-324 overflow to inf and softmax to NaN,
# and as the temperature goes to 0 sampling becomes the argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 disables it)")


@dataclass
class TokenEvent:
    row: int  # which prompt of the batch
    token_id: int
    text: str  # text released by this step (may be empty while held back, or hold several tokens' text)
    weights: dict[str, float] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the row is done
    is_eos: bool = False  # the token is an end-of-reply token: it ends the row and is not part of the text


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: list[int]  # per specialist
    weights: list[dict[str, float]] = field(default_factory=list)  # per generated token, when asked


class _Row:
    """Incremental detokenisation and stop-string handling for one prompt."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already emitted
        self.text = ""
        self.done = False
        self.finish_reason: str | None = None

    def push(self, token_id: int, is_stop_token: bool) -> str:
        if is_stop_token:
            self.done, self.finish_reason = True, "stop"
            return self._release(final=True)
        self.ids.append(token_id)
        self.text = self.tok.decode(self.ids, skip_special_tokens=False)
        for s in self.stop:
            i = self.text.find(s)
            if i != -1:
                self.text = self.text[:i]
                self.done, self.finish_reason = True, "stop"
                return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its rest
                end = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that could still become a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:n]):
                        end -= n
                        break
        end = max(end, self.released)
        out = self.text[self.released : end]
        self.released = end
        return out

    def finish(self, reason: str) -> str:
        self.done, self.finish_reason = True, reason
        return self._release(final=True)


def _pick(logits: torch.Tensor, params: Sequence[SamplingParams], gens: list) -> torch.Tensor:
    """logits (B, V) fp32 -> next token ids (B,)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = torch.empty(logits.size(0), dtype=torch.long)
    for b, p in enumerate(params):
        row = logits[b : b + 1]  # (1, V)
        if p.temperature == 0:
            out[b] = int(row.argmax(-1))
            continue
        row = TemperatureLogitsWarper(p.temperature)(None, row)
        if p.top_k > 0:
            row = TopKLogitsWarper(p.top_k)(None, row)
        if p.top_p < 1.0:
            row = TopPLogitsWarper(p.top_p)(None, row)
        probs = torch.softmax(row.float().cpu(), dim=-1)
        out[b] = int(torch.multinomial(probs, 1, generator=gens[b]))
    return out


def prepare_rows(model, prompts: Sequence[Aligned], params) -> tuple[list, list, list, list[int]]:
    """What every decoding path sets up the same way: one SamplingParams, detokeniser and seeded generator per
    row, the context check, and how many tokens each row may produce (its max_new_tokens, within every
    specialist's context; positions are per row, so left padding does not count)."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError("one SamplingParams per prompt, or one for all")
    for p in prompts:
        for s, n in zip(model.specialists, p.lengths):
            if n >= s.context_length:
                raise PromptTooLongError(
                    f"the prompt is {n} tokens for specialist {s.domain!r}, whose context is {s.context_length}; "
                    "shorten it (the fused context is the smallest specialist's)"
                )
    tok = model.response_tokenizer
    rows = [_Row(tok, p.stop) for p in plist]
    gens = []
    for p in plist:
        g = torch.Generator()
        g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
        gens.append(g)
    return plist, rows, gens, row_limits(model, prompts, plist)


def row_limits(model, prompts: Sequence[Aligned], plist: Sequence[SamplingParams]) -> list[int]:
    """Tokens each row may produce: its max_new_tokens, and it also stops ("length") when its prompt + reply
    fills any specialist's context. Positions are per row (left padding does not count)."""
    room = [min(s.context_length - p.lengths[k] for k, s in enumerate(model.specialists)) for p in prompts]
    return [min(p.max_new_tokens, r) for p, r in zip(plist, room)]


def stream(
    model,
    prompts: Sequence[Aligned],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    return_weights: bool = False,
    should_stop=None,
    fast: bool | None = None,
) -> Iterator[list[TokenEvent]]:
    """Generate for a batch of encoded prompts (see `FusedModel.encode_prompt`); yield each step's events.

    `should_stop(row) -> bool` lets a caller (e.g. a server whose client went away) end a row early.
    `fast`: None (default) decodes through `modeling.fast` (static caches, specialists batched, CUDA graphs)
    where it supports the model and request and through the straightforward path below otherwise; False always
    takes the straightforward path (the reference); True insists on the fast path (`Unsupported` otherwise).
    Both give the same greedy tokens (fp32; tested) and the same seeded samples on the CPU.
    """
    if fast is not False:
        from ultrafuser.modeling import fast as fast_path

        it = fast_path.maybe_stream(model, prompts, params, return_weights=return_weights, should_stop=should_stop)
        if it is not None:
            return it
        if fast:
            raise fast_path.Unsupported(
                "the fast path does not support this model or request: "
                f"{model.__dict__.get(fast_path._NO) or 'batch or length beyond its buffers'}"
            )
    return _reference_stream(model, prompts, params, return_weights=return_weights, should_stop=should_stop)


def _reference_stream(model, prompts, params, *, return_weights: bool, should_stop) -> Iterator[list[TokenEvent]]:
    plist, rows, gens, row_limit = prepare_rows(model, prompts, params)
    limit = max(row_limit)
    domains = model.domains

    state = model.start_decoding(prompts)
    for step in range(limit):
        next_ids = _pick(state.logits, plist, gens)  # (B,)
        events = []
        for b, row in enumerate(rows):
            if row.done:
                continue
            tid = int(next_ids[b])
            is_stop = tid in model.stop_token_ids and not plist[b].ignore_eos
            w = {d: float(state.weights[b, k]) for k, d in enumerate(domains)} if return_weights else None
            text = row.push(tid, is_stop)
            if not row.done and len(row.ids) >= row_limit[b]:
                text += row.finish("length")
            if not row.done and should_stop is not None and should_stop(b):
                text += row.finish("abort")
            events.append(TokenEvent(b, tid, text, w, row.finish_reason if row.done else None, is_stop))
        if events:
            yield events
        if all(r.done for r in rows):
            return
        state = model.decode_step(state, next_ids)


def generate(
    model,
    prompts: Sequence[Aligned],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    return_weights: bool = False,
    fast: bool | None = None,
) -> list[Completion]:
    return collect(stream(model, prompts, params, return_weights=return_weights, fast=fast), prompts)


def collect(events_iter, prompts: Sequence[Aligned]) -> list[Completion]:
    """Gather a stream's per-step events into one `Completion` per prompt."""
    out = [Completion("", [], "length", p.input_ids) for p in prompts]
    for events in events_iter:
        for e in events:
            c = out[e.row]
            c.text += e.text
            if not e.is_eos:
                c.token_ids.append(e.token_id)
            if e.weights is not None:
                c.weights.append(e.weights)
            if e.finish_reason:
                c.finish_reason = e.finish_reason
    return out
