"""SpamAssassin through spamd (the spamc protocol, REPORT): score, required score and rule scores.

Skipped for messages over `max_size` (as spamc and amavis do) and for messages the virus scan
already condemned, since SpamAssassin is the costliest step by far.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..findings import Finding
from ..message import CHUNK, Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

MAX_REPLY = 4 << 20
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (.*)$")
_SPAM = re.compile(rb"^Spam: *(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?) *$", re.I | re.M)
_RULE = re.compile(r"^ {0,3}(-?\d+(?:\.\d+)?) +([A-Z0-9_]+)\b")


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
    # HOST:PORT or a unix socket path; a list is a failover pool
    address: tuple[str, ...] = field(default=("127.0.0.1:783",), metadata=POSITIVE)
    timeout: float = field(default=60.0, metadata=POSITIVE)
    max_size: int = 512000  # larger messages skip SpamAssassin, as spamc does


@register(
    name="spamd",
    bypass="bypass_spam_checks",
    settings=SpamdSettings,
    order=20,
    critical=True,
    after=("clamav",),
    build=lambda s, _: SpamdCheck(s.address, s.timeout, s.max_size),
)
class SpamdCheck(Check):
    def __init__(self, addresses: Sequence[str], timeout: float, max_size: int):
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.max_size = max_size

    def skip_reason(self, message: Message, earlier: Mapping[str, Finding]) -> str | None:
        if message.size > self.max_size:
            return f"message of {message.size} bytes is over max_size {self.max_size}"
        if any(f.viruses for f in earlier.values()):
            return "virus found"
        return None

    def run(self, message: Message) -> Finding:
        failures = []
        for address in self.addresses:
            try:
                sock = _connect(address, self.timeout)
            except TimeoutError:
                failures.append(f"{address}: connect timed out")
                continue
            except OSError as e:
                failures.append(f"{address}: {e.strerror or e}")
                continue
            try:
                score, required, tests = parse_reply(self._exchange(sock, message))
            except TimeoutError:
                return self.finding("timeout", detail=f"{address}: no answer in {self.timeout:g}s")
            except (OSError, SpamdError) as e:
                return self.finding("error", detail=printable(f"{address}: {e}"))
            finally:
                sock.close()
            return self.finding("ok", score=score, symbols=tests, detail=f"required {required:g}")
        return self.finding("unavailable", detail=printable("; ".join(failures), 500))

    @staticmethod
    def _exchange(sock: socket.socket, message: Message) -> bytes:
        sock.sendall(b"REPORT SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % message.size)
        with message.open() as stream:
            while chunk := stream.read(CHUNK):
                sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while len(reply) < MAX_REPLY and (data := sock.recv(CHUNK)):
            reply += data
        return bytes(reply)
