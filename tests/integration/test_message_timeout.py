"""[milter] message_timeout: a backend that accepts and never answers costs the message its budget,
no more, and no thread keeps the socket afterwards; with every slot busy the message gets 451."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from milterd.config import load_config
from milterd.engine import build_engine
from milterd.message import Envelope, Message, Spool

pytestmark = pytest.mark.integration

MAIL = b"From: a@remote.test\r\nTo: u@example.com\r\nSubject: x\r\n\r\nhello\r\n"


class Stalled:
    """A TCP server that accepts and never answers; it counts the connections still open."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(conn)

    def still_open(self) -> int:
        """Connections whose client has not closed them."""
        alive = 0
        for conn in self.open:
            conn.setblocking(False)
            try:
                while conn.recv(65536):
                    pass
            except BlockingIOError:
                alive += 1  # nothing to read, not closed
            except OSError:
                pass
        return alive

    def close(self):
        self.listener.close()
        for conn in self.open:
            conn.close()


@pytest.fixture
def stalled():
    server = Stalled()
    yield server
    server.close()


def engine_for(tmp_path: Path, stalled: Stalled, **milter):
    (tmp_path / "rules").mkdir(exist_ok=True)
    path = tmp_path / "milterd.toml"
    settings = "".join(f"{k} = {v}\n" for k, v in milter.items())
    off = "".join(f"[{n}]\nenabled = false\n" for n in ("clamav", "banned", "headers", "dkim", "spf", "dmarc"))
    path.write_text(
        f'[milter]\n{settings}{off}[spamd]\naddress = "127.0.0.1:{stalled.port}"\ncritical = true\ntimeout = 60\n'
        f'[quarantine]\ndirectory = "{tmp_path / "q"}"\n[notify]\noutbox = "{tmp_path / "o"}"\n'
    )
    return build_engine(load_config(path))


def message() -> Message:
    spool = Spool()
    spool.write(MAIL)
    return Message(Envelope("a@remote.test", ("u@example.com",), "192.0.2.1"), spool)


def test_a_stalled_backend_costs_message_timeout_and_its_socket_is_closed_by_then(tmp_path, stalled):
    engine = engine_for(tmp_path, stalled, message_timeout=2)
    try:
        started = time.monotonic()
        disposition = engine.evaluate(message())
        took = time.monotonic() - started
    finally:
        engine.close()
    spamd = disposition.findings["spamd"]
    assert 1.9 < took < 3.0, took
    assert spamd.status == "timeout" and spamd.critical
    assert disposition.outcome.verdict.action == "tempfail"  # a critical check that did not answer
    time.sleep(0.3)
    assert stalled.still_open() == 0  # the check's own socket timed out with the message


def test_when_every_slot_stays_busy_the_message_gets_451(tmp_path, stalled):
    engine = engine_for(tmp_path, stalled, message_timeout=1.5, max_concurrent=1)
    try:
        long = message()
        long.deadline = time.monotonic() + 4  # holds the one slot past the second message's budget
        first = threading.Thread(target=engine.evaluate, args=(long,))
        first.start()
        time.sleep(0.2)
        started = time.monotonic()
        second = engine.evaluate(message())
        took = time.monotonic() - started
        first.join()
    finally:
        engine.close()
    assert took < 2.0
    assert str(second.outcome.reply) == "451 4.3.2 Too busy, try again later"
    assert "evaluation slots busy" in second.error


def test_a_message_timeout_postfix_would_outlive_is_refused(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[milter]\nmessage_timeout = 290\n")
    with pytest.raises(Exception, match="milter.message_timeout must be at most 240 s"):
        load_config(path)
