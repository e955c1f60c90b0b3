"""The benchmark's two mixes, and the one change that makes every message sent unique.

Synthetic: one 10 KB plain-text business message. Real: SpamAssassin's sample spam and ham,
CPython's email test messages (odd MIME, encodings, broken structure), a message carrying a
200 KB zip, an EICAR virus and a GTUBE spam. Uniqueness (a new Message-ID and a token after the
last body line) keeps any result cache from flattering the numbers.
"""

from __future__ import annotations

import email.utils
import io
import random
import re
import zipfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from tests.daemons import EICAR

SA_SAMPLES = Path("/usr/share/doc/spamassassin/examples")
CPYTHON_EMAIL = Path("/usr/lib/python3.11/test/test_email/data")  # Debian: libpython3.11-testsuite
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SENDER, RECIPIENT = "alice@remote.test", "user@example.com"

_MESSAGE_ID = re.compile(rb"^message-id:.*(?:\r?\n[ \t].*)*\r?\n", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    name: str
    raw: bytes


def synthetic() -> list[Sample]:
    body = "This is a plain business message about the quarterly report and lunch on Friday.\r\n" * 125
    return [Sample("synthetic-10k", _text_message("report", body))]


def real_mix() -> list[Sample]:
    samples = [
        Sample("sa-sample-spam", (SA_SAMPLES / "sample-spam.txt").read_bytes()),
        Sample("sa-sample-nonspam", (SA_SAMPLES / "sample-nonspam.txt").read_bytes()),
    ]
    samples += [Sample(f"cpython-{p.stem}", p.read_bytes()) for p in sorted(CPYTHON_EMAIL.glob("msg_*.txt"))]
    samples.append(Sample("zip-200k", _zip_message()))
    samples.append(Sample("eicar", _text_message("invoice", EICAR.decode() + "\r\n")))
    samples.append(Sample("gtube", _text_message("offer", GTUBE.decode() + "\r\n")))
    return samples


def unique(raw: bytes, token: str) -> bytes:
    """`raw` with its Message-ID replaced by one made of `token`, and `token` after the last body line."""
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, sep, body = raw.partition(b"\r\n\r\n")
    head = _MESSAGE_ID.sub(b"", head + b"\n").rstrip(b"\r\n")
    message_id = f"Message-ID: <{token}@bench.milterd.test>\r\n".encode()
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    return message_id + head + b"\r\n\r\n" + body + token.encode() + b"\r\n"


def _text_message(subject: str, body: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}"
    ).encode()


def _zip_message() -> bytes:
    """A 200 KB zip (incompressible data, so it stays that size) as a mail attachment."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("report.dat", random.Random(200).randbytes(200 * 1024))
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, RECIPIENT, "the figures"
    msg["Date"] = email.utils.formatdate()
    msg.set_content("The figures are attached.\n")
    msg.add_attachment(data.getvalue(), maintype="application", subtype="zip", filename="report.zip")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def large_message(size: int) -> bytes:
    """A plain-text message of about `size` bytes, for the flat-memory measurement."""
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.\r\n"
    return _text_message("large", line * (size // len(line)))
