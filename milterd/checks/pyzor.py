"""Pyzor: the message's digest looked up on the Pyzor servers, scored as SpamAssassin's Pyzor plugin does.

The digest is pyzor's own (`pyzor.digest.DataDigester`), so it matches what `pyzor report` sent.
A message over `max_size` is digested as amavis hands it to SpamAssassin's Pyzor plugin: its header
section and the first `max_size` bytes of its body, cut at a line end (the plugin digests what it
is given); the finding says it was truncated.
The servers are asked in order until one answers; answers are cached for a minute, so a burst
of the same spam asks once. Not critical: a server that does not answer only adds nothing.
"""

from __future__ import annotations

import email
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

from ..cache import TtlCache
from ..findings import Finding
from ..message import Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

TEST = "PYZOR_CHECK"
# rules/scores.toml [pyzor]: SpamAssassin's thresholds and points (PYZOR_CHECK)
SCORES = {"count_min": 5, "whitelist_min": 10, "whitelist_factor": 0.2, "points": 1.985}


@dataclass(frozen=True)
class PyzorSettings:
    """Pyzor digests checked against its servers; off by default, as it asks an outside server."""

    enabled: bool = False
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    servers: tuple[str, ...] = field(default=("public.pyzor.org:24441",), metadata=POSITIVE)  # HOST:PORT
    timeout: float = field(default=5.0, metadata=POSITIVE)
    # past it the header section and this much of the body (cut at a line end) are digested, as amavis+SA
    max_size: int = field(default=512000, metadata=POSITIVE)
    cache_ttl: float = 60.0  # seconds an answer is reused (a burst of the same spam asks once); 0 = no cache
    cache_entries: int = field(default=10_000, metadata=POSITIVE)  # answers kept at most, the oldest dropped first


# SpamAssassin ignores counts this large: they come from digests of near-empty bodies.
COUNT_LIMIT, WL_COUNT_LIMIT = 1_000_000, 10_000


@dataclass(frozen=True)
class Counts:
    """One server's answer for one digest."""

    count: int  # times reported as spam
    wl_count: int  # times whitelisted
    server: str


class PyzorError(Exception):
    """The server answered, but not with counts."""


# query(digest, (host, port), timeout) -> (count, wl_count); raises pyzor.TimeoutError,
# pyzor.CommError (unreachable, refused) or PyzorError
Query = Callable[[str, tuple[str, int], float], tuple[int, int]]


def digest(raw: bytes) -> str:
    """The message's Pyzor digest, exactly as `pyzor check` and `pyzor report` compute it."""
    import pyzor.digest

    return pyzor.digest.DataDigester(email.message_from_bytes(raw)).value


@cache
def _client_class() -> type:
    """pyzor's client on a connected UDP socket (made once, when it is first used).

    pyzor sends with sendto on an unconnected socket, where Linux drops the ICMP "port
    unreachable" of a server that is down: every dead server then costs the whole timeout. On a
    connected socket the read fails at once (ECONNREFUSED), and only the server can answer.
    """
    import pyzor
    import pyzor.client

    def send(msg, addr):
        data = msg.as_string().encode("utf8")
        for af, socktype, proto, _, sa in socket.getaddrinfo(
            addr[0], addr[1], 0, socket.SOCK_DGRAM, socket.IPPROTO_UDP
        ):
            sock = socket.socket(af, socktype, proto)
            try:
                sock.connect(sa)
                sock.send(data)
            except OSError:
                sock.close()
                continue
            return sock
        raise pyzor.CommError(f"unable to send to {addr[0]}:{addr[1]}")

    return type("Client", (pyzor.client.Client,), {"_send": staticmethod(send)})


def pyzor_query(digest: str, address: tuple[str, int], timeout: float) -> tuple[int, int]:
    """A real Pyzor CHECK over UDP, anonymous, as the pyzor command sends it."""
    response = _client_class()(timeout=timeout).check(digest, address)
    if not response.is_ok():
        raise PyzorError(f"code {response.get_code()}: {response.get_diag()}")
    try:
        return int(response["Count"]), int(response["WL-Count"])
    except (KeyError, TypeError, ValueError):
        raise PyzorError("answer without Count and WL-Count") from None


def parse_server(server: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def is_hit(count: int, wl_count: int, scoring: Mapping[str, float]) -> bool:
    """SpamAssassin's Pyzor rule (Plugin/Pyzor.pm, check_pyzor): reported at least `count_min` times
    and not whitelisted, where whitelisted means at least `whitelist_min` whitelistings and at least
    `whitelist_factor` times the spam count of them."""
    if count >= COUNT_LIMIT or wl_count >= WL_COUNT_LIMIT:
        return False
    wl_limit = count * scoring["whitelist_factor"] if wl_count >= scoring["whitelist_min"] else 0
    if wl_limit and wl_count >= wl_limit:
        return False
    return count >= scoring["count_min"]


@register(
    name="pyzor",
    bypass="bypass_spam_checks",
    settings=PyzorSettings,
    order=80,
    scores={"pyzor": SCORES},
    build=lambda s, runtime: PyzorCheck(
        s.servers, s.timeout, s.max_size, runtime.scores("pyzor"), cache=TtlCache(s.cache_ttl, s.cache_entries)
    ),
)
class PyzorCheck(Check):
    def __init__(
        self,
        servers: Sequence[str],
        timeout: float,
        max_size: int,
        scoring: Mapping[str, float],
        query: Query = pyzor_query,
        cache: TtlCache[Counts] | None = None,
    ):
        self.servers = tuple(servers)
        self.timeout = timeout
        self.max_size = max_size
        self.scoring = dict(scoring)
        self.query = query
        self.cache: TtlCache[Counts] = (
            cache if cache is not None else TtlCache(PyzorSettings.cache_ttl, PyzorSettings.cache_entries)
        )
        _client_class()  # pyzor, loaded when the engine is built, not by the first message

    def run(self, message: Message) -> Finding:
        deadline = time.monotonic() + message.time_left(self.timeout)
        view = message.truncated(self.max_size)  # in memory: the header section and max_size at most
        with view.open() as stream:
            raw = stream.read()
        try:
            key = digest(raw)
        except Exception as e:  # pyzor walks any MIME it is given; a malformed one must not escape
            return self.finding("error", detail=printable(f"digest: {e}", 300))
        counts = self.cache.get(key)
        cached = counts is not None
        if counts is None:
            counts, failure = self._ask(key, deadline)
            if counts is None:
                return failure
            self.cache.put(key, counts)
        detail = f"count {counts.count}, whitelisted {counts.wl_count} ({counts.server}{', cached' if cached else ''})"
        if view.truncated:
            detail += f"; {view.note('digested')}"
        if is_hit(counts.count, counts.wl_count, self.scoring):
            points = self.scoring["points"]
            return self.finding("ok", score=points, symbols=((TEST, points),), detail=detail)
        return self.finding("ok", detail=detail)

    def _ask(self, key: str, deadline: float) -> tuple[Counts | None, Finding]:
        """The first server's answer that comes within the deadline, or the finding that says why none did."""
        import pyzor

        failures, timeouts = [], 0
        for i, server in enumerate(self.servers):
            # A share of what is left, so a server that is down cannot eat the next one's turn.
            left = (deadline - time.monotonic()) / (len(self.servers) - i)
            if left <= 0:
                failures.append(f"{server}: not asked, no time left")
                timeouts += 1
                continue
            try:
                count, wl_count = self.query(key, parse_server(server), left)
            except pyzor.TimeoutError:
                failures.append(f"{server}: no answer in {left:.2g} s")
                timeouts += 1
                continue
            except (pyzor.CommError, PyzorError, OSError, ValueError) as e:
                failures.append(f"{server}: {e}")
                continue
            return Counts(count, wl_count, server), self.finding("ok")
        status = "timeout" if failures and timeouts == len(failures) else "unavailable"
        return None, self.finding(status, detail=printable("; ".join(failures) or "no servers", 500))


def report(raw: bytes, servers: Sequence[str], timeout: float, *, spam: bool) -> list[str]:
    """Tell every server the message is spam (pyzor's report) or ham (its whitelist); the failures, one per server."""
    import pyzor

    key = digest(raw)
    client = _client_class()(timeout=timeout)
    failures = []
    for server in servers:
        try:
            address = parse_server(server)
            response = client.report(key, address) if spam else client.whitelist(key, address)
        except (pyzor.CommError, OSError, ValueError) as e:
            failures.append(printable(f"{server}: {e}"))
            continue
        if not response.is_ok():
            failures.append(printable(f"{server}: code {response.get_code()}: {response.get_diag()}"))
    return failures
