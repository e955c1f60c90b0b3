"""ClamAV through clamd's INSTREAM, streamed from the spool; a list of sockets is a failover pool.

clamd unpacks MIME and archives itself, so the raw message is all it needs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

from ..findings import Finding
from ..message import CHUNK, Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register


@dataclass(frozen=True)
class ClamavSettings:
    enabled: bool = True
    critical: bool = True  # cannot answer: the message is UNCHECKED (then scanner_failure decides)
    # a unix socket path or "tcp:HOST:PORT"; a list is a failover pool
    socket: tuple[str, ...] = field(default=("/run/clamav/clamd.ctl",), metadata=POSITIVE)
    timeout: float = field(default=30.0, metadata=POSITIVE)
    # clamd's StreamMaxLength default: clamd refuses larger streams, so larger mail is UNCHECKED
    max_size: int = field(default=25 * 1024 * 1024, metadata=POSITIVE)


class _Instream:
    """The clamd package's INSTREAM sends 1 KiB chunks with send() (which may write less than asked);
    this one streams 64 KiB chunks with sendall() and lets socket timeouts through as TimeoutError."""

    def scan_stream(self, stream) -> str:
        self._init_socket()
        sock = self.clamd_socket
        try:
            sock.sendall(b"nINSTREAM\n")
            try:
                while chunk := stream.read(CHUNK):
                    sock.sendall(struct.pack("!L", len(chunk)) + chunk)
                sock.sendall(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # clamd hung up early (StreamMaxLength): its reply says why
            with sock.makefile("rb") as reply:
                return reply.readline(4096).decode("utf-8", "replace").strip()
        finally:
            self._close_socket()


@cache
def _scanner_classes() -> tuple[type, type]:
    """Our INSTREAM on the clamd package's unix and TCP clients (made once, when the check first scans)."""
    import clamd

    return type("UnixScanner", (_Instream, clamd.ClamdUnixSocket), {}), type(
        "TcpScanner", (_Instream, clamd.ClamdNetworkSocket), {}
    )


def scanner(address: str, timeout: float):
    """`tcp:HOST:PORT` or a unix socket path."""
    unix, tcp = _scanner_classes()
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return tcp(host.strip("[]"), int(port), timeout)
    return unix(address, timeout)


@register(
    name="clamav",
    bypass="bypass_virus_checks",
    settings=ClamavSettings,
    order=10,
    build=lambda s, _: ClamavCheck(s.socket, s.timeout, s.max_size),
)
class ClamavCheck(Check):
    def __init__(self, addresses: Sequence[str], timeout: float, max_size: int = 25 * 1024 * 1024):
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.max_size = max_size
        _scanner_classes()  # the clamd package, loaded when the engine is built, not by the first message

    def run(self, message: Message) -> Finding:
        import clamd

        if message.size > self.max_size:  # clamd would cut the stream off: say so instead of retrying forever
            return self.finding("unchecked", detail=f"larger than max_size ({message.size} > {self.max_size} bytes)")
        failures = []
        for address in self.addresses:
            timeout = message.time_left(self.timeout)
            clam = scanner(address, timeout)  # per scan: the clamd package keeps the socket on the object
            try:
                with message.open() as stream:
                    line = clam.scan_stream(stream)
            except clamd.ConnectionError as e:  # cannot connect: try the next in the pool
                failures.append(str(e))
                continue
            except TimeoutError:
                return self.finding("timeout", detail=f"{address}: no answer in {timeout:g}s")
            except OSError as e:
                failures.append(f"{address}: {e.strerror or e}")
                continue
            try:
                _, virus, status = clam._parse_response(line)
            except clamd.ResponseError:
                return self.finding("error", detail=printable(f"{address}: {line or 'empty reply'}"))
            if status == "FOUND":
                return self.finding("ok", virus_scanned=True, viruses=(printable(virus, 100),))
            if status == "OK":
                return self.finding("ok", virus_scanned=True)
            return self.finding("error", detail=printable(f"{address}: {line}"))
        return self.finding("unavailable", detail=printable("; ".join(failures), 500))
