"""`milterd stats` over the log a real milterd wrote while a real Postfix handed it mail.

Clean mail, EICAR, GTUBE and a banned attachment go through Postfix to `milterd run`; then
`milterd stats LOG --json` must count what was sent, and its plain text must name the virus.
"""

from __future__ import annotations

import base64
import email.utils
import json
import smtplib
import subprocess
import time
import uuid

import pytest

from tests import daemons
from tests.conftest import GTUBE, MILTERD, start_milterd, stop_milterd, write_config


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd):
    base = tmp_path_factory.mktemp("stats")
    daemons.make_traversable(base)
    milterd = start_milterd(
        write_config(base / "milterd", clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}")
    )
    postfix = daemons.start_postfix(base / "postfix", {"inbound": milterd.socket})
    yield postfix, milterd
    postfix.stop()
    stop_milterd(milterd)


def send(postfix, body: bytes, extra: bytes = b"") -> None:
    token = "mtok_" + uuid.uuid4().hex
    raw = (
        f"From: sender@remote.test\r\nTo: user@example.com\r\nSubject: stats\r\n"
        f"Message-ID: <{token}@remote.test>\r\nDate: {email.utils.formatdate()}\r\n".encode()
        + extra
        + b"\r\n"
        + body
        + f"\r\n{token}\r\n".encode()
    )
    try:
        with smtplib.SMTP("127.0.0.1", postfix.ports["inbound"], timeout=60) as smtp:
            smtp.sendmail("sender@remote.test", ["user@example.com"], raw)
    except smtplib.SMTPDataError as e:
        assert e.smtp_code == 554, e  # refused by milterd: counted as a reject


def message_lines(log) -> int:
    return sum(" action=" in line for line in log.read_text(errors="replace").splitlines())


def test_stats_counts_what_postfix_handed_milterd(mta):
    postfix, milterd = mta
    before = message_lines(milterd.log)
    send(postfix, b"Hello, the minutes of Tuesday's meeting are below.\r\n")
    send(postfix, b"A second ordinary message.\r\n")
    send(postfix, daemons.EICAR)
    send(postfix, GTUBE)
    banned = (
        b"--b1\r\nContent-Type: text/plain\r\n\r\nThe document is attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n\r\n'
        + base64.encodebytes(b"not really a program\r\n").replace(b"\n", b"\r\n")
        + b"--b1--\r\n"
    )
    send(postfix, banned, b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n')
    deadline = time.monotonic() + 30
    while message_lines(milterd.log) < before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert before == 0, "the module's milterd saw only this test's mail"

    done = subprocess.run([MILTERD, "stats", str(milterd.log), "--json"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["messages"] == 5 and stats["unparsed_lines"] == 0
    assert stats["categories"] == {"CLEAN": 2, "VIRUS": 1, "SPAM": 1, "BANNED": 1}
    assert stats["actions"] == {"accept": 3, "reject": 2}  # the shipped policy passes spam, tagged
    assert stats["replies"] == {"250": 3, "554 5.7.0": 2}
    [(virus, count)] = stats["viruses"].items()  # the test clamd's own signature ends in .UNOFFICIAL
    assert virus.startswith("Eicar-Test-Signature") and count == 1
    assert stats["banned_names"] == {"invoice.pdf.exe": 1} and stats["banned_types"] == {".exe": 1}
    assert stats["checks"]["clamav"]["status"] == {"ok": 5} and stats["checks"]["spamd"]["count"] >= 4
    assert stats["checks"]["clamav"]["p99_ms"] >= stats["checks"]["clamav"]["p50_ms"] >= 0
    assert len(stats["slowest"]) == 5 and stats["first"] and stats["last"]

    recent = subprocess.run(
        [MILTERD, "stats", "--since", "1h"], input=milterd.log.read_bytes(), capture_output=True, timeout=60
    )
    assert recent.returncode == 0, recent.stderr
    text = recent.stdout.decode()
    assert "Messages          5" in text and "Eicar-Test-Signature" in text and "invoice.pdf.exe" in text
    print(text)
