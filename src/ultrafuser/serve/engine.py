"""The engine: one background thread owns the fused model and runs the decode loop.

A request becomes a `Job` (its rows: prompt x choice, each with its `SamplingParams`). `submit` puts it in a
bounded FIFO queue, or refuses it at once (429 when the queue is full, 503 while draining). The engine thread
takes the waiting jobs that fit one batch (FIFO; at most `max_batch` rows; and the batch's longest prompt plus
its largest `max_tokens` must fit every specialist's context, because the core's `stream()` decodes a batch
in lock-step over left-padded prompts - a job that would be cut short by its neighbours waits for the next
batch, and the head of the queue always fits), runs `generation.stream()` on it, and hands each step's events
to the jobs' asyncio queues (`loop.call_soon_threadsafe`). New requests wait for the next batch (batch
boundaries, not step boundaries: joining a running batch would mean re-padding every specialist's KV cache).

A job that is cancelled (its client went away) leaves the waiting queue at once, or, if running, has its rows
ended at the next decode step through `stream(..., should_stop=row)` ("abort"). When every row of a batch
is done, the batch ends.

Only the engine thread runs the model. Prompts are tokenised by the request handlers (in a thread pool) under
one lock; the engine thread also decodes per-token text for the gate-weights extension.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ultrafuser.data.conversation import Aligned
from ultrafuser.modeling.generation import SamplingParams, TokenEvent, stream
from ultrafuser.serve.protocol import APIError

log = logging.getLogger("ultrafuser.serve")

_DONE = object()


@dataclass
class Row:
    prompt: Aligned
    params: SamplingParams


def queue_full(max_queue: int) -> APIError:
    return APIError(429, f"the server is busy: {max_queue} requests are already waiting; retry shortly",
                    "rate_limit_error", None, "queue_full", {"Retry-After": "1"})


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and accepts no new requests", "service_unavailable_error",
                    None, "shutting_down")


class Job:
    """One request's rows and the asyncio queue its results arrive on (created on the event loop)."""

    def __init__(self, rows: list[Row], want_weights: bool):
        self.rows = rows
        self.want_weights = want_weights
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._engine: Engine | None = None

    def cancel(self) -> None:
        """The client went away: leave the queue now, or end the rows at the next decode step."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._engine is not None:
            self._engine._discard(self)

    def _post(self, item) -> None:  # engine thread -> event loop
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def steps(self) -> AsyncIterator[list[tuple[int, TokenEvent, str | None]]]:
        """Each decode step's events for this job: (row, event, the token's text when weights were asked)."""
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    def __init__(self, model, *, max_batch: int, max_queue: int, context_length: int | None = None,
                 threads: int | None = None):
        self.model = model
        self.max_batch, self.max_queue, self.threads = max_batch, max_queue, threads
        self.domains: list[str] = list(model.domains)
        self.specialist_names = [s.domain for s in model.specialists]
        self._model_ctx = [s.context_length for s in model.specialists]
        cap = context_length or max(self._model_ctx)
        self.context_lengths = [min(c, cap) for c in self._model_ctx]  # what requests are checked against
        self.context_length = min(self.context_lengths)
        self.response_index = model.config.response_tokenizer
        self._cv = threading.Condition()
        self._tok_lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._active_rows = 0
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.generated_tokens = 0  # all rows, end-of-reply tokens included

    # ------------------------------------------------------------------ request side (event loop / threads)
    def encode(self, prompt: list[dict] | str, use_template: bool) -> Aligned:
        with self._tok_lock:
            return self.model.encode_prompt(prompt, use_template=use_template)

    def prompt_tokens(self, prompt: Aligned) -> int:
        return prompt.lengths[self.response_index]

    def check_capacity(self) -> None:
        """Refuse early (before tokenising) when the request would be refused anyway."""
        with self._cv:
            if self._draining:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:
                raise queue_full(self.max_queue)

    def submit(self, job: Job) -> None:
        if len(job.rows) > self.max_batch:
            raise APIError(400, f"{len(job.rows)} rows do not fit one batch of {self.max_batch}", code="invalid_value")
        with self._cv:
            if self._draining:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:
                raise queue_full(self.max_queue)
            job._engine = self
            self._waiting.append(job)
            self._cv.notify()

    def _discard(self, job: Job) -> None:
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def stats(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": self._active_rows,
                    "running_requests": sum(not j.cancelled for j in self._running), "batches": self.batches,
                    "generated_tokens": self.generated_tokens}

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ultrafuser-engine", daemon=True)
            self._thread.start()

    def begin_drain(self) -> None:
        """Refuse new requests (503); waiting and running ones go on."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float = 30.0) -> None:
        """End the engine: waiting jobs get 503, a running batch ends at its next step, the thread is joined."""
        with self._cv:
            self._draining = self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for job in left:
            job._post(shutting_down())
            job._post(_DONE)
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # per thread (OpenMP): set it in the thread that runs the model
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                self._running = batch
                self._active_rows = sum(len(j.rows) for j in batch)
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._running, self._active_rows = [], 0
                    self.batches += 1

    def _take_batch(self) -> list[Job]:
        """FIFO; skip (keep waiting) jobs that do not fit the rows or the context left by the batch so far."""
        batch: list[Job] = []
        rows, longest, most_new = 0, [0] * len(self._model_ctx), 0
        keep: deque[Job] = deque()
        for job in self._waiting:
            n_longest = [max([longest[k]] + [r.prompt.lengths[k] for r in job.rows]) for k in range(len(longest))]
            n_new = max([most_new] + [r.params.max_new_tokens for r in job.rows])
            fits = all(n_longest[k] + n_new <= c for k, c in enumerate(self._model_ctx))
            if rows + len(job.rows) <= self.max_batch and fits:
                batch.append(job)
                rows, longest, most_new = rows + len(job.rows), n_longest, n_new
            else:
                keep.append(job)
        self._waiting = keep
        return batch

    def _run(self, batch: list[Job]) -> None:
        owners = [(job, i) for job in batch for i in range(len(job.rows))]
        prompts = [r.prompt for job in batch for r in job.rows]
        params = [r.params for job in batch for r in job.rows]
        want = any(job.want_weights for job in batch)
        tok = self.model.response_tokenizer

        def should_stop(b: int) -> bool:
            return owners[b][0].cancelled or self._stopping

        log.debug("batch of %d rows from %d requests", len(owners), len(batch))
        try:
            for events in stream(self.model, prompts, params, return_weights=want, should_stop=should_stop):
                per_job: dict[int, tuple[Job, list]] = {}
                finished = 0
                for e in events:
                    job, i = owners[e.row]
                    text = tok.decode([e.token_id]) if job.want_weights and not e.is_eos else None
                    per_job.setdefault(id(job), (job, []))[1].append((i, e, text))
                    finished += e.finish_reason is not None
                for job, items in per_job.values():
                    if not job.cancelled:
                        job._post(items)
                with self._cv:
                    self._active_rows -= finished
                    self.generated_tokens += len(events)
        except Exception as e:  # a bug or a device error: fail this batch's requests, keep serving
            log.exception("generation failed for a batch of %d rows", len(owners))
            for job in batch:
                job._post(APIError(500, f"generation failed: {type(e).__name__}", "server_error", None,
                                   "internal_error"))
        finally:
            for job in batch:
                job._post(_DONE)
