"""milterd.notify's sender thread against a real relay: Debian's Postfix `smtp-sink`, on a free
loopback port, dumping every message it accepts into a directory (`-d`), or refusing RCPT with
a 5xx (`-f RCPT`).

- the relay down (nothing listening): the notifications stay in the outbox; once it listens
  they arrive and the outbox empties; the files survive a restart (another Notifier sends them);
- a 5xx for RCPT: the file moves to outbox/failed/, nothing is lost silently;
- a burst of 50 viruses: max_per_minute notifications and, when the minute ends, one summary;
- only the admin address is ever a recipient (never the sender).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import time
from pathlib import Path

import pytest

from milterd.notify import MARKER, Notifier, NotifySettings
from milterd.policy import Category
from tests import daemons
from tests.unit.test_notify import Clock, make_disposition

HOSTNAME = "mx.example.com"
ADMIN = "virus-admin@example.com"
SMTP_SINK = "/usr/sbin/smtp-sink"

pytestmark = pytest.mark.skipif(not Path(SMTP_SINK).exists(), reason="needs Postfix's smtp-sink")


class Sink:
    """smtp-sink on 127.0.0.1:port; with `dump`, each accepted message is a file in `dump`."""

    def __init__(self, workdir: Path, port: int, *options: str):
        self.workdir = workdir
        self.dump = workdir / "dump"
        self.dump.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dump, "nobody")
        daemons.make_traversable(self.dump)
        self.port = port
        argv = [SMTP_SINK, "-u", "nobody", "-d", f"{self.dump}/%H%M%S.", *options, f"127.0.0.1:{port}", "128"]
        self.proc, self.pid, self.out = daemons._spawn(argv, workdir, f"smtp-sink-{port}")
        daemons.wait_for_port("127.0.0.1", port, 10, self.proc, logs=[self.out])

    def messages(self) -> list[tuple[dict[str, list[str]], email.message.EmailMessage]]:
        """(smtp-sink's X-Mail-Args/X-Rcpt-Args records, the message as received) of each dump file."""
        out = []
        for path in sorted(self.dump.iterdir()):
            raw = path.read_bytes()
            records: dict[str, list[str]] = {}
            lines = raw.split(b"\n")
            while lines and lines[0].startswith(b"X-"):
                name, _, value = lines.pop(0).decode().partition(": ")
                records.setdefault(name, []).append(value.strip())
            while lines and not lines[0].startswith(b"Received: from"):
                lines.pop(0)
            lines = lines[3:]  # smtp-sink's three-line Received: header
            out.append((records, email.message_from_bytes(b"\n".join(lines), policy=email.policy.default)))
        return out

    def stop(self) -> None:
        daemons._terminate(self.proc, self.pid, [self.out])


@pytest.fixture
def workdir(tmp_path):
    daemons.make_traversable(tmp_path)
    return tmp_path


@pytest.fixture
def sinks():
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


def settings(workdir: Path, port: int, **overrides) -> NotifySettings:
    values = {
        "virus_admin": ADMIN,
        "via": f"127.0.0.1:{port}",
        "outbox": str(workdir / "outbox"),
        "retry_interval": 0.3,
        "timeout": 5.0,
    }
    return NotifySettings(**{**values, **overrides})


def wait_until(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_relay_down_then_back(workdir, sinks):
    port = daemons.free_port()
    notifier = Notifier(settings(workdir, port), HOSTNAME, None)
    notifier.start()
    try:
        for i in range(3):
            notifier.notify(make_disposition(queue_id=f"DOWN{i}", mail_from="attacker@remote.test"))
        time.sleep(1.0)  # several retries, nothing listening
        assert len(notifier.pending()) == 3
        sinks.append(Sink(workdir / "sink", port))
        wait_until(lambda: not notifier.pending(), what="the outbox to empty")
    finally:
        notifier.close(5)
    received = sinks[0].messages()
    assert len(received) == 3
    for records, msg in received:
        assert records["X-Rcpt-Args"] == [f"<{ADMIN}>"]  # the admin only: never the sender
        assert records["X-Mail-Args"][0].startswith(f"<postmaster@{HOSTNAME}>")
        assert msg["To"] == ADMIN and msg[MARKER] == "1" and msg["Auto-Submitted"] == "auto-generated"
        assert "Eicar-Test-Signature" in msg["Subject"]
    queue_ids = sorted(m.get_content().split("Queue id:")[1].split()[0] for _, m in received)
    assert queue_ids == ["DOWN0", "DOWN1", "DOWN2"]
    assert not list((workdir / "outbox" / "failed").iterdir())


def test_outbox_survives_a_restart(workdir, sinks):
    port = daemons.free_port()
    first = Notifier(settings(workdir, port), HOSTNAME, None)
    first.start()
    first.notify(make_disposition(queue_id="BEFORE"))
    time.sleep(0.5)
    first.close(5)
    assert len(first.pending()) == 1
    sinks.append(Sink(workdir / "sink", port))
    second = Notifier(settings(workdir, port), HOSTNAME, None)
    second.start()  # sends what the outbox holds
    try:
        wait_until(lambda: not second.pending(), what="the outbox to empty")
    finally:
        second.close(5)
    [(records, msg)] = sinks[0].messages()
    assert records["X-Rcpt-Args"] == [f"<{ADMIN}>"]
    assert "Queue id:       BEFORE" in msg.get_content()


def test_5xx_moves_to_failed(workdir, sinks, caplog):
    port = daemons.free_port()
    sinks.append(Sink(workdir / "sink", port, "-f", "RCPT"))
    notifier = Notifier(settings(workdir, port), HOSTNAME, None)
    notifier.start()
    try:
        notifier.notify(make_disposition(queue_id="REFUSED"))
        failed = workdir / "outbox" / "failed"
        wait_until(lambda: any(failed.iterdir()), what="a file in failed/")
    finally:
        notifier.close(5)
    assert notifier.pending() == []
    [path] = list(failed.iterdir())
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert sinks[0].messages() == []
    assert "moved to" in caplog.text and "500" in caplog.text
    # once per message: the failed one is not written again
    notifier.notify(make_disposition(queue_id="REFUSED"))
    assert notifier.pending() == []


def test_4xx_keeps_the_file(workdir, sinks):
    port = daemons.free_port()
    sinks.append(Sink(workdir / "sink", port, "-r", "RCPT"))
    notifier = Notifier(settings(workdir, port), HOSTNAME, None)
    notifier.start()
    try:
        notifier.notify(make_disposition(queue_id="DEFERRED"))
        time.sleep(1.0)
        assert len(notifier.pending()) == 1
    finally:
        notifier.close(5)
    assert not list((workdir / "outbox" / "failed").iterdir())


def test_burst_is_rate_limited_with_one_summary(workdir, sinks):
    port = daemons.free_port()
    sinks.append(Sink(workdir / "sink", port))
    clock = Clock()
    notifier = Notifier(settings(workdir, port, max_per_minute=10), HOSTNAME, None, clock=clock)
    notifier.start()
    try:
        for i in range(50):
            notifier.notify(make_disposition(queue_id=f"BURST{i:02d}"))
        notifier.notify(make_disposition(Category.BANNED, banned=("x.exe",), queue_id="NOADMIN"))  # banned_admin ""
        wait_until(lambda: len(sinks[0].messages()) >= 10 and not notifier.pending(), what="10 notifications")
        time.sleep(0.5)
        assert len(sinks[0].messages()) == 10
        clock.now += 60  # the minute ends
        notifier.wake()
        wait_until(lambda: len(sinks[0].messages()) == 11 and not notifier.pending(), what="the summary")
        time.sleep(0.5)
    finally:
        notifier.close(5)
    received = sinks[0].messages()
    assert len(received) == 11
    summaries = [m for _, m in received if "held back" in m["Subject"]]
    [summary] = summaries
    assert summary["Subject"] == "40 more notifications held back (VIRUS x 40)"
    body = summary.get_content()
    assert "BURST10" in body and "BURST49" in body and "BURST09" not in body
    assert all(records["X-Rcpt-Args"] == [f"<{ADMIN}>"] for records, _ in received)
