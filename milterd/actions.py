"""A Verdict as milter actions: header edits, Subject tag, reply code, accept/reject/discard/tempfail.

The one place that knows how the header section changes: `header_edits` lists the edits,
`apply` makes them through libmilter, and `edited` makes them on a list, so the DKIM signer
signs the header section the recipient will get.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class Edit:
    """One milter header action, as libmilter takes it.

    change: the `index`-th (from 1) header called `name` gets `value`; "" deletes it (smfi_chgheader).
    insert: a header at position `index` (0 = the top) (smfi_insheader).
    add: a header at the end of the header section (smfi_addheader).
    """

    op: Literal["change", "insert", "add"]
    name: str
    value: str
    index: int = 0


def header_edits(
    verdict: Verdict,
    header_names: Sequence[str],
    subject: str | None,
    forged_results: Sequence[int] = (),
) -> list[Edit]:
    """What an accepted message's header section goes through at end of message, in order.

    `header_names` are the incoming headers in order (to remove forged copies of ours),
    `subject` the incoming Subject or None, `forged_results` the indexes of incoming
    Authentication-Results headers that carry our authserv-id (RFC 8601 section 5).
    """
    edits = []
    counts = Counter(name.lower() for name in header_names)
    own = {n.lower(): n for n in header_names if is_own_header(n)}
    for lower, name in own.items():
        for index in range(counts[lower], 0, -1):  # from the last, so indexes stay valid
            edits.append(Edit("change", name, "", index))
    for index in sorted(forged_results, reverse=True):
        edits.append(Edit("change", "Authentication-Results", "", index))
    edits += on_top(verdict.headers)
    tag = verdict.subject_tag
    if tag and subject is None:
        edits.append(Edit("add", "Subject", tag.rstrip()))
    elif tag and not subject.lstrip().startswith(tag.strip()):
        try:
            (tag + subject).encode("utf-8")  # what pymilter sends; a raw non-UTF-8 Subject cannot be
        except UnicodeEncodeError:
            log.warning("Subject is not valid UTF-8; not tagged")
        else:
            edits.append(Edit("change", "Subject", tag + subject, 1))
    return edits


def on_top(headers: Sequence[tuple[str, str]]) -> list[Edit]:
    """Insert `headers`, folded, above all others, in the order given."""
    return [Edit("insert", name, fold(value), 0) for name, value in reversed(headers)]


def edited(headers: Sequence[tuple[str, str]], edits: Sequence[Edit]) -> list[tuple[str, str]]:
    """The header section after `edits`, as the MTA applies them: what the recipient will see."""
    result = list(headers)
    for edit in edits:
        if edit.op == "insert":
            result.insert(edit.index, (edit.name, edit.value))
        elif edit.op == "add":
            result.append((edit.name, edit.value))
        else:
            found = [i for i, (name, _) in enumerate(result) if name.lower() == edit.name.lower()]
            if edit.index > len(found):
                continue
            at = found[edit.index - 1]
            if edit.value:
                result[at] = (result[at][0], edit.value)
            else:
                del result[at]
    return result


def apply(ctx: Milter.Base, verdict: Verdict, edits: Sequence[Edit] = ()) -> int:
    """Carry out `verdict` on the milter context at end of message; returns the milter result code.

    `edits` (from header_edits) are made only when the verdict accepts the message.
    """
    if verdict.reply is not None:
        ctx.setreply(verdict.reply.code, verdict.reply.xcode, verdict.reply.text)
    if verdict.action != "accept":
        return RESULT[verdict.action]
    for edit in edits:
        if edit.op == "change":
            ctx.chgheader(edit.name, edit.index, edit.value)
        elif edit.op == "insert":
            ctx.addheader(edit.name, edit.value, edit.index)
        else:
            ctx.addheader(edit.name, edit.value)
    return Milter.ACCEPT
