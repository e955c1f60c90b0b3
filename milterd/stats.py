"""`milterd stats`: a summary of milterd's per-message log lines, for a meeting or a script.

It reads the lines `engine.log_line` writes, from milterd's own log file
(`2024-05-01 12:00:00,123 milterd[PID]: ...`), from syslog (`May  1 12:00:00 host milterd[PID]: ...`,
or RFC 3339 stamps) or bare. Other lines are skipped; a line that looks like a message line but
does not parse is counted, never fatal. The file is streamed: memory stays flat on a big log
(latencies are kept as per-millisecond histograms, distinct reasons up to a cap).

The sender chooses the envelope addresses and the names of attached files, and both are in the
line: the fields milterd itself writes (size, category, score, action, reply, checks) are found by
their shape, and a line is only taken when all of it is consistent.
"""

from __future__ import annotations

import gzip
import heapq
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

MAX_LINE = 64 * 1024  # longer lines are cut (log_line's own fields are bounded well below this)
MAX_KEYS = 5000  # distinct reasons, virus names, ... kept per table; the rest count as "(other)"
TOP = 10

# The stamp and tag in front of the message text.
_OWN = re.compile(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(?:[,.](\d{1,6}))? milterd\[\d+\]: ")
_SYSLOG = re.compile(r"([A-Z][a-z]{2}) +(\d{1,2}) (\d\d:\d\d:\d\d) \S+ milterd\[\d+\]: ")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) \S+ milterd\[\d+\]: ")
_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}

_HEAD = re.compile(r"(?P<qid>[^\s:]+): client=(?P<client>\S*?)\[(?P<ip>[^\]\s]*)\], from=")
_FIELD = r"[a-z_]+=[^,]*, "  # a simple key=value that a newer milterd may add (dry_run=yes, would=...)
# milterd's own fields, from size= to the end of checks=[...] (and auth=[...]): no part runs past a comma
_FIXED = re.compile(
    r"size=(?P<size>\d+), category=(?P<category>[A-Z_]+), score=(?P<score>-|-?\d+(?:\.\d+)?), "
    rf"(?P<pre>(?:{_FIELD})*?)action=(?P<action>[a-z_]+), "
    rf"(?P<mid>(?:{_FIELD})*?)reply=(?P<code>\d{{3}})(?: (?P<xcode>\d\.\d{{1,3}}\.\d{{1,3}}))?, "
    rf"(?P<extra>(?:{_FIELD})*?)checks=\[(?P<checks>[^\]]*)\]"
    r"(?:, auth=\[(?P<auth>[^\]]*)\])?"
)
_SIMPLE = re.compile(r"([a-z_]+)=([^,\s\[\]]*)")
MAX_CANDIDATES = 50  # places where milterd's fields may start: a real line has one, after the addresses
_CHECK = re.compile(r"([\w.-]+):([\w-]+)/(\d+)ms")
_VIRUS = re.compile(r"virus (.+) found", re.S)
_BANNED = re.compile(r"message contains banned file (.+)", re.S)
_UNCHECKED = re.compile(r"message could not be checked \((.*)\)", re.S)
_DRY_ACTION_KEYS = ("would", "would_action", "would_be", "dry_run_action")


@dataclass
class Record:
    """One per-message log line, parsed."""

    time: float | None
    queue_id: str
    client: str
    ip: str
    sender: str
    rcpts: int
    size: int
    category: str
    score: str
    action: str  # what milterd did
    reply: str
    checks: list[tuple[str, str, int]]  # (name, status, ms)
    reason: str = ""
    failed: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # every other key=value (bank, quarantine, dry_run, ...)

    @property
    def dry_run(self) -> bool:
        return self.fields.get("dry_run", "").lower() in ("yes", "true", "1")

    @property
    def effective_action(self) -> str:
        """The action, or in dry run the one milterd would have taken."""
        if self.dry_run:
            for key in _DRY_ACTION_KEYS:
                if re.fullmatch(r"[a-z_]+", self.fields.get(key, "")):
                    return self.fields[key]
        return self.action


def parse_stamp(line: str, now: float | None = None) -> tuple[float | None, str] | None:
    """(epoch seconds or None, the message text) of a milterd line; None when the line is another program's."""
    if m := _OWN.match(line):
        try:
            when = time.mktime(time.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S"))
        except (ValueError, OverflowError):
            return None
        return when + (float("0." + m[3]) if m[3] else 0.0), line[m.end() :]
    if m := _SYSLOG.match(line):
        return _syslog_time(m[1], m[2], m[3], now), line[m.end() :]
    if m := _RFC3339.match(line):
        try:
            stamp = datetime.fromisoformat(m[1].replace("Z", "+00:00"))
        except ValueError:
            return None
        return (stamp.timestamp() if stamp.tzinfo else time.mktime(stamp.timetuple())), line[m.end() :]
    if m := re.search(r"milterd\[\d+\]: ", line[:200]):  # some other stamp: no time
        return None, line[m.end() :]
    if _HEAD.match(line):  # a bare log_line
        return None, line
    return None


def _syslog_time(month: str, day: str, clock: str, now: float | None) -> float | None:
    """Syslog writes no year: this year, or last year when that would be more than a day ahead."""
    if month not in _MONTHS:
        return None
    now = time.time() if now is None else now
    year = time.localtime(now).tm_year
    for y in (year, year - 1):
        try:
            when = time.mktime(time.strptime(f"{y}-{_MONTHS[month]}-{day} {clock}", "%Y-%m-%d %H:%M:%S"))
        except (ValueError, OverflowError):
            return None
        if when <= now + 86400:
            return when
    return when


def parse_message(text: str, when: float | None = None) -> Record | None:
    """The fields of one log_line text (after the stamp); None when it is not one."""
    head = _HEAD.match(text)
    if not head:
        return None
    rest = text[head.end() :].rstrip("\r\n")
    # the addresses are the sender's text and may imitate what follows them: take the first place
    # where the addresses before it and milterd's fields after it are both well formed
    at = -1
    for _ in range(MAX_CANDIDATES):
        if (at := rest.find(", size=", at + 1)) < 0:
            break
        addresses = _addresses(rest[:at])
        fixed = _FIXED.match(rest, at + 2) if addresses else None
        after = _after_checks(rest[fixed.end() :]) if fixed else None
        if after is not None:
            return _record(head, addresses, fixed, after, when)
    return None


def _addresses(text: str) -> tuple[str, str] | None:
    """(sender, recipients) of `<sender>, to=<r1>,<r2>`; None when it is not that shape."""
    split = text.find(">, to=")
    if not text.startswith("<") or split < 0:
        return None
    rcpts = text[split + 6 :]
    if rcpts and not (rcpts.startswith("<") and rcpts.endswith(">")):
        return None
    return text[1:split], rcpts


def _after_checks(text: str) -> tuple[str, str, list[tuple[str, str]]] | None:
    """(reason, failed, other fields) of what follows checks=[...] and auth=[...]; None when malformed.

    `[, key=value]... [, reason=TEXT] [, failed=[TEXT]] [, key=value]...`: the reason is free text
    (a banned file's name is the sender's), so simple fields are taken from both of its ends.
    """
    fields: list[tuple[str, str]] = []
    while text.startswith(", "):  # simple fields before the reason
        end = text.find(", ", 2)
        end = len(text) if end < 0 else end
        m = _SIMPLE.fullmatch(text, 2, end)
        if not m or m[1] in ("reason", "failed"):
            break
        fields.append((m[1], m[2]))
        text = text[end:]
    trailing: list[tuple[str, str]] = []
    while (cut := text.rfind(", ")) >= 0 and (m := _SIMPLE.fullmatch(text, cut + 2)):
        if m[1] in ("reason", "failed"):
            break
        trailing.append((m[1], m[2]))
        text = text[:cut]
    failed = ""
    if text.endswith("]") and (cut := text.find(", failed=[")) >= 0:
        text, failed = text[:cut], text[cut + 10 : -1]
    reason = ""
    if text.startswith(", reason="):
        text, reason = "", text[9:]
    if text.strip():
        return None
    return reason, failed, fields + trailing[::-1]


def _record(head: re.Match, addresses: tuple[str, str], fixed: re.Match, after, when: float | None) -> Record:
    reason, failed, others = after
    fields: dict[str, str] = {}
    for group in ("pre", "mid", "extra"):
        for key, value in re.findall(r"([a-z_]+)=([^,]*), ", fixed[group] or ""):
            fields.setdefault(key, value.strip())
    for key, value in others:  # milterd's own fields before these, which sit around the free text
        fields.setdefault(key, value)
    checks = [(n, s, int(ms)) for n, s, ms in (_CHECK.fullmatch(t).groups() for t in _tokens(fixed["checks"]))]
    sender, rcpts = addresses
    return Record(
        time=when,
        queue_id=head["qid"],
        client=head["client"],
        ip=head["ip"],
        sender=sender,
        rcpts=rcpts.count(">,<") + 1 if rcpts else 0,
        size=int(fixed["size"]),
        category=fixed["category"],
        score=fixed["score"],
        action=fixed["action"],
        reply=fixed["code"] + (f" {fixed['xcode']}" if fixed["xcode"] else ""),
        checks=checks,
        reason=reason,
        failed=failed,
        fields=fields,
    )


def _tokens(text: str):
    return (t for t in text.split() if _CHECK.fullmatch(t))


def parse_line(line: str, now: float | None = None) -> Record | None:
    stamped = parse_stamp(line, now)
    if stamped is None:
        return None
    return parse_message(stamped[1], stamped[0])


class _Counter(Counter):
    """A Counter of at most MAX_KEYS keys; more distinct keys are counted as "(other)"."""

    def add(self, key: str, n: int = 1) -> None:
        if key not in self and len(self) >= MAX_KEYS:
            key = "(other)"
        self[key] += n


def _percentile(histogram: Counter, total: int, fraction: float) -> int:
    """The smallest ms value with at least `fraction` of the observations at or below it."""
    rank, seen = max(1, int(-(-total * fraction // 1))), 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= rank:
            return ms
    return 0


class Stats:
    """Everything the summary shows, accumulated one record at a time."""

    def __init__(self):
        self.messages = 0
        self.unparsed = 0  # lines with an action= that are not a well-formed message line
        self.undated = 0  # message lines without a time (left out when --since is given)
        self.older = 0  # left out by --since
        self.first: float | None = None
        self.last: float | None = None
        self.dry_run = 0
        self.bytes = 0
        self.categories = _Counter()
        self.actions = _Counter()
        self.replies = _Counter()
        self.check_status: dict[str, Counter] = {}
        self.check_ms: dict[str, Counter] = {}
        self.unchecked = _Counter()
        self.failed = _Counter()
        self.viruses = _Counter()
        self.banned_names = _Counter()
        self.banned_types = _Counter()
        self._slowest: list[tuple[int, int, int, Record]] = []  # a min-heap of the TOP slowest

    def add(self, record: Record) -> None:
        self.messages += 1
        self.bytes += record.size
        if record.time is not None:
            self.first = record.time if self.first is None else min(self.first, record.time)
            self.last = record.time if self.last is None else max(self.last, record.time)
        self.dry_run += record.dry_run
        self.categories.add(record.category)
        self.actions.add(record.effective_action)
        self.replies.add(record.reply)
        for name, status, ms in record.checks:
            if name not in self.check_status and len(self.check_status) >= 100:
                continue  # a hostile log could name a new check per line
            self.check_status.setdefault(name, Counter())[status] += 1
            self.check_ms.setdefault(name, Counter())[ms] += 1
        reason = record.reason
        if record.category == "UNCHECKED" or record.action == "tempfail":
            if reason:
                m = _UNCHECKED.fullmatch(reason)
                self.unchecked.add(m[1] if m else reason)
        if record.failed:
            for each in record.failed.split("; "):
                self.failed.add(each.strip())
        if m := _VIRUS.fullmatch(reason):
            for name in _names(m[1]):
                self.viruses.add(name)
        if m := _BANNED.fullmatch(reason):
            for name in _names(m[1]):
                self.banned_names.add(name)
                self.banned_types.add(_file_type(name))
        if record.checks:
            times = [ms for _, _, ms in record.checks]
            item = (max(times), sum(times), self.messages, record)
            if len(self._slowest) < TOP:
                heapq.heappush(self._slowest, item)
            elif item[:2] > self._slowest[0][:2]:
                heapq.heapreplace(self._slowest, item)

    def slowest(self) -> list[Record]:
        return [item[3] for item in sorted(self._slowest, key=lambda i: (-i[0], -i[1], i[2]))]

    def checks(self) -> dict[str, dict]:
        out = {}
        for name in sorted(self.check_status):
            histogram = self.check_ms[name]
            total = sum(histogram.values())
            out[name] = {
                "count": total,
                "status": dict(self.check_status[name].most_common()),
                "p50_ms": _percentile(histogram, total, 0.50),
                "p99_ms": _percentile(histogram, total, 0.99),
                "max_ms": max(histogram) if histogram else 0,
            }
        return out

    def to_json(self) -> dict:
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "first": _iso(self.first),
            "last": _iso(self.last),
            "span_seconds": round(self.last - self.first, 3) if self.first is not None else None,
            "dry_run_messages": self.dry_run,
            "categories": dict(self.categories.most_common()),
            "actions": dict(self.actions.most_common()),
            "replies": dict(self.replies.most_common()),
            "checks": self.checks(),
            "unchecked_reasons": dict(self.unchecked.most_common()),
            "failed_checks": dict(self.failed.most_common()),
            "viruses": dict(self.viruses.most_common()),
            "banned_names": dict(self.banned_names.most_common()),
            "banned_types": dict(self.banned_types.most_common()),
            "slowest_by": "the message's slowest check (ms); sum of all its checks as well",
            "slowest": [
                {
                    "queue_id": r.queue_id,
                    "time": _iso(r.time),
                    "max_check_ms": max(ms for _, _, ms in r.checks),
                    "slowest_check": max(r.checks, key=lambda c: c[2])[0],
                    "sum_ms": sum(ms for _, _, ms in r.checks),
                    "category": r.category,
                    "action": r.effective_action,
                    "size": r.size,
                }
                for r in self.slowest()
            ],
            "unparsed_lines": self.unparsed,
            "undated_lines": self.undated,
            "skipped_by_since": self.older,
        }


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(", ") if n.strip()]


def _file_type(path: str) -> str:
    """A banned part's type by its name: the extension of its last component, or "(no extension)"."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return f".{ext.lower()}" if dot and stem and ext and len(ext) <= 10 and " " not in ext else "(no extension)"


def _iso(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def collect(lines, since: float | None = None, now: float | None = None) -> Stats:
    """Stats over an iterable of text lines; `since`: only lines at or after this epoch time."""
    stats = Stats()
    for line in lines:
        try:
            stamped = parse_stamp(line, now)
            if stamped is None or " action=" not in stamped[1]:
                continue  # another program's line, or milterd's but not about a message
            record = parse_message(*stamped[::-1])
        except Exception:  # a line must never stop the summary
            record = None
        if record is None:
            stats.unparsed += 1
            continue
        if since is not None:
            if record.time is None:
                stats.undated += 1
                continue
            if record.time < since:
                stats.older += 1
                continue
        elif record.time is None:
            stats.undated += 1
        stats.add(record)
    return stats


def read_lines(stream):
    """Text lines of a binary stream, each at most MAX_LINE bytes (the rest of a longer line dropped)."""
    while line := stream.readline(MAX_LINE):
        if not line.endswith(b"\n"):
            while (more := stream.readline(MAX_LINE)) and not more.endswith(b"\n"):
                pass
        yield line.decode("utf-8", "replace")


def render(stats: Stats) -> str:
    """The plain-text summary."""
    out = []
    span = ""
    if stats.first is not None:
        span = f"{_iso(stats.first)} .. {_iso(stats.last)} ({_duration(stats.last - stats.first)})"
    out.append(f"{'Messages':<18}{stats.messages}" + (f"  ({_size(stats.bytes)})" if stats.messages else ""))
    out.append(f"{'Time span':<18}{span or '-'}")
    if stats.dry_run:
        out.append(f"{'Dry run':<18}{stats.dry_run} messages logged in dry run: actions are the would-be ones")
    notes = []
    if stats.unparsed:
        notes.append(f"{stats.unparsed} malformed lines skipped")
    if stats.undated:
        notes.append(f"{stats.undated} lines without a time")
    if stats.older:
        notes.append(f"{stats.older} older than --since")
    if notes:
        out.append(f"{'Note':<18}{'; '.join(notes)}")
    total = stats.messages or 1
    for title, counter in (
        ("Categories", stats.categories),
        ("Actions" + (" (would-be in dry run)" if stats.dry_run else ""), stats.actions),
        ("Replies", stats.replies),
    ):
        out += ["", title]
        out += [f"  {k:<20}{v:>8}  {100 * v / total:5.1f}%" for k, v in counter.most_common()] or ["  -"]
    checks = stats.checks()
    out += ["", "Checks", f"  {'check':<12}{'count':>8}{'p50':>9}{'p99':>9}{'max':>9}  status"]
    for name, c in checks.items():
        status = " ".join(f"{s}={n}" for s, n in c["status"].items())
        out.append(f"  {name:<12}{c['count']:>8}{c['p50_ms']:>7}ms{c['p99_ms']:>7}ms{c['max_ms']:>7}ms  {status}")
    if not checks:
        out.append("  -")
    for title, counter in (
        ("UNCHECKED reasons", stats.unchecked),
        ("Failed checks", stats.failed),
        ("Viruses", stats.viruses),
        ("Banned types", stats.banned_types),
        ("Banned names", stats.banned_names),
    ):
        if counter:
            out += ["", f"{title} (top {TOP})"]
            out += [f"  {v:>8}  {k}" for k, v in counter.most_common(TOP)]
    slow = stats.slowest()
    if slow:
        out += ["", f"Slowest {len(slow)} messages (by their slowest check; sum of all checks after it)"]
        for r in slow:
            name, _, ms = max(r.checks, key=lambda c: c[2])
            total_ms = sum(c[2] for c in r.checks)
            when = _iso(r.time) or "-"
            out.append(
                f"  {ms:>7}ms {name:<10} sum {total_ms:>7}ms  {when:<19}  {r.queue_id:<14} {r.category:<10}"
                f" {r.effective_action}"
            )
    return "\n".join(out)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def add_parser(sub) -> None:
    stats = sub.add_parser("stats", help="summarise milterd's log: categories, actions, checks, viruses, banned files")
    stats.add_argument("log", nargs="?", default="-", metavar="LOGFILE", help="milterd's log or syslog (- for stdin)")
    stats.add_argument("--json", action="store_true", help="one JSON object for scripts")
    stats.add_argument("--since", metavar="AGE", help="only the last AGE (90s, 30m, 2h, 7d)")


def run(args) -> int:
    """`milterd stats [LOGFILE|-] [--json] [--since AGE]`."""
    from .quarantine import parse_age

    now = time.time()
    try:
        since = now - parse_age(args.since) if args.since else None
    except ValueError as e:
        print(f"milterd: stats: --since: {e}", file=sys.stderr)
        return 2
    try:
        if args.log == "-":
            stats = collect(read_lines(sys.stdin.buffer), since, now)
        else:
            opener = gzip.open if args.log.endswith(".gz") else open
            with opener(args.log, "rb") as stream:
                stats = collect(read_lines(stream), since, now)
    except (OSError, EOFError) as e:
        print(f"milterd: stats: {args.log}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    print(json.dumps(stats.to_json()) if args.json else render(stats))
    return 0
