"""Stopping on request (SIGTERM) and fault injection for tests.

SIGTERM: the handler only sets a flag. The loop looks at it at the next step boundary, saves a checkpoint
and exits with `EXIT_INTERRUPTED`; `--resume` continues exactly from there.

Fault injection (tests only): the environment variable `ULTRAFUSER_FAULT` holds comma-separated items
`POINT[@STEP]=ACTION`. Points: `accum` (after the first micro-batch's backward of step STEP), `ckpt_write`
(after the first file of checkpoint STEP is written), `stage2_start` (after stage 2 is set up, before its
first step), `loss` (first micro-batch of step STEP), `grad` (gradients of step STEP before the check), `adapter_saved` (the embedded adapter recipe, after its
checkpoint of step STEP).
Actions: `kill` (SIGKILL to this process), `sigterm` (SIGTERM to this process, then continue), `raise`
(RuntimeError), `enospc` (OSError "no space left on device"), `sleep:SECONDS`, `nan` (the caller makes its
value non-finite). Unset in normal runs: `fault()` then costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

FAULT_ENV = "ULTRAFUSER_FAULT"


def fault(point: str, step: int | None = None) -> str | None:
    """Fire the injected fault for `point` (at `step`), if any; returns the action for caller-made ones."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        lhs, _, action = item.strip().partition("=")
        name, _, at = lhs.partition("@")
        if name != point or (at and (step is None or int(at) != step)):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # pragma: no cover - the signal is delivered before this returns
        elif action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "raise":
            raise RuntimeError(f"injected fault at {point} (step {step})")
        elif action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {point}, step {step})")
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        return action
    return None


class StopFlag:
    """SIGTERM sets `requested`; nothing else happens in the handler."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
