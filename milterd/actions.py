"""A Disposition carried out through libmilter: header edits, the reply, accept/reject/discard/tempfail."""

from __future__ import annotations

import Milter

from .engine import Outcome

RESULT = {
    "accept": Milter.ACCEPT,
    "reject": Milter.REJECT,
    "discard": Milter.DISCARD,
    "tempfail": Milter.TEMPFAIL,
}


def apply(ctx: Milter.Base, outcome: Outcome, leading_space: bool = False) -> int:
    """Carry out `outcome` on the milter context at end of message; returns the milter result code.

    Its header edits are made only when the message is accepted. `leading_space`: SMFIP_HDR_LEADSPC
    was negotiated, so the MTA writes a value as given: ours get the space after the colon.
    """
    space = " " if leading_space else ""
    reply = outcome.reply
    if reply is not None:
        ctx.setreply(reply.code, reply.xcode, reply.text)
    if outcome.verdict.action != "accept" and not outcome.dry_run:
        return RESULT[outcome.verdict.action]
    for edit in outcome.edits:
        value = space + edit.value if edit.value else ""  # "" deletes a header
        if edit.op == "change":
            ctx.chgheader(edit.name, edit.index, value)
        elif edit.op == "insert":
            ctx.addheader(edit.name, value, edit.index)
        else:
            ctx.addheader(edit.name, value)
    return Milter.ACCEPT
