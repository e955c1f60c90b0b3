"""amavis' bad-header tests: each one positive and negative, then hostile input."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterd.headers import MAX_PROBLEMS, bad_headers

pytestmark = pytest.mark.unit

BASE = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"


def problems(extra: bytes = b"") -> list[str]:
    return bad_headers(BASE + extra)


def test_clean_section_folded_and_encoded_word():
    section = BASE + (
        b"Received: from a.example (a.example [192.0.2.1])\r\n\tby mx.example with ESMTP\r\n"
        b"Received: from b.example\r\n  by a.example\r\n"
        b"Subject: =?UTF-8?B?Y2Fmw6k=?=\r\n"
        b"To: b@example.com,\r\n c@example.com\r\n"
    )
    assert bad_headers(section) == []


def test_crlf_lf_mix_and_trailing_empty_line():
    assert bad_headers(b"From: a\nDate: b\r\nSubject: c\n\tfolded\r\n\r\n") == []


def test_stops_at_the_empty_line():
    assert problems(b"Subject: ok\r\n\r\nbody line without colon \x00\xff\r\n") == []
    assert problems(b"\nSubject: x\nSubject: y\n") == []


def test_empty_input_misses_from_and_date():
    expected = ['Missing required header field: "Date"', 'Missing required header field: "From"']
    assert bad_headers(b"") == expected
    assert bad_headers(b"\r\n") == expected


def test_missing():
    assert bad_headers(b"Date: x\r\n") == ['Missing required header field: "From"']
    assert bad_headers(b"from: a\r\nDATE: x\r\n") == []


def test_8bit_in_a_continuation_line():
    assert problems(b"Subject: a\r\n b\xe9\r\n") == ["Non-encoded 8-bit data (char E9 hex) in message header 'Subject'"]


def test_raw_utf8_is_accepted_as_amavis_does_since_2_10_but_not_other_8bit():
    assert problems(b"Subject: caf\xc3\xa9 \xf0\x9f\x98\x80\r\n") == []
    assert problems(b"Subject: caf\xe9\r\n") == ["Non-encoded 8-bit data (char E9 hex) in message header 'Subject'"]
    assert problems(b"Subject: a\xc3\r\n") == ["Non-encoded 8-bit data (char C3 hex) in message header 'Subject'"]
    assert problems(b"Subject: \xed\xa0\x80 surrogate\r\n") == [
        "Non-encoded 8-bit data (char ED hex) in message header 'Subject'"
    ]
    assert problems(b"Subject: a\xc2\x85b\r\n") == [
        "UTF-8 string contains C1 Controls (char C2 85 hex) in message header 'Subject'"
    ]


def test_8bit_field_name_is_syntax():
    assert problems(b"Subj\xc3\xa9ct: x\r\n") == ["Invalid header field syntax: Subj??ct: x"]


@pytest.mark.parametrize("char", [0x00, 0x01, 0x0B, 0x0C, 0x0D, 0x1B, 0x1F, 0x7F])
def test_control(char):
    assert problems(b"X-Foo: a%cb\r\n" % char) == [
        f"Improper use of control character (char {char:02X} hex) in message header 'X-Foo'"
    ]


def test_tab_and_crlf_are_not_control():
    assert problems(b"X-Foo:\ta\tb\r\n\tc\r\n") == []


def test_bare_cr():
    assert problems(b"X-Foo: a\rb\r\n") == ["Improper use of control character (char 0D hex) in message header 'X-Foo'"]
    assert problems(b"X-Foo: a\r\r\n") == ["Improper use of control character (char 0D hex) in message header 'X-Foo'"]


def test_section_with_nul():
    assert problems(b"Subject: \x00\x00\r\nX-Bar: \x00\r\n") == [
        "Improper use of control character (char 00 hex) in message header 'Subject'",
        "Improper use of control character (char 00 hex) in message header 'X-Bar'",
    ]


def test_empty():
    found = ["Improper folded header field made up entirely of whitespace in message header 'Subject'"]
    assert problems(b"Subject: a\r\n \r\n b\r\n") == found
    assert problems(b"Subject: a\r\n\t \r\n") == found
    assert problems(b"Subject: a\r\n b\r\n") == []


def test_long():
    found = ["Header line longer than 998 characters in message header 'X-Long'"]
    assert problems(b"X-Long: " + b"a" * 5000 + b"\r\n") == found
    assert problems(b"X-Long: a\r\n " + b"a" * 998 + b"\r\n") == found
    assert problems(b"X-Long: " + b"a" * 990 + b"\r\n") == []  # 998, CRLF not counted
    assert problems(b"X-Long: " + b"a" * 990 + b"\n") == []
    assert problems(b"X-Long: " + b"a" * 991 + b"\r\n") == found  # 999


def test_syntax():
    assert problems(b"No colon here\r\n") == ["Invalid header field syntax: No colon here"]
    assert problems(b": no name\r\n") == ["Invalid header field syntax: : no name"]
    assert problems(b"Bad name: x\r\n") == ["Invalid header field syntax: Bad name: x"]
    assert problems(b"From sender@example.com Mon Jan  1 00:00:00 2024\r\n") == [
        "Invalid header field syntax: From sender@example.com Mon Jan  1 00:00:00 2024"
    ]


def test_syntax_continuation_first():
    assert bad_headers(b" folded\r\n" + BASE) == ["Invalid header field syntax:  folded"]


def test_syntax_continuations_of_an_invalid_line_are_not_examined():
    assert problems(b"junk\r\n \x00\xff\r\n") == ["Invalid header field syntax: junk"]


def test_whitespace_before_colon_is_obsolete_but_accepted():
    assert bad_headers(b"From : a\r\nDate\t: b\r\n") == []
    assert bad_headers(b"From : a\r\nFrom: b\r\nDate: c\r\n") == ['Duplicate header field: "From"']


def test_multiple():
    assert problems(b"From: b\r\n") == ['Duplicate header field: "From"']
    assert problems(b"subject: a\r\nSUBJECT: b\r\nSubject: c\r\n") == [
        'Header field occurs more than once: "Subject" occurs 3 times'
    ]
    assert problems(b"Content-Type: text/plain\r\nContent-Type: text/html\r\n") == [
        'Duplicate header field: "Content-Type"'
    ]
    assert problems(b"Received: a\r\n" * 500 + b"Comments: a\r\nComments: b\r\nSubject: one\r\n") == []


def test_each_problem_once_per_field_name():
    assert problems(b"Received: \xe9\r\n" * 500 + b"Received: \xff\r\n") == [
        "Non-encoded 8-bit data (char E9 hex) in message header 'Received'"
    ]


def test_field_name_is_sanitised_and_capped():
    name = b"X-%" + b"n" * 500
    [problem] = problems(name + b": \x00\r\n")
    assert problem == "Improper use of control character (char 00 hex) in message header 'X-?" + "n" * 54 + "...'"


def test_capped():
    found = bad_headers(b"".join(b"junk %d\r\n" % i for i in range(5000)))
    assert len(found) == MAX_PROBLEMS


def test_fast_on_100_kb():
    received = b"Received: from a.example (a.example [192.0.2.1])\r\n\tby mx.example with ESMTP id 1234567890\r\n"
    sections = [BASE + received * 1100, b"X: a\r\n" + b" \r\n" * 33000, b"a:\x00\r\n" * 25000]
    for section in sections:
        start = time.perf_counter()
        bad_headers(section)
        assert time.perf_counter() - start < 0.5  # a few ms, with room for a loaded machine


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_give_few_short_printable_problems(data):
    found = bad_headers(data)
    assert isinstance(found, list) and len(found) <= MAX_PROBLEMS
    assert all(isinstance(p, str) and len(p) <= 140 and re.fullmatch(r"[ -~]+", p) and "%" not in p for p in found)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"From: a", b"Date: b", b"Subject: c", b" folded", b"\t", b"", b"X :y"]),
            st.binary(max_size=40),
        ),
        max_size=30,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_header_like_lines_never_raise(lines, eol):
    found = bad_headers(eol.join(lines))
    assert all(len(p) <= 140 and re.fullmatch(r"[ -~]+", p) for p in found)
