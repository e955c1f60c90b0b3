"""RFC 8601 Authentication-Results: the one header milterd writes for DKIM and SPF, and the test for
incoming copies that claim to be ours (RFC 8601 section 5: remove them, so nobody can forge our verdict)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import authres
import authres.dmarc

from .findings import DkimResult, DmarcResult, SpfResult
from .sanitize import printable

# authserv-id is the first token, after any comments: "mx.example.com 1; dkim=pass ..."
_AUTHSERV_ID = re.compile(r"\s*(?:\([^()]*\)\s*)*([^\s;()]+)")


def header_value(
    authserv_id: str, dkim: Sequence[DkimResult] | None, spf: SpfResult | None, dmarc: DmarcResult | None = None
) -> str | None:
    """The header's value; `dkim` None means DKIM was not verified (an empty list: no signature)."""
    results = []
    if dkim is not None:
        results += [
            authres.DKIMAuthenticationResult(
                result=d.result, header_d=d.domain or None, header_s=d.selector or None, header_a=d.algorithm or None
            )
            for d in dkim
        ] or [authres.DKIMAuthenticationResult(result="none")]
    if spf is not None:
        identity = {"smtp_mailfrom": spf.domain} if spf.identity == "mailfrom" else {"smtp_helo": spf.domain}
        results.append(authres.SPFAuthenticationResult(result=spf.result, **identity))
    if dmarc is not None:
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=dmarc.result, header_from=dmarc.domain or None, policy=dmarc.policy or None
            )
        )
    if not results:
        return None
    header = authres.AuthenticationResultsHeader(authserv_id=printable(authserv_id, 255), results=results)
    return str(header).split(": ", 1)[1]


def claims_our_id(value: str, authserv_id: str) -> bool:
    match = _AUTHSERV_ID.match(value)
    return bool(match) and match.group(1).lower() == authserv_id.lower()
