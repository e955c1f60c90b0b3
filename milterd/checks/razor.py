"""Razor: the message checked with Debian's `razor-check`, scored as SpamAssassin's Razor2 plugin does.

razor-check's exit code says spam (0) or not (1). The confidence (cf) the server returned for each
signature is only in its debug output, so it runs with `-d -dl=9` (debug to stdout, never to a
log file, and below level 15, which writes debug files) and the `cf N` lines are read from it:
RAZOR2_CHECK for a hit, RAZOR2_CF_RANGE_51_100 when a non-contention part's cf reaches `cf_min`,
whether or not razor-check called it spam (its own `min_cf` may be higher), as SpamAssassin does.

A message over `max_size` is checked as amavis hands it to SpamAssassin's Razor2 plugin: its header
section and the first `max_size` bytes of its body, cut at a line end; the finding says it was truncated.

The command runs without a shell in its own process group, the message streamed to its stdin;
at the deadline the whole group is killed, so nothing is left behind. Answers are cached by the
message's SHA-256. Not critical: a Razor that does not answer only adds nothing.
"""

from __future__ import annotations

import io
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from ..cache import TtlCache
from ..findings import Finding
from ..message import CHUNK, Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

TEST, CF_TEST = "RAZOR2_CHECK", "RAZOR2_CF_RANGE_51_100"
# rules/scores.toml [razor]: SpamAssassin's points for RAZOR2_CHECK and RAZOR2_CF_RANGE_51_100
SCORES = {"points": 1.729, "cf_min": 51, "cf_points": 2.430}
MAX_OUTPUT = 256 << 10  # bytes kept of each of stdout and stderr; the rest is read and dropped

# "mail 1.0 e=4 sig=...: Is spam: cf 93 >= min_cf 50" (or "Not spam: cf 30 < min_cf 50")
_CF = re.compile(r"\] mail (\d+\.\d+) e=\d+ sig=\S*: (?:Is|Not) spam: cf (\d+) ")
# "method 4: mail 1.0: contention part, skipping": SpamAssassin ignores such a part's cf
_CONTENTION = re.compile(r"\] method \d+: mail (\d+\.\d+): contention part")
_ERROR = re.compile(r"\] razor-check error: (.*)$")


@dataclass(frozen=True)
class Answer:
    """What razor-check said about one message."""

    spam: bool
    cf: int | None  # the highest cf of a non-contention part; None when the server gave none


class RazorError(Exception):
    """razor-check ran but gave no answer."""


def parse_output(returncode: int, stdout: bytes, stderr: bytes) -> Answer:
    """razor-check -d's exit code and output as an Answer; RazorError when it did not answer."""
    text = stdout.decode("utf-8", "replace")
    if returncode not in (0, 1):
        if returncode < 0:
            raise RazorError(f"razor-check killed by signal {-returncode}")
        logged = [m.group(1) for line in text.splitlines() if (m := _ERROR.search(line))]
        why = " ".join(stderr.decode("utf-8", "replace").split()) or (logged[-1] if logged else "no reason given")
        raise RazorError(printable(f"razor-check exit {returncode}: {why}"))
    cfs: dict[str, int] = {}
    contention: set[str] = set()
    for line in text.splitlines():
        if m := _CF.search(line):
            cfs[m.group(1)] = max(cfs.get(m.group(1), 0), int(m.group(2)))
        elif m := _CONTENTION.search(line):
            contention.add(m.group(1))
    counted = [cf for part, cf in cfs.items() if part not in contention]
    return Answer(spam=returncode == 0, cf=max(counted) if counted else None)


def _run(argv: list[str], message: Callable[[], BinaryIO], timeout: float) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of argv fed what `message()` reads; TimeoutError with the process group killed."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,  # its own process group, so a kill reaches any child too
        close_fds=True,
    )
    try:
        with message() as stream:
            out, err = _exchange(proc, stream, deadline)
        try:
            returncode = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError from None
    except BaseException:
        # Killed before it is reaped: its group id cannot have been reused by then.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
    return returncode, out, err


def _exchange(proc: subprocess.Popen, stream: BinaryIO, deadline: float) -> tuple[bytes, bytes]:
    """Write the message to stdin while reading stdout and stderr, until both end or the deadline."""
    assert proc.stdin and proc.stdout and proc.stderr
    os.set_blocking(proc.stdin.fileno(), False)
    output = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                pipe = key.fileobj
                if pipe is proc.stdin:
                    pending = pending or stream.read(CHUNK)
                    if pending:
                        try:
                            pending = pending[os.write(proc.stdin.fileno(), pending) :]
                            continue
                        except BrokenPipeError:  # it stopped reading; its exit code will say why
                            pending = b""
                    selector.unregister(pipe)
                    proc.stdin.close()
                    continue
                data = os.read(pipe.fileno(), CHUNK)
                if not data:
                    selector.unregister(pipe)
                elif len(output[pipe]) < MAX_OUTPUT:
                    output[pipe] += data
    return bytes(output[proc.stdout]), bytes(output[proc.stderr])


def report(raw: bytes, command: str, homedir: str, timeout: float, *, spam: bool) -> list[str]:
    """Tell Razor a message is spam (razor-report) or not (razor-revoke): the failures, one line each.

    The tools are razor-check's siblings, found next to `command`. Both need the identity that
    `razor-admin -home=DIR -register` creates.
    """
    tool = os.path.join(os.path.dirname(command), "razor-report" if spam else "razor-revoke")
    argv = [tool] + ([f"-home={homedir}"] if homedir else [])
    try:
        returncode, _, err = _run(argv, lambda: io.BytesIO(raw), timeout)
    except TimeoutError:
        return [f"{os.path.basename(tool)}: no answer in {timeout:g}s"]
    except OSError as e:
        return [printable(f"{tool}: {e.strerror or e}")]
    if returncode == 0:
        return []
    why = " ".join(err.decode("utf-8", "replace").split()) or "no reason given"
    return [printable(f"{os.path.basename(tool)} exit {returncode}: {why}", 300)]


@dataclass(frozen=True)
class RazorSettings:
    """Razor through Debian's razor-check; off by default, as it asks outside servers."""

    enabled: bool = False
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    command: str = "razor-check"
    homedir: str = ""  # razor's -home (its identity and server list); "" = the running user's ~/.razor
    timeout: float = field(default=5.0, metadata=POSITIVE)
    # past it the header section and this much of the body (cut at a line end) are checked, as amavis+SA
    max_size: int = field(default=512000, metadata=POSITIVE)
    cache_ttl: float = 60.0  # seconds an answer is reused (a burst of the same spam asks once); 0 = no cache
    cache_entries: int = field(default=10_000, metadata=POSITIVE)  # answers kept at most, the oldest dropped first


@register(
    name="razor",
    bypass="bypass_spam_checks",
    settings=RazorSettings,
    order=90,
    scores={"razor": SCORES},
    build=lambda s, runtime: RazorCheck(
        s.command,
        s.homedir,
        s.timeout,
        runtime.scores("razor"),
        TtlCache(s.cache_ttl, s.cache_entries),
        max_size=s.max_size,
    ),
)
class RazorCheck(Check):
    def __init__(
        self,
        command: str,
        homedir: str,
        timeout: float,
        scoring: Mapping[str, float],
        cache: TtlCache[Answer] | None = None,
        *,
        max_size: int = RazorSettings.max_size,
    ):
        self.max_size = max_size
        self.argv = [command, "-d", "-dl=9"] + ([f"-home={homedir}"] if homedir else [])
        self.timeout = timeout
        self.scoring = dict(scoring)
        self.cache: TtlCache[Answer] = (
            cache if cache is not None else TtlCache(RazorSettings.cache_ttl, RazorSettings.cache_entries)
        )

    def run(self, message: Message) -> Finding:
        view = message.truncated(self.max_size)
        key = message.sha256()  # the view depends only on the message, for this max_size
        answer = self.cache.get(key)
        cached = answer is not None
        if answer is None:
            try:
                timeout = message.time_left(self.timeout)
                answer = parse_output(*_run(self.argv, view.open, timeout))
            except TimeoutError:
                return self.finding("timeout", detail=f"razor-check gave no answer in {timeout:g}s")
            except RazorError as e:
                return self.finding("unavailable", detail=str(e))
            except OSError as e:  # not installed, not executable
                return self.finding("unavailable", detail=printable(f"{self.argv[0]}: {e.strerror or e}"))
            self.cache.put(key, answer)
        return self.score(answer, cached, view.note("checked") if view.truncated else "")

    def score(self, answer: Answer, cached: bool = False, truncated: str = "") -> Finding:
        tests = []
        if answer.spam:
            tests.append((TEST, self.scoring["points"]))
        if answer.cf is not None and answer.cf >= self.scoring["cf_min"]:
            tests.append((CF_TEST, self.scoring["cf_points"]))
        detail = ("spam" if answer.spam else "not spam") + ("" if answer.cf is None else f", cf {answer.cf}")
        detail += ", cached" if cached else ""
        detail += f"; {truncated}" if truncated else ""
        if not tests:
            return self.finding("ok", detail=detail)
        return self.finding("ok", score=round(sum(p for _, p in tests), 3), symbols=tuple(tests), detail=detail)
