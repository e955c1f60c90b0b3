"""Many sessions at once through the real Postfix: with 50 sessions waiting on a stalled spamd,
unrelated sessions still get every reply, the end-of-data one within message_timeout.

libmilter runs each callback on one of its worker threads and eom holds its thread until the
verdict; its pool grows a thread whenever none is idle (worker.c), so sessions are limited only by
[milter] max_concurrent, sized for Postfix's 100 smtpd processes: no message waits for a slot here.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time

import pytest

from tests import daemons
from tests.conftest import start_milterd, stop_milterd
from tests.integration.test_message_timeout import Stalled

LOAD, PROBES = 50, 5
MESSAGE_TIMEOUT = 5.0
SLACK = 2.0  # Postfix and the SMTP client on a busy test machine


@pytest.fixture
def mta(tmp_path):
    """Postfix -> milterd (defaults but message_timeout) whose spamd accepts and never answers."""
    daemons.make_traversable(tmp_path)
    stalled = Stalled()
    (tmp_path / "rules").mkdir()
    config = tmp_path / "milterd.toml"
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "dkim", "spf", "dmarc"))
    config.write_text(
        f"[milter]\nmessage_timeout = {MESSAGE_TIMEOUT}\n{off}"
        f'[spamd]\naddress = "127.0.0.1:{stalled.port}"\ncritical = false\n'
        f'[quarantine]\ndirectory = "{tmp_path / "quarantine"}"\n'
        f'[notify]\noutbox = "{tmp_path / "outbox"}"\nvia = "127.0.0.1:1"\n'
    )
    milterd = start_milterd(config)
    postfix = daemons.start_postfix(tmp_path / "postfix", {"main": milterd.socket})
    yield postfix, milterd
    postfix.stop()
    stop_milterd(milterd)
    stalled.close()


def session(port: int, n: int, times: dict) -> None:
    """One SMTP session with one message; `times` gets each command's seconds and the final reply."""
    started = time.monotonic()

    def timed(name, call):
        nonlocal started
        result = call()
        now = time.monotonic()
        times[name], started = now - started, now
        return result

    try:
        smtp = timed("connect", lambda: smtplib.SMTP("127.0.0.1", port, timeout=60))
        timed("ehlo", lambda: smtp.ehlo("client.test"))
        timed("mail", lambda: smtp.mail("sender@remote.test"))
        timed("rcpt", lambda: smtp.rcpt("user@example.com"))
        timed("data", lambda: smtp.docmd("DATA"))
        smtp.send(f"From: a@remote.test\r\nTo: user@example.com\r\nSubject: {n}\r\n\r\nhello {n}\r\n.\r\n".encode())
        code, _ = timed("eom", smtp.getreply)
        times["reply"] = code
        smtp.quit()
    except (OSError, smtplib.SMTPException) as e:
        times["error"] = repr(e)


def test_with_50_sessions_on_a_stalled_spamd_unrelated_sessions_get_their_replies_in_time(mta):
    postfix, milterd = mta
    port = postfix.ports["main"]
    load = [{} for _ in range(LOAD)]
    threads = [threading.Thread(target=session, args=(port, n, load[n])) for n in range(LOAD)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the 50 are at end of message, waiting on spamd
    probes = [{} for _ in range(PROBES)]
    for n in range(PROBES):
        threading.Thread(target=session, args=(port, LOAD + n, probes[n])).start()
        time.sleep(0.3)
    for thread in threads:
        thread.join(60)
    deadline = time.monotonic() + 30
    while any("reply" not in t and "error" not in t for t in probes) and time.monotonic() < deadline:
        time.sleep(0.1)

    for times in probes:  # unrelated sessions: every command answered at once, the message in its budget
        assert "error" not in times, times
        assert max(times[c] for c in ("connect", "ehlo", "mail", "rcpt", "data")) < SLACK, times
        assert times["eom"] < MESSAGE_TIMEOUT + SLACK and times["reply"] == 250, times
    for times in load:
        assert "error" not in times, times
        assert times["eom"] < MESSAGE_TIMEOUT + SLACK and times["reply"] == 250, times  # spamd is not critical

    time.sleep(0.3)
    log = milterd.log.read_text()
    assert "slots busy" not in log
    spamd = [int(ms) for ms in re.findall(r"spamd:timeout/(\d+)ms", log)]
    assert len(spamd) == LOAD + PROBES
    assert min(spamd) > (MESSAGE_TIMEOUT - 1) * 1000, sorted(spamd)[:5]  # no message waited for a slot
