"""SpamAssassin through spamd (the spamc protocol, REPORT): score, required score and rule scores.

A message over `max_size` is scored on its header section and the first `max_size` bytes of its
body, cut at a line end, as amavis truncates what it gives SpamAssassin (spamc's --max-size would
skip it, and large spam would pass unscored); the finding says so. Skipped for messages the virus
scan already condemned, since SpamAssassin is the costliest step by far. `tell` teaches spamd's Bayes
a message as spam or ham (the protocol's TELL, as `spamc -L spam|ham`; spamd needs --allow-tell).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..findings import Finding
from ..message import CHUNK, Message, View
from ..sanitize import printable
from ..tomlschema import POSITIVE, ConfigError
from . import Check, register

MAX_REPLY = 4 << 20
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (.*)$")
_SPAM = re.compile(rb"^Spam: *(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?) *$", re.I | re.M)
_RULE = re.compile(r"^ {0,3}(-?\d+(?:\.\d+)?) +([A-Z0-9_]+)\b")
_EX_UNAVAILABLE = b"69"  # spamd's answer to TELL without --allow-tell


class SpamdError(Exception):
    """spamd answered, but not with a result."""


def parse_reply(reply: bytes) -> tuple[float, float, tuple[tuple[str, float], ...]]:
    """(score, required, ((rule, points), ...)) from a REPORT reply."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = _STATUS.match(head.split(b"\r\n", 1)[0])
    if not status:
        raise SpamdError("not a spamd reply: " + printable(head[:80].decode("latin-1")))
    if status.group(1) != b"0":
        raise SpamdError("spamd: " + printable(status.group(2).decode("latin-1")))
    spam = _SPAM.search(head)
    if not spam:
        raise SpamdError("spamd reply without a Spam: header")
    tests = []
    in_table = False
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("---- "):
            in_table = True
        elif in_table and (rule := _RULE.match(line)):
            tests.append((rule.group(2), float(rule.group(1))))
    return float(spam.group(2)), float(spam.group(3)), tuple(tests)  # the regex admits only numbers


def _connect(address: str, timeout: float) -> socket.socket:
    """HOST:PORT, [V6]:PORT, or a unix socket path."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host.strip("[]"), int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class SpamdSettings:
    enabled: bool = True
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    # HOST:PORT or a unix socket path; a list is a failover pool
    address: tuple[str, ...] = field(default=("127.0.0.1:783",), metadata=POSITIVE)
    timeout: float = field(default=60.0, metadata=POSITIVE)
    # past it SpamAssassin gets the header section and this much of the body (cut at a line end), as amavis
    max_size: int = 512000
    # spamd's User: header (spamc -u): whose preferences and Bayes database; "" sends none (spamd's own user)
    user: str = ""


def _user_header(user: str) -> bytes:
    """The `User:` line, or nothing for ""; spamd refuses control characters, and CR/LF would inject headers."""
    if not user:
        return b""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user) or len(user.encode()) > 255:
        raise ValueError(f"[spamd] user {user!r}: control characters or over 255 bytes")
    return b"User: %s\r\n" % user.encode()


@register(
    name="spamd",
    bypass="bypass_spam_checks",
    settings=SpamdSettings,
    order=20,
    after=("clamav",),
    build=lambda s, _: SpamdCheck(s.address, s.timeout, s.max_size, s.user),
)
class SpamdCheck(Check):
    def __init__(self, addresses: Sequence[str], timeout: float, max_size: int, user: str = ""):
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.max_size = max_size
        try:
            self._user = _user_header(user)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def skip_reason(self, message: Message, earlier: Mapping[str, Finding]) -> str | None:
        if any(f.viruses for f in earlier.values()):
            return "virus found"
        return None

    def run(self, message: Message) -> Finding:
        view = message.truncated(self.max_size)
        failures = []
        for address in self.addresses:
            try:
                timeout = message.time_left(self.timeout)
                sock = _connect(address, timeout)
            except TimeoutError:
                failures.append(f"{address}: connect timed out")
                continue
            except OSError as e:
                failures.append(f"{address}: {e.strerror or e}")
                continue
            try:
                score, required, tests = parse_reply(self._exchange(sock, view, self._user))
            except TimeoutError:
                return self.finding("timeout", detail=f"{address}: no answer in {timeout:g}s")
            except (OSError, SpamdError) as e:
                return self.finding("error", detail=printable(f"{address}: {e}"))
            finally:
                sock.close()
            detail = f"required {required:g}" + (f"; {view.note()}" if view.truncated else "")
            return self.finding("ok", score=score, symbols=tests, detail=detail)
        return self.finding("unavailable", detail=printable("; ".join(failures), 500))

    @staticmethod
    def _exchange(sock: socket.socket, message: Message | View, user: bytes = b"") -> bytes:
        sock.sendall(b"REPORT SPAMC/1.5\r\n%sContent-length: %d\r\n\r\n" % (user, message.size))
        with message.open() as stream:
            while chunk := stream.read(CHUNK):
                sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while len(reply) < MAX_REPLY and (data := sock.recv(CHUNK)):
            reply += data
        return bytes(reply)


def tell(raw: bytes, addresses: Sequence[str], timeout: float, user: str = "", *, spam: bool) -> list[str]:
    """Teach spamd's Bayes the message as spam or ham, as `spamc -L spam|ham [-u user]` does.

    The addresses are a failover pool, tried in order until one takes the message (one that
    refuses it, say without --allow-tell, is a failure and the next is tried); the result is the
    failures, one line per address tried, and empty once one spamd took the message. All of it
    within `timeout` seconds: a connect gets its share of what is left, the exchange all of it.
    spamd answers EX_OK without `DidSet: local` when its Bayes learned nothing (the message was
    learned so already, or Bayes is off in its configuration); spamc counts that a success, so do we.
    """
    try:
        user_line = _user_header(user)
    except ValueError as e:
        return [printable(str(e))]
    request = b"TELL SPAMC/1.5\r\nMessage-class: %s\r\nSet: local\r\n%sContent-length: %d\r\n\r\n" % (
        b"spam" if spam else b"ham",
        user_line,
        len(raw),
    )
    deadline = time.monotonic() + timeout
    failures: list[str] = []
    addresses = tuple(addresses)
    for i, address in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append(f"{address}: not tried: no time left of {timeout:g}s")
            continue
        try:
            sock = _connect(address, left / (len(addresses) - i))
        except TimeoutError:
            failures.append(f"{address}: unavailable: connect timed out")
            continue
        except (OSError, ValueError) as e:
            failures.append(printable(f"{address}: unavailable: {getattr(e, 'strerror', None) or e}"))
            continue
        try:
            failure = _tell_reply(_tell_exchange(sock, request, raw, deadline))
        except TimeoutError:
            failure = f"no answer in {timeout:g}s"
        except OSError as e:
            failure = e.strerror or str(e)
        finally:
            sock.close()
        if failure is None:
            return []
        failures.append(printable(f"{address}: {failure}", 500))
    return failures


def _tell_exchange(sock: socket.socket, request: bytes, raw: bytes, deadline: float) -> bytes:
    """Send the request and the message, read the reply (spamd may answer early, with an error, and close)."""

    def bounded() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)

    out = memoryview(request + raw)
    try:
        for start in range(0, len(out), CHUNK):
            bounded()
            sock.sendall(out[start : start + CHUNK])
        bounded()
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # spamd refused before reading the message: its reply, if any, says why
    reply = bytearray()
    try:
        while len(reply) < MAX_REPLY:
            bounded()
            data = sock.recv(CHUNK)
            if not data:
                break
            reply += data
    except ConnectionResetError:
        if not reply:
            raise
    return bytes(reply)


def _tell_reply(reply: bytes) -> str | None:
    """None when spamd took the message, or what went wrong."""
    if not reply:
        return "spamd closed the connection without an answer"
    head = reply.partition(b"\r\n\r\n")[0]
    line = head.split(b"\r\n", 1)[0]
    status = _STATUS.match(line)
    if not status:
        return "not a spamd reply: " + printable(line[:80].decode("latin-1"))
    text = printable(status.group(2).decode("latin-1"))
    if status.group(1) == _EX_UNAVAILABLE and b"TELL" in status.group(2):
        return f"spamd refused TELL: it needs --allow-tell ({text})"
    if status.group(1) != b"0":
        return f"spamd: {status.group(1).decode()} {text}"
    return None
