"""Message.truncated: what spamd, Pyzor, Razor and DCC get of a message over their max_size."""

from __future__ import annotations

import pytest

from milterd.message import MAX_HEADER_SECTION, Envelope, Message, Spool

pytestmark = pytest.mark.unit


def message(raw: bytes, threshold: int = 1 << 20) -> Message:
    spool = Spool(threshold)
    spool.write(raw)
    return Message(Envelope(), spool)


def kept(msg: Message, max_body: int) -> bytes:
    view = msg.truncated(max_body)
    with view.open() as stream:
        data = stream.read()
    assert len(data) == view.size  # what spamd's Content-length says
    return data


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("threshold", [1 << 20, 64], ids=["memory", "disk"])
def test_the_header_section_whole_then_the_body_cut_after_the_last_line_end(eol, threshold):
    head = b"From: a@remote.test" + eol + b"Subject: big" + eol + eol
    lines = [b"line %04d of the body" % n + eol for n in range(100)]
    msg = message(head + b"".join(lines), threshold)
    assert msg.spool.on_disk == (threshold == 64)
    line = len(lines[0])
    # a cut in the middle of line 11 keeps ten lines
    assert kept(msg, 10 * line + line // 2) == head + b"".join(lines[:10])
    # a cut right at a line end keeps that line
    assert kept(msg, 10 * line) == head + b"".join(lines[:10])
    view = msg.truncated(10 * line)
    assert view.truncated and view.note() == f"truncated: first {view.size} of {msg.size} bytes scored"


def test_a_message_within_max_body_is_whole_and_not_read():
    msg = message(b"Subject: x\r\n\r\nshort\r\n")
    view = msg.truncated(msg.size)
    assert (view.size, view.truncated) == (msg.size, False)
    assert msg._cuts == {}  # nothing read to decide it


def test_a_body_within_max_body_is_whole_even_when_the_message_is_not():
    raw = b"Subject: " + b"x" * 500 + b"\r\n\r\nbody\r\n"
    view = message(raw).truncated(100)
    assert (view.size, view.truncated) == (len(raw), False)


def test_a_header_section_larger_than_max_body_is_kept_whole():
    head = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 60) for n in range(50)) + b"\r\n"
    body = b"first line\r\nsecond line\r\n" + b"z" * 5000 + b"\r\n"
    assert kept(message(head + body), 30) == head + b"first line\r\nsecond line\r\n"


def test_no_body():
    raw = b"Subject: " + b"x" * 500 + b"\r\nX-Other: y\r\n"  # no empty line, no body
    view = message(raw).truncated(100)
    assert (view.size, view.truncated) == (len(raw), False)
    empty = b"Subject: " + b"x" * 500 + b"\r\n\r\n"  # an empty body
    assert message(empty).truncated(100).size == len(empty)


def test_a_body_with_no_line_end_within_max_body_is_cut_at_max_body():
    head = b"Subject: x\n\n"
    assert kept(message(head + b"a" * 5000 + b"\n"), 1000) == head + b"a" * 1000


def test_a_header_section_past_its_bound_counts_the_rest_as_body():
    raw = b"X-Long: " + b"h" * (MAX_HEADER_SECTION + 100) + b"\nmore\n" + b"b" * 1000
    assert kept(message(raw, threshold=4096), 10) == raw[: MAX_HEADER_SECTION + 10]


def test_the_cut_is_found_once_per_max_body():
    msg = message(b"Subject: x\n\n" + b"line\n" * 1000)
    first = msg.truncated(100)
    assert msg._cuts == {100: first.size}
    assert msg.truncated(100) == first


def test_the_view_streams_a_large_message_from_disk_in_chunks():
    import tracemalloc

    msg = message(b"Subject: big\r\n\r\n", threshold=4096)
    msg.spool.write((b"y" * 78 + b"\r\n") * (50 * 1024 * 1024 // 80))  # 50 MB on disk
    tracemalloc.start()
    try:
        view = msg.truncated(512000)
        total = 0
        with view.open() as stream:
            while chunk := stream.read(64 * 1024):
                total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert view.truncated and total == view.size == 16 + 512000 // 80 * 80
    assert peak < 1 << 20, peak
