"""SPF (RFC 7208) with pyspf: the envelope sender against the client address, or the HELO name for bounces.

Not checked: SASL-authenticated clients and loopback (our own users and this host).

pyspf looks names up through its module-level `spf.DNSLookup`. Building an SpfCheck replaces it,
for the whole process, by a dispatcher to the lookup of the check that is running, held in a
context variable: each check keeps its own resolver, and concurrent checks in other threads never
see each other's.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import ClassVar, Literal

import authres

from ..dns import DnsError
from ..findings import Finding, scored
from ..message import Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

# rules/scores.toml [spf] and [spf_helo] (the null sender: the HELO name was checked):
# SpamAssassin's names and points (its network score set, Bayes off)
SCORES = {
    "spf": {
        "pass": ("SPF_PASS", -0.001),
        "fail": ("SPF_FAIL", 0.919),
        "softfail": ("SPF_SOFTFAIL", 0.972),
        "neutral": ("SPF_NEUTRAL", 0.652),
        "none": ("SPF_NONE", 0.001),
        "permerror": ("SPF_PERMERROR", 0.0),
        "temperror": ("SPF_TEMPERROR", 0.0),
    },
    "spf_helo": {
        "pass": ("SPF_HELO_PASS", -0.001),
        "fail": ("SPF_HELO_FAIL", 0.001),
        "softfail": ("SPF_HELO_SOFTFAIL", 0.896),
        "neutral": ("SPF_HELO_NEUTRAL", 0.001),
        "none": ("SPF_HELO_NONE", 0.001),
        "permerror": ("SPF_HELO_PERMERROR", 0.0),
        "temperror": ("SPF_HELO_TEMPERROR", 0.0),
    },
}

_lookup: contextvars.ContextVar[Callable[..., list]] = contextvars.ContextVar("spf_lookup")


@dataclass(frozen=True)
class SpfResult:
    """The SPF result for the envelope sender (or the HELO name when the sender is empty)."""

    method: ClassVar[str] = "spf"
    plural: ClassVar[bool] = False
    listed: ClassVar[bool] = True
    result: Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
    identity: Literal["mailfrom", "helo"]
    domain: str  # the domain checked, sanitised
    detail: str = ""  # pyspf's explanation, sanitised

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}

    def authres(self) -> object:
        identity = {"smtp_mailfrom": self.domain} if self.identity == "mailfrom" else {"smtp_helo": self.domain}
        return authres.SPFAuthenticationResult(result=self.result, **identity)


@dataclass(frozen=True)
class SpfSettings:
    enabled: bool = True
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    timeout: float = field(default=20.0, metadata=POSITIVE)  # seconds for the whole evaluation (RFC 7208 4.6.4)


@cache
def _pyspf():
    """pyspf, its DNS lookups sent to the running check's lookup (pyspf's own outside a check)."""
    import spf

    pyspf_lookup = spf.DNSLookup

    def dispatch(name, qtype, strict=True, timeout=20):
        """pyspf's DNSLookup; DNS failures are TempError."""
        lookup = _lookup.get(pyspf_lookup)
        try:
            return lookup(name, qtype, strict, timeout)
        except DnsError as e:
            raise spf.TempError(f"DNS {e}") from None

    spf.DNSLookup = dispatch
    return spf


@register(
    name="spf",
    settings=SpfSettings,
    order=60,
    scores=SCORES,
    build=lambda s, runtime: SpfCheck(runtime.resolver.spf_lookup, s.timeout, runtime.rules.scores),
)
class SpfCheck(Check):
    def __init__(
        self,
        lookup: Callable[..., list],
        timeout: float = 20.0,
        points: Mapping[str, Mapping[str, float]] | None = None,
    ):
        """`lookup(name, qtype, strict, timeout)` as pyspf's DNSLookup, raising DnsError when DNS fails.

        `timeout` bounds the whole evaluation, every lookup included (RFC 7208 4.6.4 suggests at
        least 20 s); the pipeline's deadline is a second later, so a slow DNS shows as temperror.
        `points`: rules/scores.toml's [spf] and [spf_helo] tables.
        """
        self.lookup = lookup
        self.dns_budget = timeout
        self.timeout = timeout + 1
        self.points = points or {t: {k: pts for k, (_, pts) in keys.items()} for t, keys in SCORES.items()}
        _pyspf()

    def run(self, message: Message) -> Finding:
        spf = _pyspf()
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
            budget = message.time_left(self.dns_budget)
            query = spf.query(i=env.client_ip, s=sender, h=env.helo, timeout=budget, querytime=budget)
        except spf.PermError as e:  # the client address is not an IP address
            return self.finding("error", detail=printable(f"client address {env.client_ip}: {e}"))
        if "." not in query.o.strip(".") or query.o.startswith("["):  # RFC 7208 4.3: none, without a lookup
            return self._ok(SpfResult("none", query.ident, printable(query.o, 255), "not a domain name"))
        token = _lookup.set(self.lookup)
        try:
            result, _, explanation = query.check()
        finally:
            _lookup.reset(token)
        return self._ok(SpfResult(result, query.ident, printable(query.o, 255), printable(explanation, 200)))

    def _ok(self, result: SpfResult) -> Finding:
        table = "spf" if result.identity == "mailfrom" else "spf_helo"
        symbol = (SCORES[table][result.result][0], self.points[table][result.result])
        return scored(self.name, "ok", [symbol], critical=self.critical, authentication=(result,), data=result)
