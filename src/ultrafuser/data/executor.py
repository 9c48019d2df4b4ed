"""Requests of the construction pipeline: identity, resolution from the store, sending, recording.

`Executor.resolve(level, requests)` answers a batch of requests (one pipeline stage): a request whose key has an
`ok` line in the store is answered from it and never sent; the others go to the teacher through a fixed pool
of `concurrency` workers (so memory stays flat however large the stage), and every result - success or
failure with its reason - is appended to the store (fsync'ed) before it is used. A failure is not cached as
done: the next run sends that request again. Once the teacher stops the run (token budget spent; 401/403/404)
the remaining requests are counted as not sent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ultrafuser.data.prompting import parse_list, parse_sub_topics, parse_text
from ultrafuser.data.store import RequestStore, messages_sha256, request_key
from ultrafuser.data.teacher import BudgetExhausted, RunAborted, SamplingConfig, Teacher, TeacherFailure

log = logging.getLogger(__name__)

PARSERS: dict[str, Callable[[str, bool], Any]] = {
    "meta_topics": parse_list,
    "sub_topics": parse_sub_topics,
    "instructions": parse_list,
    "related_strong": parse_list,
    "related_weak": parse_list,
    "complicate": parse_text,
    "simulate_user": parse_text,
}


@dataclass
class Req:
    stage: str
    domain: str
    messages: list[dict[str, str]]
    sampling: SamplingConfig
    prompt_version: str
    key: str


@dataclass
class Outcome:
    entry: dict  # the stored line
    value: Any  # parsed answer (list / dict list / str), or None for `respond`


def make_request(
    stage: str,
    domain: str,
    messages: list[dict[str, str]],
    version: str,
    model: str,
    sampling: SamplingConfig,
    variant: int = 0,
) -> Req:
    key = request_key(stage, messages, version, model, sampling.model_dump(), variant)
    return Req(stage, domain, messages, sampling, version, key)


class Executor:
    """Resolves requests against one store and one teacher; counts what happened for the report."""

    def __init__(
        self,
        store: RequestStore,
        teacher: Teacher,
        model: str,
        concurrency: int,
        echo: Callable[[str], None] = print,
    ):
        self.store, self.teacher, self.model, self.concurrency, self.echo = (
            store,
            teacher,
            model,
            concurrency,
            echo,
        )
        self.failures: Counter[str] = Counter()
        self.not_sent = 0
        self.sent_ok = 0
        self.stopped: str | None = None
        self.levels: list[dict[str, Any]] = []

    @staticmethod
    def parse(req: Req, content: str, finish: str | None) -> Any:
        """The stage's reading of an answer (None for `respond`); ValueError when it cannot be read."""
        p = PARSERS.get(req.stage)
        return p(content, finish == "length") if p else None

    async def send(self, req: Req) -> Outcome | None:
        if self.stopped:
            self.not_sent += 1
            return None
        parser = PARSERS.get(req.stage)
        try:
            res = await self.teacher.complete(req.messages, req.sampling, parse=parser, tag=req.stage)
        except TeacherFailure as f:
            self.store.append(
                {
                    "key": req.key,
                    "stage": req.stage,
                    "domain": req.domain,
                    "status": "failed",
                    "reason": f.reason,
                    "detail": f.detail,
                    "attempts": f.attempts,
                    "errors": f.errors,
                    "retryable": f.retryable,
                    "messages_sha256": messages_sha256(req.messages),
                }
            )
            self.failures[f.reason] += 1
            return None
        except (BudgetExhausted, RunAborted) as e:
            if not self.stopped:
                self.stopped = str(e)
                log.error("stopping: %s", e)
            self.not_sent += 1
            return None
        entry = {
            "key": req.key,
            "stage": req.stage,
            "domain": req.domain,
            "status": "ok",
            "content": res.content,
            "finish_reason": res.finish_reason,
            "usage": res.usage,
            "attempts": res.attempts,
            "errors": res.errors,
            "content_sha256": res.content_sha256,
            "messages_sha256": messages_sha256(req.messages),
            "model": self.model,
            "prompt_version": req.prompt_version,
        }
        self.store.append(entry)
        self.sent_ok += 1
        return Outcome(entry, res.parsed)

    async def resolve(self, level: str, reqs: list[Req]) -> dict[str, Outcome]:
        """Results for the given requests: from the store when there, else sent now (concurrently)."""
        uniq: dict[str, Req] = {}
        for r in reqs:
            uniq.setdefault(r.key, r)
        out: dict[str, Outcome] = {}
        todo: list[Req] = []
        for key, r in uniq.items():
            e = self.store.get_ok(key)
            if e is None:
                todo.append(r)
                continue
            try:
                out[key] = Outcome(e, self.parse(r, e["content"], e.get("finish_reason")))
            except ValueError:
                log.warning("stored %s result %s no longer parses; asking again", r.stage, key[:12])
                self.store.drop_ok(key)
                todo.append(r)
        failed_before = sum(self.failures.values()) + self.not_sent
        if todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=level, unit="req", file=sys.stderr, disable=None, leave=False)
            queue = iter(todo)

            async def worker() -> None:  # a fixed pool of workers: memory stays flat for huge stages
                for r in queue:
                    res = await self.send(r)
                    bar.update(1)
                    if res is not None:
                        out[r.key] = res

            await asyncio.gather(*(worker() for _ in range(min(len(todo), self.concurrency))))
            bar.close()
        failed = sum(self.failures.values()) + self.not_sent - failed_before
        info = {
            "level": level,
            "requests": len(uniq),
            "stored": len(uniq) - len(todo),
            "sent": len(todo) - failed,
            "failed_or_not_sent": failed,
        }
        self.levels.append(info)
        if uniq:
            self.echo(
                f"  {level:<22}{len(uniq):>7} requests: {info['stored']} stored, {info['sent']} new, "
                f"{failed} failed or not sent"
            )
        return out
