"""`make bench`: milterd beside Postfix alone and amavisd-new, on the same clamd and SpamAssassin, in one run.

One private Postfix relays everything to smtp-sink; each configuration has its own smtpd listener, and every
one of them gets its mail from the same load generator (Python smtplib threads):
  plain          Postfix alone: the ceiling of the checks-off rows
  noop_pymilter  a pymilter milter with milterd's callbacks that does nothing: the protocol's floor
  off_inet       milterd, every check off (clamd, spamd, banned, headers, DKIM/SPF/DMARC), inet:   (framework cost)
  off_unix       the same over a unix socket
  ceiling        Postfix + bench/ceiling_milter.py, a minimal milter that only streams each message to clamd
                 (INSTREAM) and spamd (REPORT): the fair ceiling of `clamd+spamd`, same client and path
  clamd+spamd    milterd with clamd and spamd only (banned, headers, DKIM, SPF, DMARC off): set against `ceiling`
  every check    milterd with every check it has: clamd, spamd, banned files, bad headers, DKIM, SPF, DMARC
                 (a private unbound answers; see DNS_RECORDS): set against `amavis`
  amavis         content_filter to amavisd-new (clamd + SpamAssassin in-process), reinjected on a second smtpd
  backends       informational, no MTA and no SMTP: clamd INSTREAM then spamd REPORT per message, driven
                 from this process with milterd's own clients
Runs are interleaved (A B C ... A B C) and the tables show medians. Every message is unique. A run
counts a message when its fate is settled: delivered at the sink, refused at SMTP, or dropped by
amavis (its log says Blocked); anything else after the drain timeout is reported as LOST.
Each run also reads every process group's CPU (utime+stime of the process tree, reaped children
included, from /proc) before and after, so the report says who spent the CPU of each message.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import corpus
from bench.amavis import postfix_master_lines, start_amavis
from bench.unbound import start_unbound
from milterd.checks import build_checks
from milterd.config import load_config
from milterd.message import Envelope, Message, Spool
from tests import daemons
from tests.conftest import start_milterd, stop_milterd, write_config

MTA_CONFIGS = ("plain", "noop_pymilter", "off_inet", "off_unix", "ceiling", "clamd_spamd", "every_check", "amavis")
CONFIGS = (*MTA_CONFIGS, "backends")
SLOW = ("ceiling", "clamd_spamd", "every_check", "amavis", "backends")  # configurations that run SpamAssassin
LABEL = {"clamd_spamd": "clamd+spamd", "every_check": "every check"}  # Postfix listener names must be identifiers
BASE = {  # the ratio each row's cells show: what it is set against
    "noop_pymilter": "plain",
    "off_inet": "plain",
    "off_unix": "plain",
    "clamd_spamd": "ceiling",
    "every_check": "amavis",
}
GROUPS = ("postfix", "filter", "clamd", "spamd", "dns", "client", "sink")  # CPU tables' columns, then "rest"
# The remote MTA the load generator claims to be (XCLIENT; TEST-NET-1, an address no packet goes to), and
# what `every check` finds in DNS for it: its envelope domain and HELO name publish SPF (a pass for it), the
# domain DMARC. The real mix's other From domains get NXDOMAIN from unbound, as unknown names do.
SENDER_DOMAIN = corpus.SENDER.rpartition("@")[2]
CLIENT_IP, CLIENT_NAME = "192.0.2.10", f"mail.{SENDER_DOMAIN}"
XCLIENT = f"ADDR={CLIENT_IP} NAME={CLIENT_NAME} HELO={CLIENT_NAME}"
DNS_RECORDS = {
    f"{SENDER_DOMAIN}.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    f"{CLIENT_NAME}.": [("A", CLIENT_IP), ("TXT", "v=spf1 a -all")],
    f"_dmarc.{SENDER_DOMAIN}.": [("TXT", f"v=DMARC1; p=none; rua=mailto:dmarc@{SENDER_DOMAIN}")],
}
CHILDREN = 5  # spamd children = amavis children: the same SpamAssassin parallelism for both
POLICY = {"destiny": {"virus": "REJECT", "banned": "REJECT", "spam": "REJECT"}}  # amavis: D_DISCARD, no bounce
RESULTS = Path(__file__).resolve().parent.parent / ".run"


@dataclass
class Run:
    rate: float  # settled messages per second
    p50: float  # ms per SMTP transaction (per message for `backends`)
    p99: float
    cpu_ms: float  # whole-machine CPU per settled message
    codes: Counter
    lost: int
    groups: dict[str, float] = field(default_factory=dict)  # CPU ms per settled message, by process group


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.runs)

    def median_group(self, group: str) -> float | None:
        values = [r.groups[group] for r in self.runs if group in r.groups]
        return statistics.median(values) if values else None


_SINK_COUNT = re.compile(rb"mesg=(\d+)")


class Sink:
    """smtp-sink counting completed DATA commands (`-c` writes "... mesg=N ..." to its output each time)."""

    def __init__(self, workdir: Path):
        self.port = daemons.free_port()
        self.proc, self.pid, self.out = daemons._spawn(
            ["/usr/sbin/smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"], workdir, "smtp-sink"
        )
        daemons.wait_for_port("127.0.0.1", self.port, 10, self.proc, logs=[self.out])

    def count(self) -> int:
        with open(self.out, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200))
            counts = _SINK_COUNT.findall(f.read())
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        daemons._terminate(self.proc, self.pid, [self.out])


def machine_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds: utime + stime + cutime + cstime) for every process, one /proc scan.

    The children's part (cutime, cstime: what a process' reaped children spent) keeps a tree's sum
    right when an smtpd or a spamd child exits during a run: its CPU moves to the parent that reaps it."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / _TICK)
    return table


def _thread_cpu(tid: int) -> float:
    """utime + stime of one thread of this process."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds of each process group: the trees under the given roots, and `client` (this process
    without its memory sampler thread: the load generator, and for `backends` the clamd/spamd clients)."""

    def __init__(self, roots: dict[str, list[int]], sampler_tid: Callable[[], int | None]):
        self.roots, self.sampler_tid = roots, sampler_tid

    def snapshot(self, groups: dict[str, str]) -> dict[str, float]:
        """{group: CPU seconds so far}; `groups` maps a column to the root name measured for it."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out = {}
        for column, name in groups.items():
            total, todo, seen = 0.0, list(self.roots[name]), set()
            while todo:
                pid = todo.pop()
                if pid in seen or pid not in table:
                    continue
                seen.add(pid)
                total += table[pid][1]
                todo += children.get(pid, [])
            out[column] = total
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tid = self.sampler_tid()
        out["client"] = (int(fields[11]) + int(fields[12])) / _TICK - (_thread_cpu(tid) if tid else 0.0)
        return out


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


class MemorySampler(threading.Thread):
    """Peak PSS of each watched process tree, sampled twice a second (the kernel keeps no peak PSS)."""

    def __init__(self, roots: dict[str, int]):
        super().__init__(daemon=True)
        self.roots, self.peak = roots, dict.fromkeys(roots, 0.0)
        self.stopped = threading.Event()
        self.tid: int | None = None

    def run(self) -> None:
        self.tid = threading.get_native_id()
        while not self.stopped.wait(0.5):
            for name, root in self.roots.items():
                self.peak[name] = max(self.peak[name], pss_mb(tree_pids(root)))


def run_load(
    send: Callable[[bytes], int],
    samples: list[corpus.Sample],
    count: int,
    concurrency: int,
    settled: Callable[[], int] | None,
    timeout: float,
    cpu: Callable[[], dict[str, float]] = dict,
) -> Run:
    """Send `count` unique messages from `concurrency` clients, then wait until each one's fate is settled.

    `send` returns the reply code (250 accepted); `settled()` counts messages accepted earlier whose
    fate is now known (delivered, or dropped by the filter); None when `send` itself settles them.
    `cpu()` gives each process group's CPU seconds so far; the run reports the difference per message.
    """
    latencies, codes, lock = [], Counter(), threading.Lock()
    numbers = iter(range(count))

    def client() -> None:
        for n in numbers:
            raw = corpus.unique(samples[n % len(samples)].raw, "mtok_" + uuid.uuid4().hex)
            t0 = time.perf_counter()
            code = send(raw)
            with lock:
                latencies.append(time.perf_counter() - t0)
                codes[code] += 1

    groups0 = cpu()
    cpu0, start = machine_cpu_seconds(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = codes[250]
    if settled is None:
        settled = lambda: accepted  # noqa: E731
    while settled() < accepted and time.perf_counter() - start < timeout:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    machine = machine_cpu_seconds() - cpu0
    groups1 = cpu()
    done = min(settled(), accepted) + count - accepted
    per_message = {group: (groups1[group] - seconds) / max(1, done) * 1000 for group, seconds in groups0.items()}
    if per_message:
        per_message["rest"] = machine / max(1, done) * 1000 - sum(per_message.values())
    latencies.sort()
    return Run(
        rate=done / elapsed,
        p50=latencies[len(latencies) // 2] * 1000,
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        cpu_ms=machine / max(1, done) * 1000,
        codes=codes,
        lost=count - done,
        groups=per_message,
    )


def settled_counter(sink: Sink, amavis=None) -> Callable[[], int]:
    """Messages settled since now: delivered at the sink, plus those amavis dropped (its log says Blocked)."""
    sink0 = sink.count()
    blocked0 = amavis.outcomes()["Blocked"] if amavis else 0

    def settled() -> int:
        return sink.count() - sink0 + (amavis.outcomes()["Blocked"] - blocked0 if amavis else 0)

    return settled


def smtp_sender(port: int, timeout: float) -> Callable[[bytes], int]:
    """One SMTP transaction per message. The connection comes from 127.0.0.1, and XCLIENT makes Postfix (and
    so the milter, and amavis through XFORWARD) see a remote sender's MTA instead: milterd checks no SPF or
    DMARC for a loopback client (its own host). Every row goes this way, so every row pays the extra command."""

    def send(raw: bytes) -> int:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
                smtp.ehlo()
                code, reply = smtp.docmd("XCLIENT", XCLIENT)
                if code != 220:
                    raise smtplib.SMTPResponseException(code, reply)
                smtp.ehlo(CLIENT_NAME)  # XCLIENT starts a new session: greet again, as the remote MTA
                smtp.sendmail(corpus.SENDER, [corpus.RECIPIENT], raw)
            return 250
        except smtplib.SMTPResponseException as e:
            return e.smtp_code
        except smtplib.SMTPRecipientsRefused as e:
            return next(iter(e.recipients.values()))[0]
        except (OSError, smtplib.SMTPException):
            return 0  # connection failed or dropped: counted, never silently

    return send


def backend_sender(config: Path) -> Callable[[bytes], int]:
    """clamd then spamd on one message, the order milterd uses (no SpamAssassin run for a virus)."""
    settings = load_config(config)
    checks = {check.name: check for check in build_checks(settings)}
    clamav, spamd = checks["clamav"], checks["spamd"]
    envelope = Envelope(mail_from=corpus.SENDER, rcpts=(corpus.RECIPIENT,), client_ip="127.0.0.1")

    def send(raw: bytes) -> int:
        spool = Spool(settings.milter.spool_threshold, settings.milter.spool_dir)
        spool.write(raw)
        message = Message(envelope, spool)
        try:
            virus = clamav.run(message)
            if virus.failed:
                return 451
            if virus.viruses:
                return 554
            return 451 if spamd.run(message).failed else 250
        finally:
            spool.close()

    return send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, concurrency 1 and 10, fewer messages")
    args = parser.parse_args()
    repetitions, levels = (1, (1, 10)) if args.quick else (3, (1, 10, 50))
    fast_count = {1: 150, 10: 300, 50: 500} if args.quick else {1: 250, 10: 500, 50: 800}
    # Five rows run SpamAssassin (three before the ceiling and the split): fewer of their messages per run
    # keep `make bench` near its old length, about 12 minutes when nothing else loads the machine.
    slow_count = {1: 20, 10: 40, 50: 100} if args.quick else {1: 20, 10: 50, 50: 100}
    mixes = {"real": corpus.real_mix(), "synthetic": corpus.synthetic()}
    began = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="milterd-bench-"))
    daemons.make_traversable(work)
    helpers, milterds = {}, {}
    try:
        clamd = daemons.start_clamd(work / "clamd")
        spamd = daemons.start_spamd(work / "spamd", children=CHILDREN)
        sink = Sink(work)
        resolver = start_unbound(work / "unbound", DNS_RECORDS)  # DKIM, SPF, DMARC: nothing leaves the machine
        milterd_configs = (  # name, checks on, DNS checks on, unix socket
            ("off_inet", (), False, False),
            ("off_unix", (), False, True),
            ("clamd_spamd", ("clamav", "spamd"), False, False),
            ("every_check", ("clamav", "spamd", "banned", "headers"), True, False),
        )
        for name, checks_on, dns_on, unix in milterd_configs:
            config = write_config(
                work / name,
                clamav=str(clamd.socket_path),
                spamd=f"127.0.0.1:{spamd.port}",
                policy=POLICY,
                dns=resolver.nameserver if dns_on else None,  # without one, DKIM, SPF and DMARC are off
            )
            text = config.read_text()
            for check in ("clamav", "spamd"):
                if check not in checks_on:
                    text = text.replace(f"[{check}]\n", f"[{check}]\nenabled = false\n")
            for check in ("banned", "headers"):
                if check not in checks_on:
                    text += f"[{check}]\nenabled = false\n"
            config.write_text(text)
            milterds[name] = start_milterd(config, unix=work / f"{name}.sock" if unix else None)
        kill_level = tomllib.loads((work / "clamd_spamd" / "rules" / "policy.toml").read_text())["kill_level"]
        helper_argv = {  # module, then the arguments after the socket
            "noop_pymilter": ["bench.noop_milter"],
            "ceiling": ["bench.ceiling_milter", str(clamd.socket_path), f"127.0.0.1:{spamd.port}", str(kill_level)],
        }
        helper_ports = {}
        for name, (module, *rest) in helper_argv.items():
            helper_ports[name] = daemons.free_port()
            argv = [sys.executable, "-m", module, f"inet:{helper_ports[name]}@127.0.0.1", *rest]
            helpers[name] = subprocess.Popen(argv)
            daemons.wait_for_port("127.0.0.1", helper_ports[name], 20, helpers[name])

        amavis_front, reinject = daemons.free_port(), daemons.free_port()
        amavis = start_amavis(
            work / "amavis",
            clamd_socket=clamd.socket_path,
            sa_siteconfig=spamd.siteconfig,
            forward_port=sink.port,
            children=CHILDREN,
        )
        listeners = {
            "plain": None,
            **{name: f"inet:127.0.0.1:{port}" for name, port in helper_ports.items()},
            **{name: m.socket for name, m in milterds.items()},
        }
        postfix = daemons.start_postfix(
            work / "postfix",
            listeners,
            extra_main_cf={
                "virtual_mailbox_domains": "",
                "relayhost": f"[127.0.0.1]:{sink.port}",
                "mynetworks": f"127.0.0.0/8 {CLIENT_IP}/32",  # the XCLIENT address may relay, as 127.0.0.1 did
                "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                "message_size_limit": str(100 * 1024 * 1024),
                "default_process_limit": "200",
            },
            extra_master_cf=postfix_master_lines(amavis_front, amavis.port, reinject, CHILDREN),
        )
        daemons.wait_for_listen(amavis_front, 20, postfix.proc, pid=postfix.pid, logs=[postfix.log])
        ports = dict(postfix.ports, amavis=amavis_front)
        sampler = MemorySampler(
            {
                **{f"milterd {LABEL.get(name, name)}": m.proc.pid for name, m in milterds.items()},
                **{name: p.pid for name, p in helpers.items()},
                "amavis": amavis.pid,
                "spamd": spamd.pid,
                "clamd": clamd.pid,
                "unbound": resolver.pid,
            }
        )
        sampler.start()
        # Process trees by their outermost process: the reaper wrapper for the daemons, so nothing that
        # exits during a run takes its CPU with it.
        meter = CpuMeter(
            {
                "postfix": [postfix.proc.pid],
                "clamd": [clamd.proc.pid],
                "spamd": [spamd.proc.pid],
                "dns": [resolver.proc.pid],
                "sink": [sink.proc.pid],
                "amavis": [amavis.proc.pid],
                **{name: [m.proc.pid] for name, m in milterds.items()},
                **{name: [p.pid] for name, p in helpers.items()},
                "none": [],
            },
            lambda: sampler.tid,
        )

        senders = {name: smtp_sender(ports[name], 300) for name in MTA_CONFIGS}
        senders["backends"] = backend_sender(work / "clamd_spamd" / "milterd.toml")
        results: dict[tuple[str, str, int], Cell] = {}
        for concurrency in levels:
            for _ in range(repetitions):
                for mix, samples in mixes.items():
                    for name, send in senders.items():
                        postfix.wait_queue_empty(300)
                        settled = (
                            None if name == "backends" else settled_counter(sink, amavis if name == "amavis" else None)
                        )
                        count = (slow_count if name in SLOW else fast_count)[concurrency]
                        groups = {g: g for g in GROUPS if g not in ("filter", "client")}
                        groups["filter"] = name if name in meter.roots else "none"
                        run = run_load(
                            send, samples, count, concurrency, settled, 300, cpu=lambda g=groups: meter.snapshot(g)
                        )
                        results.setdefault((mix, name, concurrency), Cell()).runs.append(run)
                        print(
                            f"{mix:<9} {LABEL.get(name, name):<13} c={concurrency:<2} {run.rate:7.1f}/s"
                            f" p50 {run.p50:6.1f} ms p99 {run.p99:6.1f} ms cpu {run.cpu_ms:5.1f} ms/msg"
                            f" ({' '.join(f'{g} {ms:.1f}' for g, ms in run.groups.items())}) {dict(run.codes)}"
                            + (f" LOST {run.lost}" if run.lost else ""),
                            flush=True,
                        )
        full_pid = milterds["every_check"].proc.pid
        rss_after_load = peak_rss_mb(full_pid)
        large = large_message_run(postfix.ports["every_check"], full_pid)
        sampler.stopped.set()
        sampler.join()
        report = render(
            results, levels, repetitions, sampler.peak, rss_after_load, large, time.perf_counter() - began, args.quick
        )
        print(report)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / ("bench-quick.md" if args.quick else "bench.md")).write_text(report)
    finally:
        for helper in helpers.values():
            helper.kill()
            helper.wait()
        stop_milterd(*milterds.values())
        daemons.stop_all()


def large_message_run(port: int, pid: int) -> dict:
    """One 50 MB message through milterd with checks on: its peak RSS must not move (the spool is on disk)."""
    before = peak_rss_mb(pid)
    t0 = time.perf_counter()
    code = smtp_sender(port, 600)(corpus.unique(corpus.large_message(50 * 1024 * 1024), "mtok_" + uuid.uuid4().hex))
    return {"code": code, "seconds": time.perf_counter() - t0, "before": before, "after": peak_rss_mb(pid)}


def render(results, levels, repetitions, peak_pss, rss_after_load, large, seconds, quick) -> str:
    """The Markdown the README carries: one table per mix, then who spent the CPU, then memory, then every
    target met or missed."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [
        f"`make {'bench-quick' if quick else 'bench'}`, {datetime.date.today()}, {os.cpu_count()} × {cpu},"
        f" {platform.system()} {platform.release()}, {repetitions} interleaved repetition(s), medians;"
        f" took {seconds / 60:.1f} min.",
        "",
        "Cells: settled msgs/s (×ratio), SMTP transaction latency p50/p99 ms, whole-machine CPU ms per message.",
        "Ratios: the no-op and checks-off rows against `plain` (Postfix alone); `clamd+spamd` (milterd, those two",
        "checks only) against `ceiling` (the same Postfix path with a minimal milter that only hands each message",
        "to clamd and spamd); `every check` against `amavis`. `backends` (clamd + spamd driven without Postfix or",
        "SMTP) is informational.",
    ]
    for mix in ("real", "synthetic"):
        lines += ["", f"**{mix} mix**", "", "| configuration | " + " | ".join(f"c={c}" for c in levels) + " |"]
        lines.append("|---|" + "---|" * len(levels))
        for name in CONFIGS:
            cells = []
            for c in levels:
                cell = results[(mix, name, c)]
                rate = cell.median("rate")
                base = BASE.get(name)
                ratio = f" (×{rate / results[(mix, base, c)].median('rate'):.2f})" if base else ""
                cells.append(
                    f"{rate:.1f}{ratio}, {cell.median('p50'):.0f}/{cell.median('p99'):.0f} ms,"
                    f" {cell.median('cpu_ms'):.1f} ms CPU"
                )
            lines.append(f"| {LABEL.get(name, name)} | " + " | ".join(cells) + " |")
    c = 10
    lines += [
        "",
        f"**Who spends the CPU** (c={c}; CPU ms per settled message, median; from /proc: utime+stime of each"
        " process tree, reaped children included, before and after each run). `filter` is the row's own milter"
        " (milterd, the no-op, the ceiling milter) or amavisd; `client` is the load generator (for `backends`,"
        " also the clamd and spamd clients); `rest` is the whole machine minus the groups: the kernel's"
        " softirq work and anything else running on the machine.",
    ]
    columns = (*GROUPS, "rest")
    for mix in ("real", "synthetic"):
        lines += ["", f"*{mix} mix*", "", "| configuration | " + " | ".join(columns) + " | whole machine |"]
        lines.append("|---|" + "---|" * (len(columns) + 1))
        for name in CONFIGS:
            cell = results[(mix, name, c)]
            values = [cell.median_group(g) for g in columns]
            shown = [
                "–" if v is None or (g == "filter" and name in ("plain", "backends")) else f"{v:.1f}"
                for g, v in zip(columns, values, strict=True)
            ]
            lines.append(f"| {LABEL.get(name, name)} | " + " | ".join(shown) + f" | {cell.median('cpu_ms'):.1f} |")
    codes = Counter()
    lost = 0
    for (_, name, _), cell in results.items():
        for run in cell.runs:
            codes.update({f"{LABEL.get(name, name)} {code}": n for code, n in run.codes.items()})
            lost += run.lost
    lines += [
        "",
        "Replies seen: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=str)) + ".",
        f"Messages lost (sent but neither delivered, refused nor dropped by a filter): {lost}.",
        "",
        "Peak PSS (MB): " + ", ".join(f"{name} {mb:.0f}" for name, mb in peak_pss.items()) + ".",
        f"milterd (every check) peak RSS after all loads: {rss_after_load:.0f} MB;"
        f" a 50 MB message: reply {large['code']} in {large['seconds']:.1f} s,"
        f" peak RSS {large['before']:.0f} → {large['after']:.0f} MB.",
    ]
    lines += ["", "Targets (issue 3):", ""] + [f"- {t}" for t in targets(results, levels, rss_after_load, large)]
    return "\n".join(lines) + "\n"


def targets(results, levels, rss_after_load, large) -> list[str]:
    def rate(mix, name, c):
        return results[(mix, name, c)].median("rate")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = []
    for name in ("off_inet", "off_unix"):
        ratios = {c: rate("real", name, c) / rate("real", "plain", c) for c in levels}
        ok = all(r >= 0.9 for r in ratios.values())
        out.append(
            f"{verdict(ok)}: milterd with checks off ≥ 0.9× Postfix alone ({name}, real mix): "
            + ", ".join(f"c={c} ×{r:.2f}" for c, r in ratios.items())
        )
    for c in (c for c in levels if c >= 10):
        vs_ceiling = rate("real", "clamd_spamd", c) / rate("real", "ceiling", c)
        vs_amavis = rate("real", "every_check", c) / rate("real", "amavis", c)
        out.append(
            f"{verdict(vs_ceiling >= 0.9)}: milterd with clamd+spamd ≥ 0.9× the fair ceiling (the same Postfix"
            f" and client with a minimal milter → clamd + spamd), real mix c={c}: ×{vs_ceiling:.2f}"
        )
        out.append(
            f"{verdict(vs_amavis >= 1.5)}: milterd with every check ≥ 1.5× amavisd-new (clamd + SpamAssassin),"
            f" real mix c={c}: ×{vs_amavis:.2f}"
        )
    own = results[("real", "clamd_spamd", 10)].median_group("filter")
    ceiling = results[("real", "ceiling", 10)].median_group("filter")
    whole = results[("real", "clamd_spamd", 10)].median("cpu_ms")
    out.append(
        f"(information) milterd's own CPU with clamd+spamd, real mix c=10: {own:.1f} ms per message"
        f" (the ceiling milter: {ceiling:.1f} ms) of {whole:.1f} ms for the whole machine"
    )
    p99 = results[("real", "every_check", 10)].median("p99")
    out.append(f"{verdict(p99 < 1100)}: every check p99 at c=10 below the C milters' 1.1 s: {p99:.0f} ms")
    if 50 in levels:
        out.append(f"{verdict(rss_after_load <= 80)}: milterd RSS ≤ 80 MB at 50 sessions: {rss_after_load:.0f} MB")
    growth = large["after"] - large["before"]
    out.append(f"{verdict(growth < 5)}: RSS flat for a 50 MB message: +{growth:.1f} MB")
    return out


if __name__ == "__main__":
    main()
