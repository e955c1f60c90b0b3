"""What `milterd scan` tells an admin besides each message: a progress bar, which messages are
listed, the details said once instead of on every message, and the summary at the end.

Nothing here holds a message: the tally keeps counts, the per-check times and a bounded list of
blocked messages, so a scan's memory does not grow with the mbox.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from . import report
from .engine import Disposition
from .policy import Category

MAX_JOBS = 8  # scan's default --jobs at most: see default_jobs
HOLD = 100  # rows held back while the details said of every message are not yet known
NAMED = 20  # blocked messages the summary names


def default_jobs(max_concurrent: int) -> int:
    """Messages scanned at once when --jobs is not given: the daemon's max_concurrent, at most MAX_JOBS.

    A scan is bound by the slowest backend (spamd's children, clamd's threads): past what they serve
    at once, more jobs only queue at their sockets and lengthen each message's wait. Measured on
    2 cores, 1,000 messages, clamd (MaxThreads 8) and spamd (2 children): 13.1, 12.0 and 13.6
    messages/s at 4, 8 and 16 jobs, the same within noise; 8 also keeps a larger spamd pool
    (its default is 5 children) busy.
    """
    return max(1, min(max_concurrent, MAX_JOBS))


def unchecked(disposition: Disposition) -> bool:
    """Some check did not inspect the message: it failed, hit a limit, or the message is UNCHECKED."""
    if disposition.outcome.verdict.category is Category.UNCHECKED:
        return True
    return any(f.failed or f.status == "unchecked" for f in disposition.findings.values())


def listed(only: str, disposition: Disposition) -> bool:
    """--only: all, blocked (rejected, discarded or tempfailed), unchecked (see `unchecked`)."""
    if only == "blocked":
        return disposition.outcome.verdict.blocked
    if only == "unchecked":
        return unchecked(disposition)
    return True


class Tally:
    """Counts over every scanned message, and the check details every message so far has had.

    A detail (a check's skip or failure, e.g. "spf skipped: no client address") is a candidate
    while every message has had it; `observe` returns those that stopped being one with this
    message. With `collapse` off (a single message) nothing is a candidate.
    """

    def __init__(self, collapse: bool = True):
        self.collapse = collapse
        self.messages = 0
        self.categories: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.unchecked = 0
        self.blocked: list[tuple[str, str]] = []  # the first NAMED: (name, category)
        self.blocked_count = 0
        self.check_time: dict[str, float] = {}
        self.check_max: dict[str, float] = {}
        self.check_status: dict[str, Counter[str]] = {}
        self.common: dict[str, None] | None = None  # ordered set: said of every message so far
        self._last_name = ""

    def observe(self, name: str, disposition: Disposition) -> list[tuple[str, int, str]]:
        verdict = disposition.outcome.verdict
        self.messages += 1
        self.categories[verdict.category.name] += 1
        self.actions[verdict.action] += 1
        self.unchecked += unchecked(disposition)
        if verdict.blocked:
            self.blocked_count += 1
            if len(self.blocked) < NAMED:
                self.blocked.append((name, verdict.category.name))
        for check, finding in disposition.findings.items():
            self.check_time[check] = self.check_time.get(check, 0.0) + finding.elapsed
            self.check_max[check] = max(self.check_max.get(check, 0.0), finding.elapsed)
            self.check_status.setdefault(check, Counter())[finding.status] += 1
        details = report.check_details(disposition)
        broken = []
        if self.common is None:
            self.common = dict.fromkeys(details) if self.collapse else {}
        else:
            for detail in [d for d in self.common if d not in details]:
                del self.common[detail]
                broken.append((detail, self.messages - 1, self._last_name))
        self._last_name = name
        return broken

    def every(self) -> dict[str, None]:
        """The details said of every message scanned (none for a single message: its row says them)."""
        return self.common or {} if self.messages > 1 else {}

    def to_json(self, elapsed: float, jobs: int) -> dict:
        return {
            "messages": self.messages,
            "elapsed_s": round(elapsed, 3),
            "messages_per_second": round(self.messages / elapsed, 1) if elapsed > 0 else None,
            "jobs": jobs,
            "categories": dict(self.categories.most_common()),
            "actions": dict(self.actions.most_common()),
            "blocked": self.blocked_count,
            "unchecked": self.unchecked,
            "checks": {
                name: {
                    "total_s": round(total, 3),
                    "mean_ms": round(total * 1000 / max(1, sum(self.check_status[name].values())), 1),
                    "max_ms": round(self.check_max[name] * 1000, 1),
                    "statuses": dict(self.check_status[name].most_common()),
                }
                for name, total in self.check_time.items()
            },
            "every_message": list(self.every()),
        }

    def summary_lines(self, elapsed: float, jobs: int, notes: list[str]) -> list[str]:
        rate = f"{self.messages / elapsed:.1f}" if elapsed > 0 else "-"
        lines = [
            "",
            f"Summary: {self.messages} message{'s' if self.messages != 1 else ''} in {elapsed:.2f} s,"
            f" {rate} messages/s, {jobs} at once",
            f"  category  {_counts(self.categories)}",
            f"  action    {_counts(self.actions)}",
        ]
        if self.blocked_count:
            more = self.blocked_count - len(self.blocked)
            lines.append(f"  blocked   {self.blocked_count}" + (" (--only blocked lists them all)" if more else ":"))
            lines += [f"    {category:<10} {name}" for name, category in self.blocked]
            if more:
                lines.append(f"    and {more} more")
        if self.unchecked:
            lines.append(f"  unchecked {self.unchecked} (not inspected by every check: --only unchecked lists them)")
        if self.check_time:
            lines.append(f"  {'check':<10}{'total':>10}{'mean':>10}{'max':>10}  statuses")
            for name, total in self.check_time.items():
                count = max(1, sum(self.check_status[name].values()))
                statuses = _counts(self.check_status[name])
                lines.append(
                    f"  {name:<10}{total:>9.2f}s{total * 1000 / count:>8.1f}ms"
                    f"{self.check_max[name] * 1000:>8.1f}ms  {statuses}"
                )
        every = self.every()
        if every:
            lines.append("  said of every message (not repeated above):")
            lines += [f"    {d}" for d in every]
        lines += notes
        return lines


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


class Lister:
    """The table: each listed message's row, less the details said of every message.

    The first HOLD rows wait until those details are known well enough (HOLD messages had them,
    or none is left); a detail that stops being common later is shown from then on, and the
    summary says which earlier messages had it unsaid.
    """

    def __init__(self, tally: Tally, only: str, write: Callable[[str], None]):
        self.tally, self.only, self.write = tally, only, write
        self.pending: list[tuple[str, list[str], list[str]]] | None = []  # None once flushed
        self.notes: list[str] = []

    def add(self, name: str, disposition: Disposition) -> None:
        broken = self.tally.observe(name, disposition)
        if self.pending is None:  # rows already printed without these: say so in the summary
            self.notes += [
                f"  {d}: also of the first {n} message{'s' if n != 1 else ''} (up to {last}), not repeated there"
                for d, n, last in broken
            ]
        if listed(self.only, disposition):
            reason = disposition.outcome.verdict.reason
            row = (report.row_head(name, disposition), [reason] if reason else [], report.check_details(disposition))
            if self.pending is None:
                self._print(row)
            else:
                self.pending.append(row)
        if self.pending is not None and (self.tally.messages >= HOLD or not self.tally.common):
            self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        rows, self.pending = self.pending, None
        for row in rows:
            self._print(row)

    def _print(self, row: tuple[str, list[str], list[str]]) -> None:
        head, reason, checks = row
        common = self.tally.every()
        self.write(report.with_details(head, reason + [d for d in checks if d not in common]))


class Progress:
    """A one-line bar on stderr: done/total, rate, ETA; redrawn at most ten times a second.

    `clear` before anything else is written to the same terminal; the next `step` draws it again.
    """

    def __init__(self, total: int | None, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self.total, self.stream, self.clock = total, stream, clock
        self.count, self.start, self.drawn_at, self.shown = 0, clock(), 0.0, False

    def step(self) -> None:
        self.count += 1
        now = self.clock()
        if self.shown and now - self.drawn_at < 0.1 and self.count != self.total:
            return
        self.drawn_at = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        if self.total:
            filled = 30 * self.count // self.total
            eta = (self.total - self.count) / rate if rate > 0 else 0
            line = (
                f"[{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total}"
                f" {100 * self.count // self.total}%  {rate:.1f} msg/s  ETA {_clock(eta)}"
            )
        else:
            line = f"{self.count} messages  {rate:.1f} msg/s  {_clock(elapsed)}"
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def done(self) -> None:
        self.clear()


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def summary_json(tally: Tally, elapsed: float, jobs: int) -> str:
    """--json-summary: the one last line, {"summary": {...}}; no message's object has a "summary" key."""
    return json.dumps({"summary": tally.to_json(elapsed, jobs)}, ensure_ascii=True)
