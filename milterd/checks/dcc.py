"""DCC through dccifd's ASCII protocol, scored as SpamAssassin's DCC plugin scores it.

The client is the one Mail::SpamAssassin::Plugin::DCC is: a line of options, the SMTP client's
address and name, the HELO name, the sender, the recipients up to an empty line, then the
message; half-close; dccifd answers with an overall result line, a line of one result per
recipient, and (asked with "header") its X-DCC header. DCC_CHECK hits when the Body, Fuz1 or Fuz2
count reaches its threshold ("many" counts as 999999, as the plugin counts it). dccifd reports
the checksums to DCC as it checks them: that is how DCC counts. Answers are cached for a minute
by the message's SHA-256, so a burst of the same message asks once. A message over `max_size` is
sent as amavis hands it to SpamAssassin's DCC plugin: its header section and the first `max_size`
bytes of its body, cut at a line end; the finding says it was truncated. Not critical: when dccifd
does not answer, the check only adds nothing.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..cache import TtlCache
from ..findings import Finding
from ..message import CHUNK, Message, View
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

TEST = "DCC_CHECK"
# rules/scores.toml [dcc]: SpamAssassin's DCC thresholds and points (DCC_CHECK)
SCORES = {"body_max": 999999, "fuz1_max": 999999, "fuz2_max": 999999, "points": 1.1}
MANY = 999999  # what SpamAssassin's DCC plugin makes of dccifd's "many"
# "header": only the X-DCC header back, not the message; "grey-off": milterd does not greylist,
# so dccifd must not answer G for a message it has not seen before (DCC.pm sends both).
OPTIONS = "header grey-off"
MAX_REPLY = 64 << 10  # the X-DCC header is one folded line; anything past this is not dccifd
RESULTS = {
    "A": "accept",
    "R": "reject",
    "S": "accept for some",
    "G": "greylist",
    "T": "temporary failure",
}
_COUNT = re.compile(r"\b(Body|Fuz1|Fuz2)=(\d+|(?i:many|ok\d?))")
_X_DCC_IN_HEAD = re.compile(rb"^X-DCC-[^:\r\n]*-Metrics:", re.I | re.M)
_LINE_BREAKS = re.compile(r"[\r\n\0]")


class DccError(Exception):
    """dccifd answered, but not with a result."""


@dataclass(frozen=True)
class DccReply:
    """dccifd's answer: its result letter, the X-DCC header (unfolded, as dccifd sent it) and its counts."""

    result: str  # A, R, S, G or T (see RESULTS)
    header: str = ""  # "" when dccifd sent none (after T)
    body: int = 0
    fuz1: int = 0
    fuz2: int = 0


def _count(value: str) -> int:
    value = value.lower()
    if value == "many":
        return MANY
    if value.startswith("ok"):  # whitelisted: DCC.pm counts it as 0
        return 0
    return MANY if len(value) > 6 else int(value)  # 7 digits are more than "many" anyway


def parse_reply(reply: bytes) -> DccReply:
    """The result line, the per-recipient line (ignored, as DCC.pm does), then the X-DCC header.

    The header may be folded; dccifd folds with a line starting with a tab. Counts missing from
    the header are 0, as in DCC.pm.
    """
    lines = reply.decode("latin-1").split("\n")
    result = lines[0].rstrip("\r")
    if result not in RESULTS:
        raise DccError("not a dccifd result: " + printable(result, 80))
    if len(lines) < 2:
        raise DccError("dccifd reply ends after the result line")
    header = lines[2].rstrip("\r") if len(lines) > 2 else ""
    for line in lines[3:]:
        if not line.startswith("\t"):
            break
        header += " " + line.strip()
    if not header:
        if result == "T":
            return DccReply(result)
        raise DccError(f"dccifd answered {result} without an X-DCC header")
    if not header.startswith("X-DCC"):
        raise DccError("instead of an X-DCC header, dccifd answered: " + printable(header, 120))
    counts: dict[str, int] = {}
    for name, value in _COUNT.findall(header.partition(":")[2]):
        counts.setdefault(name.lower(), _count(value))  # the first, as DCC.pm's regex takes
    return DccReply(result, header, **counts)


def is_hit(reply: DccReply, scoring: Mapping[str, float]) -> bool:
    """DCC_CHECK as DCC.pm's check_dcc_result: any count at or over its threshold."""
    return reply.body >= scoring["body_max"] or reply.fuz1 >= scoring["fuz1_max"] or reply.fuz2 >= scoring["fuz2_max"]


def _field(text: str) -> bytes:
    """One protocol field: a CR or LF inside would split its line (a CR separates the client's name)."""
    text = _LINE_BREAKS.sub("", text)
    try:
        return text.encode("utf-8", "surrogateescape")  # the bytes the MTA gave, as milter.py decoded them
    except UnicodeEncodeError:  # a surrogate that no decoding made: nothing to restore
        return text.encode("utf-8", "replace")


def request_head(message: Message, *, query: bool = False) -> bytes:
    """Everything dccifd reads before the message: options, client, HELO, sender, recipients, empty line."""
    env = message.envelope
    client = _field(env.client_ip)  # empty: dccifd takes the address from the first Received header
    if client and env.client_name and env.client_name != "unknown":  # Postfix's name without reverse DNS
        client += b"\r" + _field(env.client_name)
    rcpts = [b"<%s>" % _field(rcpt.strip("<>")) for rcpt in env.rcpts] or [b"unknown"]  # DCC.pm's when none
    lines = [
        (OPTIONS + (" query" if query else "")).encode(),
        client,
        _field(env.helo),
        b"<%s>" % _field(env.mail_from.strip("<>")),
        *rcpts,
        b"",
    ]
    return b"\n".join(lines) + b"\n"


def already_reported(message: Message) -> bool:
    """An X-DCC header in the message's header section: an earlier hop reported it, so only ask."""
    return bool(_X_DCC_IN_HEAD.search(message.header_section()))


@dataclass(frozen=True)
class DccSettings:
    """DCC through the dccifd daemon's socket; off by default, as dccifd asks outside servers."""

    enabled: bool = False
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    socket: str = "/var/lib/dcc/dccifd"
    timeout: float = field(default=5.0, metadata=POSITIVE)
    # past it the header section and this much of the body (cut at a line end) are sent, as amavis+SA
    max_size: int = field(default=512000, metadata=POSITIVE)
    cache_ttl: float = 60.0  # seconds an answer is reused (a burst of the same spam asks once); 0 = no cache
    cache_entries: int = field(default=10_000, metadata=POSITIVE)  # answers kept at most, the oldest dropped first


@register(
    name="dcc",
    bypass="bypass_spam_checks",
    settings=DccSettings,
    order=100,
    scores={"dcc": SCORES},
    build=lambda s, runtime: DccCheck(
        s.socket, s.timeout, runtime.scores("dcc"), TtlCache(s.cache_ttl, s.cache_entries), max_size=s.max_size
    ),
)
class DccCheck(Check):
    def __init__(
        self,
        socket_path: str,
        timeout: float,
        scoring: Mapping[str, float],
        cache: TtlCache[DccReply] | None = None,
        *,
        max_size: int = DccSettings.max_size,
    ):
        self.socket_path = socket_path
        self.max_size = max_size
        self.timeout = timeout
        self.scoring = dict(scoring)
        self.cache: TtlCache[DccReply] = (
            cache if cache is not None else TtlCache(DccSettings.cache_ttl, DccSettings.cache_entries)
        )

    def run(self, message: Message) -> Finding:
        timeout = message.time_left(self.timeout)
        deadline = time.monotonic() + timeout
        view = message.truncated(self.max_size)
        key = message.sha256()  # the view depends only on the message, for this max_size
        reply = self.cache.get(key)
        cached = reply is not None
        if reply is None:
            try:
                sock = _connect(self.socket_path, timeout)
            except TimeoutError:
                return self.finding("unavailable", detail=printable(f"{self.socket_path}: connect timed out", 300))
            except OSError as e:
                return self.finding("unavailable", detail=printable(f"{self.socket_path}: {e.strerror or e}", 300))
            try:
                reply = parse_reply(_exchange(sock, message, view, deadline))
            except TimeoutError:
                return self.finding("timeout", detail=f"dccifd: no answer in {timeout:g}s")
            except (OSError, DccError) as e:
                return self.finding("error", detail=printable(f"dccifd: {e}", 300))
            finally:
                sock.close()
            if reply.result == "T":
                return self.finding("unavailable", detail="dccifd: temporary failure of the DCC system (T)")
            self.cache.put(key, reply)
        detail = printable(
            f"Body={_shown(reply.body)} Fuz1={_shown(reply.fuz1)} Fuz2={_shown(reply.fuz2)}"
            f" (dccifd {RESULTS[reply.result]}{', cached' if cached else ''})"
            + (f"; {view.note('checked')}" if view.truncated else "")
        )
        if is_hit(reply, self.scoring):
            points = self.scoring["points"]
            return self.finding("ok", score=points, symbols=((TEST, points),), detail=detail)
        return self.finding("ok", detail=detail)


def _shown(count: int) -> str:
    return "many" if count >= MANY else str(count)


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, message: Message, view: View, deadline: float) -> bytes:
    """Send the request, half-close, read to EOF; every step within what is left of the deadline."""

    def within_deadline() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)

    try:
        within_deadline()
        sock.sendall(request_head(message, query=already_reported(message)))
        with view.open() as stream:
            while chunk := stream.read(CHUNK):
                within_deadline()
                sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # dccifd answers T and closes before reading the rest when it cannot reach DCC: read that
    reply = bytearray()
    while len(reply) < MAX_REPLY:
        within_deadline()
        if not (data := sock.recv(CHUNK)):
            break
        reply += data
    return bytes(reply)
