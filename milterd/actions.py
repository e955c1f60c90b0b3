"""A Verdict as milter actions: header edits, Subject tag, reply code, accept/reject/discard/tempfail."""

from __future__ import annotations

import logging
import re
from collections import Counter

import Milter

from .policy import Verdict, is_own_header

log = logging.getLogger("milterd")

RESULT = {
    "accept": Milter.ACCEPT,
    "reject": Milter.REJECT,
    "discard": Milter.DISCARD,
    "tempfail": Milter.TEMPFAIL,
}


_FOLD_POINT = re.compile(r"(?<=\S) (?=\S)")


def fold(value: str, width: int = 76) -> str:
    """Fold a long header value at single spaces between words, with the LF-TAB continuation
    libmilter expects; every other space stays where it is."""
    lines, line = [], ""
    for word in _FOLD_POINT.split(value):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n\t".join(lines)


def apply(
    ctx: Milter.Base, verdict: Verdict, header_names: list[str], subject: str | None, forged_results: list[int] = ()
) -> int:
    """Carry out `verdict` on the milter context at end of message; returns the milter result code.

    `header_names` are the incoming headers in order (to remove forged copies of ours),
    `subject` the incoming Subject or None, `forged_results` the indexes of incoming
    Authentication-Results headers that carry our authserv-id (RFC 8601 section 5).
    """
    if verdict.reply is not None:
        ctx.setreply(verdict.reply.code, verdict.reply.xcode, verdict.reply.text)
    if verdict.action != "accept":
        return RESULT[verdict.action]

    counts = Counter(name.lower() for name in header_names)
    own = {n.lower(): n for n in header_names if is_own_header(n)}
    for lower, name in own.items():
        for index in range(counts[lower], 0, -1):  # from the last, so indexes stay valid
            ctx.chgheader(name, index, "")
    for index in sorted(forged_results, reverse=True):
        ctx.chgheader("Authentication-Results", index, "")
    for name, value in reversed(verdict.headers):
        ctx.addheader(name, fold(value), 0)
    tag = verdict.subject_tag
    if tag and subject is None:
        ctx.addheader("Subject", tag.rstrip())
    elif tag and not subject.lstrip().startswith(tag.strip()):
        try:
            ctx.chgheader("Subject", 1, tag + subject)
        except UnicodeEncodeError:
            log.warning("Subject is not valid UTF-8; not tagged")
    return Milter.ACCEPT
