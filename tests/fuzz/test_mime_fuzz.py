"""Hostile input for the MIME walker: it returns in time, never raises, and never drops a part silently."""

from __future__ import annotations

import io
import time
import zipfile
from collections import Counter
from datetime import timedelta
from email.message import EmailMessage
from email.message import Message as EmailPart
from email.parser import BytesParser
from email.policy import compat32

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milterd.checks.banned import BannedSettings
from milterd.message import Envelope, Message, Spool
from milterd.mime import Inspection, Walker

pytestmark = pytest.mark.fuzz

LIMITS = BannedSettings(timeout=2.0)
WALKER = Walker(LIMITS)
FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=LIMITS.timeout + 1),
    suppress_health_check=[HealthCheck.too_slow],
)


def _seed() -> bytes:
    """A multipart message with a text body, a zip attachment and an attached message."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("invoice.pdf.exe", b"MZ" + bytes(200))
        zf.writestr("docs/readme.txt", b"read me\n" * 20)
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("inner body\n")
    inner.add_attachment(b"%PDF-1.4\n", maintype="application", subtype="pdf", filename="a.pdf")
    outer = EmailMessage()
    outer["From"], outer["Subject"] = "a@example.com", "seed"
    outer.set_content("Hello.\n")
    outer.add_attachment(archive.getvalue(), maintype="application", subtype="zip", filename="files.zip")
    outer.add_attachment(inner, filename="fwd.eml")
    return outer.as_bytes()


SEED = _seed()
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["delete", "insert", "replace"]),
        st.integers(0, len(SEED)),
        st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r\n", b"\n", b"--", b"\x00", b"=?", b"begin 644 "]),
    ),
    min_size=1,
    max_size=6,
)


def mutate(raw: bytes, mutations) -> bytes:
    for kind, at, data in mutations:
        at = min(at, len(raw))
        if kind == "delete":
            raw = raw[:at] + raw[at + len(data) :]
        elif kind == "insert":
            raw = raw[:at] + data + raw[at:]
        else:
            raw = raw[:at] + data + raw[at + len(data) :]
    return raw


def walk(raw: bytes) -> Inspection:
    """inspect(), timed; then: every MIME leaf the email package sees is a part, or something is unchecked."""
    spool = Spool()
    spool.write(raw)
    started = time.monotonic()
    result = WALKER.inspect(Message(Envelope(), spool))
    assert time.monotonic() - started < LIMITS.timeout + 1
    assert isinstance(result, Inspection)
    if result.unchecked:
        return result
    seen = Counter((part.declared_type, part.size) for part in result.parts if not part.in_archive)
    expected = Counter((leaf.get_content_type(), len(leaf.get_payload(decode=True) or b"")) for leaf in leaves(raw))
    assert not expected - seen, (expected - seen, result)
    return result


def leaves(raw: bytes) -> list[EmailPart]:
    """The leaves as the email package parses them, but for encoded message/rfc822 (the walker decodes those)."""
    found, stack = [], [BytesParser(policy=compat32).parsebytes(raw)]
    while stack:
        node = stack.pop()
        encoding = str(node.get("content-transfer-encoding", "")).strip().lower()
        if not node.is_multipart():
            found.append(node)
        elif not (node.get_content_maintype() == "message" and encoding in ("base64", "quoted-printable")):
            stack.extend(child for child in node.get_payload() if isinstance(child, EmailPart))
    return found


def readable_zip_names(data: bytes) -> set[str] | None:
    """The ASCII member names of a zip that Python's zipfile reads whole, else None."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if archive.testzip() is not None:
                return None
            return {info.filename for info in archive.infolist() if not info.is_dir() and info.filename.isascii()}
    except Exception:  # a mutated zip fails in any way
        return None


def test_seed_is_whole():
    names = {part.path for part in walk(SEED).parts}
    assert {"files.zip/invoice.pdf.exe", "files.zip/docs/readme.txt", "fwd.eml/a.pdf"} <= names


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(raw):
    walk(raw)


@FUZZ
@given(MUTATIONS)
def test_mutated_multipart_with_zip(mutations):
    raw = mutate(SEED, mutations)
    result = walk(raw)
    if result.unchecked:
        return
    members = {part.name for part in result.parts if part.in_archive}
    for leaf in leaves(raw):
        names = readable_zip_names(leaf.get_payload(decode=True) or b"")
        if names:
            assert names <= members, (names, result)


@FUZZ
@given(st.text(alphabet="AQw+/=\r\n \t!", max_size=64))
def test_base64_bodies_decode_as_the_email_package_does(body):
    """The walker decodes clean base64 itself (to spare memory): sizes must match the email package's."""
    raw = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body.encode()
    walk(raw)
