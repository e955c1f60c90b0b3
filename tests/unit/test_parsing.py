"""Byte-level helpers: spamd REPORT replies, header folding, sanitising, and the message spool."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterd import message as message_module
from milterd.checks.spamd import SpamdError, parse_reply
from milterd.edits import fold
from milterd.message import Spool
from milterd.sanitize import address, printable

pytestmark = pytest.mark.unit

# spamd REPORT replies

# Recorded from SpamAssassin 4.0.1's spamd, byte for byte.
GTUBE_REPLY = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 829\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
    b'Spam detection software, running on the system "vm",\nhas identified this incoming email as possible spam.'
    b"  The original\nmessage has been attached to this so you can view it or label\nsimilar future email."
    b"  If you have any questions, see\n@@CONTACT_ADDRESS@@ for details.\n\n"
    b"Content preview:  This is the GTUBE, the Generic Test for Unsolicited Bulk Email\n"
    b"   XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X \n\n"
    b"Content analysis details:   (1000.0 points, 5.0 required)\n\n"
    b" pts rule name              description\n"
    b"---- ---------------------- --------------------------------------------------\n"
    b"-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
    b"-0.0 NO_RELAYS              Informational: message was not relayed via SMTP\n"
    b"1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n\n"
)


def report(
    spam_header: bytes,
    table: bytes,
    preview: bytes = b"Hello Bob, lunch on Thursday? \n",
) -> bytes:
    """A REPORT reply of the recorded shape with other rules in its table."""
    body = (
        b'Spam detection software, running on the system "vm",\nhas NOT identified this incoming email as spam.'
        b"  The original\nmessage has been attached to this so you can view it or label\nsimilar future email."
        b"  If you have any questions, see\n@@CONTACT_ADDRESS@@ for details.\n\n"
        b"Content preview:  " + preview + b"\n"
        b"Content analysis details:   (-0.0 points, 5.0 required)\n\n"
        b" pts rule name              description\n"
        b"---- ---------------------- --------------------------------------------------\n" + table + b"\n"
    )
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n%s\r\n\r\n%s" % (
        len(body),
        spam_header,
        body,
    )


CLEAN_REPLY = report(
    b"Spam: False ; -0.0 / 5.0",
    b"-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
    b"-0.0 NO_RELAYS              Informational: message was not relayed via SMTP\n",
)


def test_the_recorded_gtube_reply():
    # the body is exactly the recorded Content-length
    assert len(GTUBE_REPLY.partition(b"\r\n\r\n")[2]) == 829
    assert parse_reply(GTUBE_REPLY) == (
        1000.0,
        5.0,
        (("NO_RECEIVED", -0.0), ("NO_RELAYS", -0.0), ("GTUBE", 1000.0)),
    )


def test_a_clean_reply():
    score, required, tests = parse_reply(CLEAN_REPLY)
    assert (score, required, tests) == (
        0.0,
        5.0,
        (("NO_RECEIVED", 0.0), ("NO_RELAYS", 0.0)),
    )


def test_wrapped_description_lines_are_not_rules():
    reply = report(
        b"Spam: True ; 5.6 / 5.0",
        b" 0.0 URIBL_BLOCKED          ADMINISTRATOR NOTICE: The query to URIBL was blocked.\n"
        b"                            See\n"
        b"                            http://wiki.apache.org/spamassassin/DnsBlocklists#dnsbl-block\n"
        b"                            for more information.\n"
        b"                            [URIs: example.com]\n"
        b"-1.9 BAYES_00               BODY: Bayes spam probability is 0 to 1%\n"
        b"                            [score: 0.0000]\n"
        b" 7.5 LOCAL_WRAPPED          A description long enough to wrap onto\n"
        b"                            2 lines, this one starting with a digit\n"
        b"                            100 LOOKS_LIKE_A_RULE but is description\n",
    )
    assert parse_reply(reply) == (
        5.6,
        5.0,
        (("URIBL_BLOCKED", 0.0), ("BAYES_00", -1.9), ("LOCAL_WRAPPED", 7.5)),
    )


def test_lines_before_the_rule_table_are_not_rules():
    reply = report(
        b"Spam: False ; 1.0 / 5.0",
        b" 1.0 REAL_RULE              yes\n",
        preview=b"   5.0 FAKE_RULE in the preview\n",
    )
    assert parse_reply(reply)[2] == (("REAL_RULE", 1.0),)


def test_spam_header_variants():
    assert parse_reply(report(b"Spam: Yes ; 12.5 / 6.31", b""))[:2] == (12.5, 6.31)
    assert parse_reply(report(b"spam: false; -3.2/5.0", b""))[:2] == (-3.2, 5.0)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"SPAMD/1.0 76 Bad header line", "spamd: Bad header line"),
        (b"SPAMD/1.0 76 Bad header line\r\n", "spamd: Bad header line"),
        (
            b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 10 bytes, got 5 bytes)\r\n\r\n",
            "spamd: Bad header line: (Content-Length mismatch",
        ),
        (
            b"SPAMD/1.1 68 service unavailable: TELL commands are not enabled\r\n\r\n",
            "spamd: service unavailable",
        ),
        (b"garbage", "not a spamd reply: garbage"),
        (b"", "not a spamd reply"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "not a spamd reply: HTTP/1.1 200 OK",
        ),
        (b"\xff\xfe\x00\x01\r\n\r\n", "not a spamd reply"),
        (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
            "spamd reply without a Spam: header",
        ),
        (
            b"SPAMD/1.1 0 EX_OK\r\n\r\nSpam: True ; 1000.0 / 5.0\r\n",
            "spamd reply without a Spam: header",
        ),
    ],
)
def test_a_reply_that_is_not_a_result_raises_spamd_error(reply, message):
    with pytest.raises(SpamdError) as e:
        parse_reply(reply)
    assert str(e.value).startswith(message)


def test_spamd_error_text_is_sanitised():
    with pytest.raises(SpamdError) as e:
        parse_reply(b"SPAMD/1.0 76 Bad\x1b[31m %s header\xff")
    assert re.fullmatch(r"[\x20-\x7e]*", str(e.value)) and "%" not in str(e.value)


@pytest.mark.parametrize("score", [b"1.2.3", b"."])
def test_a_malformed_score_raises_spamd_error(score):
    with pytest.raises(SpamdError):
        parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; " + score + b" / 5.0\r\n\r\n")


# actions.fold: long header values at spaces, LF-TAB continuation

STATUS = (
    "Yes, score=1012.4 tagged_above=2 required=6.31 tests=["
    + ", ".join(f"RULE_NUMBER_{i:02d}={i}.5" for i in range(20))
    + "]"
)


def test_a_short_value_is_not_folded():
    assert fold("Yes, score=7.1 tagged_above=2 required=6.31 tests=[A=1.1, B=2]") == (
        "Yes, score=7.1 tagged_above=2 required=6.31 tests=[A=1.1, B=2]"
    )


def test_a_long_x_spam_status_folds_into_lines_of_at_most_76():
    folded = fold(STATUS)
    lines = folded.split("\n\t")
    assert len(lines) > 5
    assert all(0 < len(line) <= 76 for line in lines)
    assert "\n" not in folded.replace("\n\t", "")
    assert folded.replace("\n\t", " ") == STATUS


def test_each_line_is_filled_before_folding():
    assert fold("aaaa bbbb cccc dddd", width=9) == "aaaa bbbb\n\tcccc dddd"
    assert fold("aaaa bbbb cccc dddd", width=8) == "aaaa\n\tbbbb\n\tcccc\n\tdddd"


def test_a_word_longer_than_the_width_is_never_split():
    word = "x" * 100
    assert fold(word) == word
    assert fold(f"a {word} b") == f"a\n\t{word}\n\tb"


def test_an_empty_value_stays_empty():
    assert fold("") == ""


@pytest.mark.parametrize("value", ["x" * 76 + "  y", " leading"])
def test_fold_never_loses_a_space(value):
    assert fold(value).replace("\n\t", " ") == value


words = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=90),
    max_size=40,
)


@given(words, st.integers(min_value=10, max_value=200))
def test_fold_round_trips_and_respects_the_width(words, width):
    value = " ".join(words)
    folded = fold(value, width)
    assert folded.replace("\n\t", " ") == value
    for line in folded.split("\n\t"):
        assert len(line) <= width or " " not in line  # only a single over-long word may exceed it


# sanitize.printable: attacker text made safe for headers, replies and logs


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("a\rb", "a?b"),
        ("a\nb", "a?b"),
        ("a\r\nBcc: x", "a??Bcc: x"),
        ("a\x00b", "a?b"),
        ("\x1b[31mred", "?[31mred"),
        ("a\tb", "a?b"),
        ("a\x7fb", "a?b"),
        ("100%", "100?"),
        ("%s%n", "?s?n"),
        ("caf\u00e9", "caf?"),
        ("\u65e5\u672c", "??"),
        ("\U0001f600", "?"),
        ("\u202egpj.exe", "?gpj.exe"),
        ("Win.Test.EICAR_HDB-1 ~!@#$^&*()", "Win.Test.EICAR_HDB-1 ~!@#$^&*()"),
        ("", ""),
    ],
)
def test_printable(text, safe):
    assert printable(text) == safe


def test_printable_limits_the_length_with_an_ellipsis():
    assert printable("a" * 200) == "a" * 200
    assert printable("a" * 201) == "a" * 197 + "..."
    assert printable("abcdefghijkl", 10) == "abcdefg..."
    assert len(printable("\n" * 5000, 900)) == 900


@given(st.text(), st.integers(min_value=3, max_value=500))
def test_printable_output_is_always_safe(text, limit):
    safe = printable(text, limit)
    assert re.fullmatch(r"[\x20-\x7e]*", safe)
    assert "%" not in safe
    assert len(safe) <= limit


def test_address_is_bracketed_and_sanitised():
    assert address("user@example.com") == "<user@example.com>"
    assert address("<user@example.com>") == "<user@example.com>"
    assert address("") == "<>"
    assert address("a\r\nb%@x") == "<a??b?@x>"


# message.Spool: in memory up to the threshold, an unlinked temp file past it


def spool_of(chunks, threshold: int) -> Spool:
    spool = Spool(threshold)
    for chunk in chunks:
        spool.write(chunk)
    return spool


def test_a_small_message_stays_in_memory():
    spool = spool_of([b"Subject: hi\r\n\r\n", b"body\r\n"], threshold=100)
    assert (spool.on_disk, spool.size) == (False, 21)
    assert spool.reader().read() == b"Subject: hi\r\n\r\nbody\r\n"


def test_exactly_the_threshold_stays_in_memory_one_byte_more_goes_to_disk():
    assert not spool_of([b"x" * 10], threshold=10).on_disk
    assert spool_of([b"x" * 11], threshold=10).on_disk
    assert spool_of([b"x" * 6, b"y" * 6], threshold=10).on_disk


def test_a_message_past_the_threshold_is_read_back_whole_from_disk():
    data = bytes(range(256)) * 1000
    spool = spool_of([data[i : i + 1000] for i in range(0, len(data), 1000)], threshold=4096)
    assert spool.on_disk and spool.size == len(data)
    assert spool.reader().read() == data
    spool.close()


def test_a_threshold_of_zero_puts_everything_on_disk():
    spool = spool_of([b"a"], threshold=0)
    assert spool.on_disk and spool.reader().read() == b"a"
    spool.close()


@pytest.mark.parametrize("threshold", [1 << 20, 1000])
def test_two_readers_read_the_full_bytes_independently(threshold):
    data = b"".join(b"line %06d\r\n" % i for i in range(20000))
    spool = spool_of([data], threshold)
    assert spool.on_disk is (threshold < len(data))
    first, second = spool.reader(), spool.reader()
    head = first.read(1000)
    assert second.read() == data
    assert head + first.read() == data
    third = spool.reader()
    interleaved = b""
    fourth = spool.reader()
    while chunk := third.read(4093):
        interleaved += chunk
        fourth.read(7)
    assert interleaved == data
    spool.close()


def test_copy_of_a_stream():
    data = b"x" * 200_000
    spool = Spool.copy_of(io.BytesIO(data), threshold=1000)
    assert spool.on_disk and spool.size == len(data) and spool.reader().read() == data
    spool.close()


def test_close_frees_the_temp_file_and_the_memory(monkeypatch, tmp_path):
    made = []
    real = message_module.tempfile.TemporaryFile

    def tracking(*args, **kwargs):
        made.append((kwargs.get("dir"), real(*args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(message_module.tempfile, "TemporaryFile", tracking)
    on_disk = Spool(10, directory=str(tmp_path))
    on_disk.write(b"x" * 100)
    [(directory, file)] = made
    assert directory == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked: a crash leaves nothing behind
    on_disk.close()
    assert file.closed and not on_disk.on_disk

    in_memory = spool_of([b"y" * 5], threshold=10)
    in_memory.close()
    assert in_memory.reader().read() == b""
    on_disk.close()  # closing twice is harmless


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.binary(max_size=300), max_size=12),
    st.integers(min_value=0, max_value=1200),
)
def test_a_spool_reads_back_exactly_what_was_written(chunks, threshold):
    spool = spool_of(chunks, threshold)
    try:
        data = b"".join(chunks)
        assert spool.size == len(data)
        assert spool.on_disk is (len(data) > threshold)
        one, two = spool.reader(), spool.reader()
        assert one.read(len(data) // 2) + two.read() == data[: len(data) // 2] + data
        assert one.read() == data[len(data) // 2 :]
    finally:
        spool.close()


def test_a_reader_outlives_its_spool_and_keeps_its_own_bytes():
    """A check past its deadline may still be reading when the message is done and closed."""
    spool = spool_of([b"first message " * 10], threshold=10)
    reader = spool.reader()
    spool.close()
    other = spool_of([b"other message " * 10], threshold=10)  # may reuse the closed descriptor's number
    assert reader.read() == b"first message " * 10
    reader.close()
    other.close()
