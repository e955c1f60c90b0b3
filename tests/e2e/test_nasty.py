"""Hostile but realistic mail through the real Postfix + milterd: nothing lost, nothing crashes.

Every message is either delivered (read back from the Maildir) or refused with a proper SMTP
code, and no milterd log grows a Traceback or an "internal error" line.
"""

from __future__ import annotations

import email.utils
import smtplib
import socket
import threading
import time

import pytest

from tests import daemons
from tests.conftest import GTUBE
from tests.e2e.test_postfix import header, mta, new_token, send  # noqa: F401

BAD = ("Traceback", "internal error")


@pytest.fixture
def logs(mta):  # noqa: F811
    """Call check() at the end of a test: no milterd log grew a Traceback or internal error."""
    _, milterds = mta
    start = {name: m.log.stat().st_size for name, m in milterds.items()}

    class Logs:
        @staticmethod
        def check():
            time.sleep(0.2)  # let milterd finish writing after Postfix answered
            for name, m in milterds.items():
                with open(m.log, "rb") as f:
                    f.seek(start[name])
                    new = f.read().decode("utf-8", "replace")
                for bad in BAD:
                    assert bad not in new, f"milterd {name} log:\n{new[-4000:]}"
                assert m.proc.poll() is None, f"milterd {name} died"

    return Logs


def message(token: bytes, subject: bytes = b"test", extra: bytes = b"", body: bytes | None = b"hello") -> bytes:
    """A raw message carrying token in its Message-ID (and body, if any); body None = no blank line."""
    head = (
        b"From: sender@remote.test\r\nTo: user@example.com\r\nSubject: " + subject + b"\r\n"
        b"Message-ID: <" + token + b"@remote.test>\r\nDate: " + email.utils.formatdate().encode() + b"\r\n" + extra
    )
    if body is None:
        return head
    return head + b"\r\n" + body + (b"\r\n" + token + b"\r\n" if body else b"")


def submit(mta, raw: bytes, listener="shipped", rcpts=("user@example.com",)) -> None:  # noqa: F811
    postfix, _ = mta
    with smtplib.SMTP("127.0.0.1", postfix.ports[listener], timeout=60) as smtp:
        smtp.sendmail("sender@remote.test", list(rcpts), raw)


def test_invalid_utf8_subject_on_gtube_is_delivered_flagged(mta, logs):  # noqa: F811
    postfix, _ = mta
    token = new_token()
    submit(mta, message(token, subject=b"cheap \xff\xfe pills", body=GTUBE))
    delivered = postfix.wait_delivered(token)
    assert header(delivered, "X-Spam-Flag") == ["YES"]
    assert b"\xff\xfe" in delivered.split(b"\n\n", 1)[0]  # the raw bytes survive, tagged or not
    logs.check()


def test_utf8_subject_on_gtube_is_tagged(mta, logs):  # noqa: F811
    postfix, _ = mta
    token = new_token()
    subject = "Grüße – günstige Pillen ✓"
    submit(mta, message(token, subject=subject.encode(), body=GTUBE))
    delivered = postfix.wait_delivered(token)
    assert header(delivered, "X-Spam-Flag") == ["YES"]
    assert header(delivered, "Subject") == ["***SPAM*** " + subject]
    logs.check()


def test_a_5000_character_header_line_and_a_200_line_folded_header(mta, logs):  # noqa: F811
    postfix, _ = mta
    long_token, folded_token = new_token(), new_token()
    submit(mta, message(long_token, extra=b"X-Long: " + b"a" * 4992 + b"\r\n"))
    folded = b"X-Folded: start\r\n" + b"".join(b"\tcontinuation line %03d\r\n" % i for i in range(200))
    submit(mta, message(folded_token, extra=folded, body=GTUBE))
    assert b"a" * 2000 in postfix.wait_delivered(long_token)
    delivered = postfix.wait_delivered(folded_token)
    assert b"continuation line 199" in delivered
    assert header(delivered, "X-Spam-Flag") == ["YES"]
    logs.check()


def test_headers_only_and_empty_body(mta, logs):  # noqa: F811
    postfix, _ = mta
    no_body, empty = new_token(), new_token()
    submit(mta, message(no_body, body=None))
    submit(mta, message(empty, body=b""))
    assert len(header(postfix.wait_delivered(no_body), "X-Virus-Scanned")) == 1
    assert len(header(postfix.wait_delivered(empty), "X-Virus-Scanned")) == 1
    logs.check()


def test_a_2_mb_body_line_without_newline(mta, logs):  # noqa: F811
    postfix, _ = mta
    token = new_token()
    line = b"x" * (2 * 1024 * 1024)
    submit(mta, message(token, body=line))
    delivered = postfix.wait_delivered(token, timeout=60)
    assert delivered.count(b"x") >= len(line)
    assert len(header(delivered, "X-Virus-Scanned")) == 1
    logs.check()


def test_two_transactions_and_rset_on_one_connection(mta, logs):  # noqa: F811
    postfix, _ = mta
    clean, spam, after_rset = new_token(), new_token(), new_token()
    with smtplib.SMTP("127.0.0.1", postfix.ports["shipped"], timeout=60) as smtp:
        smtp.sendmail("sender@remote.test", ["user@example.com"], message(clean, subject=b"first"))
        smtp.sendmail("sender@remote.test", ["user@example.com"], message(spam, subject=b"second", body=GTUBE))
        smtp.mail("sender@remote.test")
        assert smtp.rcpt("user@example.com")[0] == 250
        smtp.rset()
        smtp.sendmail("sender@remote.test", ["user@example.com"], message(after_rset, subject=b"third"))
    first = postfix.wait_delivered(clean)
    second = postfix.wait_delivered(spam)
    third = postfix.wait_delivered(after_rset)
    assert header(first, "X-Spam-Flag") == [] and header(first, "Subject") == ["first"]
    assert header(second, "X-Spam-Flag") == ["YES"] and header(second, "Subject") == ["***SPAM*** second"]
    assert header(third, "X-Spam-Flag") == [] and header(third, "Subject") == ["third"]
    logs.check()


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_client_disconnecting_in_the_middle_of_data(mta, logs):  # noqa: F811
    postfix, _ = mta
    with socket.create_connection(("127.0.0.1", postfix.ports["shipped"]), timeout=30) as sock:
        assert _reply(sock).startswith(b"220")
        for command, code in (
            (b"EHLO client.remote.test", b"250"),
            (b"MAIL FROM:<sender@remote.test>", b"250"),
            (b"RCPT TO:<user@example.com>", b"250"),
            (b"DATA", b"354"),
        ):
            sock.sendall(command + b"\r\n")
            assert _reply(sock).startswith(code), command
        sock.sendall(message(new_token(), body=b"half a body " * 1000)[:6000])
    time.sleep(0.5)
    postfix.wait_delivered(send(mta, "shipped", b"after the hangup"))
    logs.check()


def test_fifty_recipients_get_one_delivery_each(mta, logs):  # noqa: F811
    postfix, _ = mta
    rcpts = [f"user{i}@example.com" for i in range(50)]
    token = send(mta, "shipped", b"to many", rcpts=rcpts)
    deadline = time.monotonic() + 30
    while (count := sum(token in m for m in postfix.delivered())) < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count == 50
    logs.check()


def test_twenty_concurrent_clients(mta, logs):  # noqa: F811
    postfix, _ = mta
    kinds = [("clean", b"Hello Bob, lunch?"), ("spam", GTUBE), ("virus", daemons.EICAR)] * 7
    kinds = kinds[:20]
    results: list[object] = [None] * 20
    tokens = [new_token() for _ in kinds]
    barrier = threading.Barrier(20)

    def client(i: int) -> None:
        try:
            barrier.wait(10)
            submit(mta, message(tokens[i], body=kinds[i][1]))
            results[i] = "sent"
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for (kind, _), token, result in zip(kinds, tokens, results, strict=True):
        if kind == "virus":
            assert isinstance(result, smtplib.SMTPDataError) and result.smtp_code == 554, result
        else:
            assert result == "sent", result
            delivered = postfix.wait_delivered(token)
            assert header(delivered, "X-Spam-Flag") == (["YES"] if kind == "spam" else [])
    time.sleep(1)
    assert not any(t in m for t, (k, _) in zip(tokens, kinds, strict=True) if k == "virus" for m in postfix.delivered())
    logs.check()
