"""Pyzor, Razor and DCC beside clamd and spamd on one message: it costs the slowest check, not the sum.

Real clamd, spamd and pyzord; Razor is a stand-in command that takes 0.5 s (no Razor server can
be reached here); DCC is the FAKE dccifd told never to answer, so DCC runs into its 0.6 s deadline.
"""

from __future__ import annotations

import time

from milterd.config import load_config
from milterd.engine import build_engine
from milterd.message import Envelope, Message, Spool
from tests.conftest import write_config
from tests.fake_dccifd import start_fake_dccifd


def test_the_message_costs_the_slowest_check_not_the_sum(clamd, spamd, pyzord, tmp_path):
    slow_razor = tmp_path / "slow-razor-check"
    slow_razor.write_text("#!/bin/sh\ncat >/dev/null\nsleep 0.5\nexit 1\n")  # 1 = "not spam"
    slow_razor.chmod(0o755)
    dccifd = start_fake_dccifd(tmp_path / "dcc", tokens={"SILENT-TOKEN": {"silent": True}})
    config = write_config(tmp_path / "milterd", clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}")
    config.write_text(
        config.read_text()
        + f'[pyzor]\nenabled = true\nservers = ["127.0.0.1:{pyzord.port}"]\ntimeout = 2\n'
        + f'[razor]\nenabled = true\ncommand = "{slow_razor}"\ntimeout = 3\n'
        + f'[dcc]\nenabled = true\nsocket = "{dccifd.socket_path}"\ntimeout = 0.6\n'
    )
    engine = build_engine(load_config(config))
    spool = Spool()
    spool.write(
        b"From: a@remote.test\r\nTo: u@example.com\r\nSubject: lunch\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <together.1@remote.test>\r\n\r\nLunch on Thursday? SILENT-TOKEN\r\n"
    )
    message = Message(Envelope(mail_from="a@remote.test", rcpts=("u@example.com",), client_ip="192.0.2.7"), spool)
    try:
        start = time.monotonic()
        disposition = engine.evaluate(message)
        total = time.monotonic() - start
    finally:
        engine.close()
        dccifd.stop()
    findings, verdict = disposition.findings, disposition.outcome.verdict
    statuses = {name: f.status for name, f in findings.items()}
    assert statuses["clamav"] == statuses["spamd"] == statuses["pyzor"] == statuses["razor"] == "ok"
    assert statuses["dcc"] == "timeout"
    assert verdict.action == "accept"  # collaborative checks never block mail by failing
    elapsed = {name: f.elapsed for name, f in findings.items() if name in ("clamav", "spamd", "pyzor", "razor", "dcc")}
    slowest = max(elapsed["razor"], elapsed["dcc"], elapsed["clamav"] + elapsed["spamd"])
    print(f"total {total:.3f}s, slowest {slowest:.3f}s, sum {sum(elapsed.values()):.3f}s, {elapsed}")
    assert sum(elapsed.values()) > 1.0
    assert total < slowest + 0.4  # generous: two cores, other checks in between
