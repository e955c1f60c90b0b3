"""SPF (RFC 7208) with pyspf: the envelope sender against the client address, or the HELO name for bounces.

Not checked: SASL-authenticated clients and loopback (our own users and this host).

pyspf looks names up through its module-level `spf.DNSLookup`. Building an SpfCheck replaces it,
for the whole process, by a dispatcher to the lookup of the check that is running, held in a
context variable: each check keeps its own resolver, and concurrent checks in other threads never
see each other's.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import spf

from ..dns import DnsError
from ..findings import Finding, SpfResult
from ..message import Message
from ..sanitize import printable
from . import Check

_lookup: contextvars.ContextVar[Callable[..., list]] = contextvars.ContextVar("spf_lookup")
_pyspf_lookup = spf.DNSLookup


def _dispatch(name, qtype, strict=True, timeout=20):
    """pyspf's DNSLookup: the running check's lookup (pyspf's own outside a check); DNS failures are TempError."""
    lookup = _lookup.get(_pyspf_lookup)
    try:
        return lookup(name, qtype, strict, timeout)
    except DnsError as e:
        raise spf.TempError(f"DNS {e}") from None


class SpfCheck(Check):
    name = "spf"

    def __init__(self, lookup: Callable[..., list], timeout: float = 20.0):
        """`lookup(name, qtype, strict, timeout)` as pyspf's DNSLookup, raising DnsError when DNS fails.

        `timeout` bounds the whole evaluation, every lookup included (RFC 7208 4.6.4 suggests at
        least 20 s); the pipeline's deadline is a second later, so a slow DNS shows as temperror.
        """
        self.lookup = lookup
        self.dns_budget = timeout
        self.timeout = timeout + 1
        spf.DNSLookup = _dispatch

    def run(self, message: Message) -> Finding:
        env = message.envelope
        if not env.client_ip:
            return self.finding("skipped", detail="no client address (scan without --client-ip)")
        own = env.own_submission()
        if own:
            return self.finding("skipped", detail=own)
        sender = env.mail_from.strip().strip("<>")
        if not sender and not env.helo:
            return self.finding("skipped", detail="null sender and no HELO name")
        try:  # the null sender checks postmaster@HELO (RFC 7208 2.4): pyspf does that itself
            query = spf.query(i=env.client_ip, s=sender, h=env.helo, timeout=self.dns_budget, querytime=self.dns_budget)
        except spf.PermError as e:  # the client address is not an IP address
            return self.finding("error", detail=printable(f"client address {env.client_ip}: {e}"))
        if "." not in query.o.strip(".") or query.o.startswith("["):  # RFC 7208 4.3: none, without a lookup
            return self.finding("ok", spf=SpfResult("none", query.ident, printable(query.o, 255), "not a domain name"))
        token = _lookup.set(self.lookup)
        try:
            result, _, explanation = query.check()
        finally:
            _lookup.reset(token)
        return self.finding(
            "ok",
            spf=SpfResult(result, query.ident, printable(query.o, 255), printable(explanation, 200)),
        )
