"""Make attacker-controlled text (virus names, addresses, reasons) safe for headers, replies and logs."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^\x21-\x7e ]")  # everything but printable ASCII and space


def printable(text: str, limit: int = 200) -> str:
    """Printable ASCII only, control characters and non-ASCII as `?`, at most `limit` characters.

    Safe inside a header value, an SMTP reply and a log line: no CR, LF, NUL or escape sequences.
    `%` is removed too, because libmilter drops a reply that carries a single `%`.
    """
    text = _UNSAFE.sub("?", text).replace("%", "?")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def address(addr: str) -> str:
    """An envelope address for a log line, in angle brackets like Postfix writes it."""
    return "<" + printable(addr.strip("<>"), 320) + ">"
