"""amavis' bad-header tests (`%allowed_header_tests`) on a raw header section, as one pure function.

The problem strings follow amavis' wording (Amavis::Unpackers::Validity), so an X-Amavis-Alert and a
log line read as they did under amavis. The `mime` test (MIME framing errors) is not here: it needs the parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .sanitize import printable

MAX_PROBLEMS = 20  # a hostile header section yields at most this many problems, each at most ~140 characters
MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF
NAME_LIMIT = 60  # characters of an attacker-controlled field name or line quoted in a problem

REQUIRED = ("Date", "From")  # RFC 5322 3.6: the two fields every message must have; amavis checks just these
# At most once: RFC 5322 3.6, plus the MIME and RFC 3834 fields amavis also counts, in amavis' order.
SINGLE = (
    "Date",
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Message-ID",
    "References",
    "In-Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Content-Disposition",
    "Auto-Submitted",
)
_COUNTED = frozenset(name.lower().encode() for name in SINGLE)

# A field name is printable ASCII but ':'; whitespace before the colon is RFC 5322 obs-optional, accepted as by amavis.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_NEXT_FIELD = re.compile(rb"\n(?![ \t])")  # a line end not followed by a continuation line
_EMPTY = re.compile(rb"\n[ \t]+(?:\n|\Z)")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")  # C0 but TAB and LF, and DEL; CRLF is LF by now
_C1 = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080..U+009F, which RFC 5198 bars from Net-Unicode


def bad_headers(header_section: bytes) -> list[str]:
    """Problems in a message's header section (the bytes before the first empty line, CRLF or LF line ends),
    as amavis' %allowed_header_tests finds them, each naming the header field. Empty list = clean.

    Each test reports once per field name (500 Received fields with 8-bit data are one problem), at most
    MAX_PROBLEMS in all, so the result stays small whatever the input. amavis' choices are kept: a line that is
    neither `name:` nor a continuation is a syntax problem and its continuations are not examined further; a
    continuation before any field is one too. Unlike amavis, every test runs on every valid field (amavis stops at
    the first), `control` covers all of C0 but TAB (amavis: NUL and CR only). Raw UTF-8 is accepted with or without
    SMTPUTF8, as amavis does since 2.10 (its `utf8` test is off by default: such mail is common); invalid
    UTF-8 and C1 controls are problems. Never raises.
    """
    text = header_section.replace(b"\r\n", b"\n")  # a CR left is a bare CR
    head = b"" if text.startswith(b"\n") else text.partition(b"\n\n")[0].removesuffix(b"\n")
    # Whole-section scans, so that a clean section costs one regex match per field.
    suspect = not head.isascii() or _CONTROL.search(head) or _EMPTY.search(head)
    problems: dict[object, str] = {}  # insertion-ordered; the key makes a repeated problem count once
    counts: dict[bytes, int] = {}
    for field in _NEXT_FIELD.split(head) if head else ():
        if len(problems) >= MAX_PROBLEMS:
            break
        match = _FIELD.match(field)
        if not match:
            first_line = field[: NAME_LIMIT + 1].split(b"\n", 1)[0]
            problem = f"Invalid header field syntax: {_quote(first_line)}"
            problems.setdefault(problem, problem)
            continue
        name = match[1]
        lower = name.lower()
        if lower in _COUNTED:
            counts[lower] = counts.get(lower, 0) + 1
        if suspect or len(field) > MAX_LINE:
            for test, problem in _field_problems(field):
                if (test, lower) not in problems:
                    problems[test, lower] = f"{problem} in message header '{_quote(name)}'"

    for field_name in SINGLE:
        count = counts.get(field_name.lower().encode(), 0)
        if count == 0 and field_name in REQUIRED:
            problems["missing", field_name] = f'Missing required header field: "{field_name}"'
        elif count == 2:
            problems["multiple", field_name] = f'Duplicate header field: "{field_name}"'
        elif count > 2:
            problems["multiple", field_name] = (
                f'Header field occurs more than once: "{field_name}" occurs {count} times'
            )
    return list(problems.values())[:MAX_PROBLEMS]


def _field_problems(field: bytes) -> Iterator[tuple[str, str]]:
    """(test, problem) for one valid field: its lines joined by LF, without the last line end."""
    if _EMPTY.search(field):
        yield "empty", "Improper folded header field made up entirely of whitespace"
    if len(field) > MAX_LINE and max(map(len, field.split(b"\n"))) > MAX_LINE:
        yield "long", f"Header line longer than {MAX_LINE} characters"
    control = _CONTROL.search(field)
    if control:
        yield "control", f"Improper use of control character (char {control[0][0]:02X} hex)"
    if not field.isascii():
        problem = _eight_bit(field)
        if problem:
            yield "8bit", problem


def _eight_bit(field: bytes) -> str | None:
    """8-bit data that is not UTF-8 (a charset we cannot know), or UTF-8 carrying C1 controls."""
    try:
        field.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"Non-encoded 8-bit data (char {field[error.start]:02X} hex)"
    c1 = _C1.search(field)
    return f"UTF-8 string contains C1 Controls (char C2 {c1[0][1]:02X} hex)" if c1 else None


def _quote(text: bytes) -> str:
    """Attacker-controlled bytes, printable and at most NAME_LIMIT characters."""
    return printable(text[: NAME_LIMIT + 1].decode("latin-1"), NAME_LIMIT)
