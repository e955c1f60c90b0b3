"""How the header section of a passed message changes: the one place that knows.

`header_edits` lists the edits (forged copies of our headers removed, ours added on top, the
Subject tagged), `edited` makes them on a list, so the DKIM signer signs the header section the
recipient will get, and actions.py makes them through libmilter.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .authresults import claims_our_id
from .policy import is_own_header

log = logging.getLogger("milterd")

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
    incoming: Sequence[tuple[str, str]], added: Sequence[tuple[str, str]], subject_tag: str, authserv_id: str
) -> list[Edit]:
    """What a passed message's header section goes through at end of message, in order.

    `incoming`: the message's headers as (name, value); copies of our own headers are removed, and
    Authentication-Results that carry our authserv-id (RFC 8601 section 5); `added` goes on top;
    the first Subject gets `subject_tag`.
    """
    edits = []
    names = [name for name, _ in incoming]
    counts = Counter(name.lower() for name in names)
    own = {n.lower(): n for n in names if is_own_header(n)}
    for lower, name in own.items():
        for index in range(counts[lower], 0, -1):  # from the last, so indexes stay valid
            edits.append(Edit("change", name, "", index))
    results = [value for name, value in incoming if name.lower() == "authentication-results"]
    for index in range(len(results), 0, -1):
        if claims_our_id(results[index - 1], authserv_id):
            edits.append(Edit("change", "Authentication-Results", "", index))
    edits += on_top(added)
    subject = next((value for name, value in incoming if name.lower() == "subject"), None)
    if subject_tag and subject is None:
        edits.append(Edit("add", "Subject", subject_tag.rstrip()))
    elif subject_tag and not subject.lstrip().startswith(subject_tag.strip()):
        try:
            (subject_tag + subject).encode("utf-8")  # what pymilter sends; a raw non-UTF-8 Subject cannot be
        except UnicodeEncodeError:
            log.warning("Subject is not valid UTF-8; not tagged")
        else:
            edits.append(Edit("change", "Subject", subject_tag + subject, 1))
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
