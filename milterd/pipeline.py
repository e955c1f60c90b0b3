"""Run every enabled check on a message concurrently, each within its deadline.

A message costs its slowest check, not the sum. A check that raises, hangs or is skipped still
yields a Finding that says so; nothing here raises into the caller but Overloaded. No check gets
more than the message has left ([milter] message_timeout): a check still running then is
abandoned (its finding says so), and its own I/O ends by the same deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace

from .checks import Check
from .findings import Finding
from .message import Message
from .sanitize import printable

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """No evaluation slot came free before the message's deadline."""


class Pipeline:
    """Shared by all sessions. `max_concurrent` messages are evaluated at once; more wait.

    The thread pool is sized so a started check never queues behind another message's checks,
    which would eat its deadline.
    """

    def __init__(self, checks: Sequence[Check], max_concurrent: int = 100, abandoned=None):
        """`abandoned(check name)` is told of every check the deadline cut off (metrics)."""
        self.checks = tuple(checks)
        self.max_concurrent = max_concurrent
        self._abandoned = abandoned or (lambda name: None)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, max_concurrent * len(self.checks)), thread_name_prefix="check"
        )

    def run(self, message: Message, skip: Mapping[str, str] | None = None) -> dict[str, Finding]:
        """Every check's finding; those named in `skip` are not run, their finding says why (e.g. bypass).

        Overloaded when every slot stays busy until the message's deadline.
        """
        if not self._slots.acquire(timeout=message.time_left(float("inf")) if message.deadline else None):
            raise Overloaded(f"all {self.max_concurrent} evaluation slots busy until message_timeout")
        try:
            return self._run(message, skip or {})
        finally:
            self._slots.release()

    def _run(self, message: Message, skip: Mapping[str, str]) -> dict[str, Finding]:
        started: dict[str, tuple[Check, Future, float]] = {}
        results = {name: c.finding("skipped", detail=skip[name]) for c in self.checks if (name := c.name) in skip}

        def start(check: Check, earlier: Mapping[str, Finding] | None = None) -> None:
            future = self._pool.submit(_guarded, check, message, earlier or {})
            started[check.name] = (check, future, time.monotonic())

        def collect(name: str) -> Finding:
            if name not in results:
                check, future, t0 = started.pop(name)
                own = max(0.0, t0 + check.timeout - time.monotonic())
                try:
                    results[name] = future.result(timeout=message.time_left(own))
                except FutureTimeout:
                    elapsed = time.monotonic() - t0
                    if message.time_left(own) < own:  # the message's deadline, not the check's own
                        self._abandoned(name)
                        detail = f"abandoned at message_timeout after {elapsed:.1f}s"
                    else:
                        detail = f"no answer in {check.timeout:g}s"
                    results[name] = check.finding("timeout", detail=detail, elapsed=elapsed)
            return results[name]

        for check in self.checks:
            if not check.after and check.name not in skip:
                start(check)
        for check in (c for c in self.checks if c.after and c.name not in skip):
            earlier = {name: collect(name) for name in check.after if name in started or name in results}
            reason = check.skip_reason(message, earlier)
            if reason:
                results[check.name] = check.finding("skipped", detail=reason)
            else:
                start(check, earlier)
        for name in list(started):
            collect(name)
        return {check.name: results[check.name] for check in self.checks}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _guarded(check: Check, message: Message, earlier: Mapping[str, Finding]) -> Finding:
    t0 = time.monotonic()
    try:
        finding = check.run_after(message, earlier)
    except Exception as e:  # a bug in a check must not lose the message: it becomes a failed check
        log.error(
            "check %s failed: %s",
            check.name,
            printable(f"{type(e).__name__}: {e}"),
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        finding = check.finding("error", detail=printable(f"{type(e).__name__}: {e}"))
    return replace(finding, elapsed=time.monotonic() - t0)
