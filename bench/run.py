"""`make bench`: delivered msgs/s and SMTP latency through a private Postfix, with and without milterd.

Every configuration runs on the same clamd and spamd, interleaved (A B C A B C ...), and the table
shows medians. Every message is unique (token in the body and Message-ID), so no cache can help.
Counted at delivery (the Maildir), never at acceptance. First harness: amavisd-new is not in it yet.
"""

from __future__ import annotations

import argparse
import email.utils
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests import daemons
from tests.conftest import start_milterd, stop_milterd, write_config

BODY = ("This is a plain business message about the quarterly report and lunch on Friday.\r\n" * 125).encode()


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)


def message(token: str) -> bytes:
    return (
        (
            f"From: alice@remote.test\r\nTo: user@example.com\r\nSubject: report {token[:8]}\r\n"
            f"Message-ID: <{token}@remote.test>\r\nDate: {email.utils.formatdate()}\r\n\r\n"
        ).encode()
        + BODY
        + token.encode()
        + b"\r\n"
    )


def load(postfix, listener: str, count: int, concurrency: int, result: Result, timeout: float) -> None:
    """Send `count` unique messages from `concurrency` clients; wait until all are delivered or refused."""
    import smtplib

    postfix.wait_queue_empty(60)
    before = len(postfix.delivered())
    latencies, lock, numbers = [], threading.Lock(), iter(range(count))
    refused = 0

    def client():
        nonlocal refused
        for _ in numbers:
            t0 = time.perf_counter()
            code = 250
            try:
                with smtplib.SMTP("127.0.0.1", postfix.ports[listener], timeout=timeout) as smtp:
                    smtp.sendmail("alice@remote.test", ["user@example.com"], message("mtok_" + uuid.uuid4().hex))
            except smtplib.SMTPResponseException as e:
                code = e.smtp_code
            with lock:
                latencies.append(time.perf_counter() - t0)
                result.codes[code] = result.codes.get(code, 0) + 1
                refused += code != 250

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while len(postfix.delivered()) - before < count - refused and time.perf_counter() - start < timeout:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    delivered = len(postfix.delivered()) - before
    latencies.sort()
    result.rates.append(delivered / elapsed)
    result.p50.append(latencies[len(latencies) // 2] * 1000)
    result.p99.append(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000)


def peak_rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repetition, concurrency 1 and 10")
    args = parser.parse_args()
    repetitions, levels = (1, (1, 10)) if args.quick else (3, (1, 10, 50))
    work = Path(tempfile.mkdtemp(prefix="milterd-bench-"))
    daemons.make_traversable(work)
    clamd = daemons.start_clamd(work / "clamd")
    spamd = daemons.start_spamd(work / "spamd", children=5)
    milterds = {}
    try:
        for name, checks_on, listen in (
            ("off-inet", False, "inet"),
            ("off-unix", False, "unix"),
            ("full", True, "inet"),
        ):
            config = write_config(work / name, clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}")
            text = config.read_text()
            if not checks_on:
                text = text.replace("[clamav]\n", "[clamav]\nenabled = false\n").replace(
                    "[spamd]\n", "[spamd]\nenabled = false\n"
                )
            config.write_text(text)
            milterds[name] = start_milterd(config, unix=work / f"{name}.sock" if listen == "unix" else None)
        listeners = {"plain": None} | {name.replace("-", "_"): m.socket for name, m in milterds.items()}
        postfix = daemons.start_postfix(work / "postfix", listeners)
        results: dict[tuple[str, int], Result] = {}
        for concurrency in levels:
            count = {1: 60, 10: 200, 50: 300}[concurrency]
            for _ in range(repetitions):
                for listener in listeners:
                    n = count if listener != "full" else max(20, count // 6)
                    load(postfix, listener, n, concurrency, results.setdefault((listener, concurrency), Result()), 300)
        print(f"\n{'configuration':<16}" + "".join(f"{'c=' + str(c):>28}" for c in levels))
        for listener in listeners:
            cells = []
            for c in levels:
                r = results[(listener, c)]
                ceiling = statistics.median(results[("plain", c)].rates)
                rate = statistics.median(r.rates)
                p50, p99 = statistics.median(r.p50), statistics.median(r.p99)
                cells.append(f"{rate:7.1f}/s {rate / ceiling:4.0%} {p50:5.0f}/{p99:4.0f}ms")
            print(f"{listener:<16}" + "".join(f"{cell:>28}" for cell in cells))
        print("\nreply codes:", {k: v.codes for k, v in results.items()})
        print("milterd peak RSS (MB):", {name: peak_rss_mb(m.proc.pid) for name, m in milterds.items()})
        postfix.stop()
    finally:
        for m in milterds.values():
            stop_milterd(m)
        daemons.stop_all()


if __name__ == "__main__":
    main()
