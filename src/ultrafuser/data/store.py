"""Append-only store of teacher results: what makes a build resumable without duplicates or losses.

One JSON object per line, written with a single `write` and `fsync`ed before the result is used, keyed by
`request_key(stage, messages, prompt version, model, sampling)`. A line is either

    {"key": ..., "stage": ..., "status": "ok", "content": ..., "finish_reason": ..., "usage": {...},
     "attempts": 2, "errors": ["http_503"], "content_sha256": ..., "messages_sha256": ..., "t": ...}
    {"key": ..., "stage": ..., "status": "failed", "reason": "http_500", "detail": ..., "attempts": 5, ...}

An `ok` line is final: that request is never sent again (the last `ok` line of a key wins; there is one
unless a result was dropped because it no longer parses). A `failed` line only records why (and how many
attempts it cost); the request is sent again on the next run. After a SIGKILL the last line may be torn:
opening the store for writing cuts it off (the request it belonged to is simply sent again), and unreadable
lines anywhere are skipped with a warning. An exclusive `flock` on `<store>.lock` keeps two builders off
the same store (the kernel drops it when a process dies, even by SIGKILL).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError

log = logging.getLogger(__name__)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def messages_sha256(messages: list[dict[str, str]]) -> str:
    """Hash of exactly the messages sent (lets a server-side log be matched with the store)."""
    return sha256_text(canonical_json([{"role": m["role"], "content": m["content"]} for m in messages]))


def request_key(
    stage: str,
    messages: list[dict[str, str]],
    prompt_version: str,
    model: str,
    sampling: dict,
    variant: int = 0,
) -> str:
    """The identity of a request. `variant` tells apart repeats of the same prompt (batches of a stage that
    asks the same question several times for more items); 0 leaves it out of the hash."""
    body = {
        "stage": stage,
        "messages": messages,
        "prompt_version": prompt_version,
        "model": model,
        "sampling": sampling,
    }
    if variant:
        body["variant"] = variant
    return sha256_text(canonical_json(body))


class RequestStore:
    """Read (and, unless `readonly`, append to) the store at `path`."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._ok: dict[str, dict] = {}
        self._failed_attempts: dict[str, int] = {}
        self._failures: dict[str, dict] = {}
        self.skipped_lines = 0
        self.torn_bytes = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise ConfigError(
                    f"another build is using the store {str(self.path)!r}; wait for it or use another work_dir"
                ) from None
            self._cut_torn_tail()
        self._load()
        if not readonly:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- reading

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            # find the last newline; everything after it is a torn (partially written) line
            pos, chunk = size, 65536
            last_nl = -1
            while pos > 0 and last_nl < 0:
                start = max(0, pos - chunk)
                f.seek(start)
                buf = f.read(pos - start)
                i = buf.rfind(b"\n")
                if i >= 0:
                    last_nl = start + i
                pos = start
            keep = last_nl + 1
            if keep < size:
                self.torn_bytes = size - keep
                log.warning(
                    "store %s: dropping a torn last line (%d bytes) left by an interrupted run",
                    self.path,
                    size - keep,
                )
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    # torn tail in read-only mode: ignore it
                    self.torn_bytes = len(raw)
                    break
                try:
                    e = json.loads(raw)
                    key, status = e["key"], e["status"]
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
                    log.warning("store %s:%d: unreadable line skipped", self.path, n)
                    continue
                if status == "ok":
                    self._ok[key] = (
                        e  # normally one per key; a later one replaces a result dropped as unusable
                    )
                elif status == "failed":
                    self._failed_attempts[key] = self._failed_attempts.get(key, 0) + int(e.get("attempts", 0))
                    self._failures[key] = e

    def get_ok(self, key: str) -> dict | None:
        return self._ok.get(key)

    def drop_ok(self, key: str) -> None:
        """Forget an ok result for this process (e.g. it no longer parses); a new result will be appended."""
        self._ok.pop(key, None)

    def failed_attempts(self, key: str) -> int:
        """Attempts spent on this key by failed tries (all runs)."""
        return self._failed_attempts.get(key, 0)

    def last_failure(self, key: str) -> dict | None:
        return None if key in self._ok else self._failures.get(key)

    def ok_count_by_stage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self._ok.values():
            out[e.get("stage", "?")] = out.get(e.get("stage", "?"), 0) + 1
        return out

    def pending_failures(self) -> dict[str, dict]:
        return {k: v for k, v in self._failures.items() if k not in self._ok}

    # -- writing

    def append(self, entry: dict) -> None:
        if self._fd is None:
            raise RuntimeError("store opened read-only")
        entry = dict(entry)
        entry.setdefault("t", round(time.time(), 3))
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        while written < len(line):  # a regular file normally takes it in one go
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        if entry["status"] == "ok":
            self._ok[entry["key"]] = entry
        else:
            self._failed_attempts[entry["key"]] = self._failed_attempts.get(entry["key"], 0) + int(
                entry.get("attempts", 0)
            )
            self._failures[entry["key"]] = entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RequestStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
