"""A private unbound for `make bench`: DKIM, SPF and DMARC look up names at a real DNS server's cost.

The tests' Python DNS server (tests/dnsserver.py) is right for tests, but in a benchmark it spends
Python CPU on the same two cores as everything measured. unbound (Debian's package) answers the
bench's records from `local-data`, as a caching resolver answers from its cache; every other name
falls in `local-zone: "." static` and gets NXDOMAIN at once, so nothing is ever asked of another
server and no packet leaves 127.0.0.1. One thread, no DNSSEC validation (no trust anchor to fetch),
no remote control; it runs in the foreground under tests.daemons' reaper, in its own directory, on a
free loopback port, and `daemons.stop_all()` stops it by PID like the other daemons.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import DNSRecord

from tests import daemons

UNBOUND = "/usr/sbin/unbound"

_CONF = """\
server:
    interface: 127.0.0.1
    port: {port}
    do-ip6: no
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{workdir}"
    pidfile: "{workdir}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    log-queries: no
    num-threads: 1
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    # Authoritative for everything we know, NXDOMAIN for the rest: unbound never recurses.
    local-zone: "." static
{data}
remote-control:
    control-enable: no
"""


@dataclass(frozen=True)
class Unbound(daemons._Managed):
    """A running private unbound on 127.0.0.1:port (UDP and TCP)."""

    port: int
    pid: int
    log: Path
    config: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def _quote(value: str) -> str:
    """A TXT value as unbound's local-data wants it: 255-byte character-strings, each quoted."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + chunk.replace("\\", "\\\\").replace('"', '\\"') + '"' for chunk in chunks)


def local_data(records: dict[str, list[tuple[str, str]]]) -> str:
    """`local-data` lines for {name: [(TYPE, value), ...]}; TXT values are quoted and split, others as given."""
    lines = []
    for name, rrs in records.items():
        for rtype, value in rrs:
            rdata = _quote(value) if rtype.upper() == "TXT" else value
            lines.append(f"    local-data: '{name} 300 IN {rtype.upper()} {rdata}'")
    return "\n".join(lines)


def _answers(port: int) -> bool:
    for tcp in (True, False):
        DNSRecord.parse(DNSRecord.question("ready.invalid.").send("127.0.0.1", port, tcp=tcp, timeout=1))
    return True


def start_unbound(workdir: Path, records: dict[str, list[tuple[str, str]]], timeout: float = 20) -> Unbound:
    """Start unbound serving `records` on a free loopback port; returns once it answers over UDP and TCP."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = daemons.free_port()
    config = workdir / "unbound.conf"
    config.write_text(_CONF.format(port=port, workdir=workdir, data=local_data(records)))
    check = subprocess.run(["unbound-checkconf", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"unbound-checkconf {config}: {check.stdout}{check.stderr}")
    proc, pid, out = daemons._spawn([UNBOUND, "-d", "-c", str(config)], workdir, "unbound")
    d = Unbound(port=port, pid=pid, log=out, config=config, proc=proc, out=out)._register()
    try:
        daemons._wait(lambda: _answers(port), f"unbound answers on 127.0.0.1:{port}", timeout, proc, [out])
    except BaseException:
        d.stop()
        raise
    return d
