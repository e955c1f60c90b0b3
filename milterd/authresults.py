"""RFC 8601 Authentication-Results: the one header milterd writes for DKIM and SPF, and the test for
incoming copies that claim to be ours (RFC 8601 section 5: remove them, so nobody can forge our verdict)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import authres

from .findings import AuthResult
from .sanitize import printable

# authserv-id is the first token, after any comments: "mx.example.com 1; dkim=pass ..."
_AUTHSERV_ID = re.compile(r"\s*(?:\([^()]*\)\s*)*([^\s;()]+)")


def header_value(authserv_id: str, results: Sequence[AuthResult]) -> str | None:
    """The header's value, one method result each, in the order given; None when there is none."""
    if not results:
        return None
    header = authres.AuthenticationResultsHeader(
        authserv_id=printable(authserv_id, 255), results=[r.authres() for r in results]
    )
    return str(header).split(": ", 1)[1]


def claims_our_id(value: str, authserv_id: str) -> bool:
    match = _AUTHSERV_ID.match(value)
    return bool(match) and match.group(1).lower() == authserv_id.lower()
