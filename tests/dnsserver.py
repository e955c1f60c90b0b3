"""An authoritative DNS server on loopback for the DKIM, SPF and DMARC tests, and its test-side API.

Run as ``python -m tests.dnsserver --port PORT --zone ZONE.json``; it serves UDP and TCP on
127.0.0.1 from a JSON zone ``{"name.": [["TXT", "v=spf1 -all"], ["A", "192.0.2.1"], ...]}``
(names absolute and case-insensitive, TTL 300, TXT values split into 255-byte character-strings).
Two pseudo types make failure tests possible: ``["SERVFAIL", ""]`` answers SERVFAIL for every query
for that name and ``["TIMEOUT", ""]`` never answers. SIGHUP re-reads the zone and logs a ``zone ``
line, which is what ``Dns.update()`` waits for.

It behaves like a real authoritative server where the checks can tell: AA set and RA clear,
NXDOMAIN for unknown names but NODATA for known names without the type and for empty non-terminals
(``_domainkey.example.`` when ``sel._domainkey.example.`` exists), CNAMEs followed inside the
zone, and a UDP answer larger than 512 bytes (or than the client's EDNS payload) truncated with TC
set, the question kept, so the client retries over TCP. dnslib's own truncation drops the question
section, which dnspython rejects as not a response to its query.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import EDNS0, QTYPE, RCODE, RR, TXT, DNSHeader, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

from tests import daemons

__all__ = ["Dns", "start_dns"]

ROOT = Path(__file__).resolve().parent.parent
TTL = 300
UDP_LIMIT = 512  # without EDNS, as RFC 1035
FAILURES = ("SERVFAIL", "TIMEOUT")
MAX_CNAMES = 8


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Zone:
    records: dict[str, list[RR]]  # by lower-case name
    failures: dict[str, str]  # name -> SERVFAIL or TIMEOUT
    names: frozenset[str]  # every name that exists, empty non-terminals included


def _parse_zone(data: dict[str, list[list[str]]]) -> _Zone:
    """The JSON zone as dnslib records; ValueError names the first malformed name or record."""
    records: dict[str, list[RR]] = {}
    failures: dict[str, str] = {}
    for name, rrs in data.items():
        if not name.endswith("."):
            raise ValueError(f"zone name {name!r} is not absolute (no trailing dot)")
        key = name.lower()
        records.setdefault(key, [])
        for record in rrs:
            try:
                rtype, value = record
                rtype = rtype.upper()
                if rtype in FAILURES:
                    failures[key] = rtype
                elif rtype == "TXT":
                    raw = value.encode()
                    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
                    records[key].append(RR(name, QTYPE.TXT, rdata=TXT(chunks), ttl=TTL))
                else:
                    records[key].extend(RR.fromZone(f"{name} {TTL} IN {rtype} {value}"))
            except Exception as e:  # dnslib raises DNSError, IndexError, ValueError...: one kind for the caller
                raise ValueError(f"bad record {record!r} for {name}: {type(e).__name__}: {e}") from e
    names = set()
    for name in records:
        labels = name.split(".")
        names.update(".".join(labels[i:]) for i in range(len(labels) - 1))
    return _Zone(records, failures, frozenset(names))


class _Resolver:
    """Answers from the current zone; reload() swaps it whole, so a query sees one zone or the other."""

    def __init__(self, path: Path):
        """A bad zone at start is fatal (start_dns reports the traceback); on reload it only logs."""
        self.path = path
        self.zone = self._load()

    def _load(self) -> _Zone:
        zone = _parse_zone(json.loads(self.path.read_text()))
        print(f"zone loaded: {len(zone.records)} names from {self.path}", flush=True)
        return zone

    def reload(self) -> None:
        try:
            self.zone = self._load()
        except Exception as e:  # any bad zone: keep serving the old one, the waiter reads why
            print(f"zone reload failed: {type(e).__name__}: {e}", flush=True)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord | None:
        """The reply, or None for a TIMEOUT name."""
        zone = self.zone
        reply = request.reply(ra=0, aa=1)
        name, qtype = str(request.q.qname).lower(), request.q.qtype
        for _ in range(MAX_CNAMES):
            failure = zone.failures.get(name)
            if failure == "TIMEOUT":
                return None
            if failure == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if name not in zone.names:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            rrs = zone.records.get(name, [])
            answer = [rr for rr in rrs if qtype in (rr.rtype, QTYPE.ANY)]
            cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if answer or not cnames:
                reply.add_answer(*answer)
                return reply
            reply.add_answer(*cnames)
            name = str(cnames[0].rdata.label).lower()
        reply.header.rcode = RCODE.SERVFAIL  # CNAME loop
        return reply


class _NoReply(Exception):
    """The zone says TIMEOUT for this name (not a DNSError, so dnslib's handler lets it through)."""


class _Handler(DNSHandler):
    """dnslib's handler with real truncation, EDNS payload sizes and silent TIMEOUT names."""

    def handle(self) -> None:
        try:
            super().handle()
        except _NoReply:
            if self.protocol == "tcp":  # hold the connection, as a hung server would, until the client gives up
                self.request.settimeout(60)
                try:
                    while self.request.recv(4096):
                        pass
                except OSError:
                    pass

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        self.server.logger.log_request(self, request)
        reply = self.server.resolver.resolve(request, self)
        if reply is None:
            self.server.logger.logf(f"No reply: ({self.protocol}) / '{request.q.qname}' (TIMEOUT)")
            raise _NoReply
        opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        limit = max(UDP_LIMIT, opt[0].rclass) if opt else UDP_LIMIT
        if opt:
            reply.add_ar(EDNS0(udp_len=limit))
        self.server.logger.log_reply(self, reply)
        rdata = reply.pack()
        if self.protocol == "udp" and len(rdata) > limit:
            truncated = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1), q=reply.q)
            self.server.logger.log_truncated(self, truncated)
            rdata = truncated.pack()
        return rdata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--zone", type=Path, required=True, help="JSON zone file, re-read on SIGHUP")
    args = parser.parse_args()
    resolver = _Resolver(args.zone)
    signal.signal(signal.SIGHUP, lambda *_: resolver.reload())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logger = DNSLogger(prefix=False, logf=lambda line: print(line, flush=True))
    for tcp in (False, True):  # UDP bound first: once TCP answers, UDP is ready too
        DNSServer(
            resolver, port=args.port, address=args.address, tcp=tcp, logger=logger, handler=_Handler
        ).start_thread()
    while True:
        signal.pause()


# --------------------------------------------------------------------------- test-side API


@dataclass(frozen=True)
class Dns(daemons._Managed):
    """A running tests.dnsserver on 127.0.0.1:port (UDP and TCP) serving zone_path."""

    port: int
    pid: int
    log: Path
    zone_path: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def update(self, records: dict[str, list[list[str]]], timeout: float = 10) -> None:
        """Merge records into the zone (a name given replaces that name's records) and return once served.

        Waits for the server's reload log line, not a fixed time; raises RuntimeError if it rejected the zone.
        """
        given = {name.lower() for name in records}
        zone = {k: v for k, v in json.loads(self.zone_path.read_text()).items() if k.lower() not in given}
        zone.update(records)
        _parse_zone(zone)  # a bad record raises here, before the file has it
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone, indent=1))
        tmp.rename(self.zone_path)  # the server never reads half a file
        before = len(self._reloads())
        os.kill(self.pid, signal.SIGHUP)
        daemons._wait(lambda: len(self._reloads()) > before, "the zone reload", timeout, self.proc, [self.log])
        last = self._reloads()[-1]
        if not last.startswith("zone loaded"):
            raise RuntimeError(f"{self.zone_path}: {last}")

    def _reloads(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith("zone ")]


def _answers(port: int) -> bool:
    for tcp in (True, False):
        DNSRecord.parse(DNSRecord.question("ready.invalid.").send("127.0.0.1", port, tcp=tcp, timeout=1))
    return True


def start_dns(workdir: Path, zone: dict[str, list[list[str]]] | None = None, timeout: float = 10) -> Dns:
    """Start the server on a free port with zone (default empty) in workdir/zone.json; returns once it answers."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    zone_path = workdir / "zone.json"
    zone_path.write_text(json.dumps(zone or {}, indent=1))
    port = daemons.free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-u", "-m", "tests.dnsserver", "--port", str(port), "--zone", str(zone_path)]
    proc, pid, out = daemons._spawn(argv, workdir, "dnsserver", env=env)
    d = Dns(port=port, pid=pid, log=out, zone_path=zone_path, proc=proc, out=out)._register()
    try:
        daemons._wait(lambda: _answers(port), f"DNS answers on 127.0.0.1:{port}", timeout, proc, [out])
    except BaseException:
        d.stop()
        raise
    return d


if __name__ == "__main__":
    main()
