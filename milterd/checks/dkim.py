"""DKIM verification of every DKIM-Signature with dkimpy; keys through the one resolver (milterd.dns).

Results, per signature (RFC 8601 names for RFC 6376's outcomes):
- pass: the signature verifies with its key.
- fail: it does not: the body hash or the header signature does not match (the message changed).
- permerror: it cannot ever verify: no key record (NXDOMAIN or no TXT), a malformed or revoked
  (empty p=) key, a key under 1024 bits, a syntax error in the signature, From not signed
  (RFC 6376 6.1.1), an algorithm we do not accept (rsa-sha1, RFC 8301), an expired x= or a t= in
  the future. Expiry is a permerror, not a fail: RFC 6376 6.1.1 has the verifier ignore such a
  signature (PERMFAIL, "signature expired"), and "fail" would say the content was altered.
  dkimpy allows 10 hours of clock skew for x= and t=.
- temperror: the key lookup got no answer (timeout, SERVFAIL) or the time ran out: a later
  attempt may pass, and a DNS failure never blocks mail (the check is not critical).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import authres

from ..dns import DnsError
from ..findings import Finding, scored
from ..message import Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register

if TYPE_CHECKING:
    import dkim

MAX_SIGNATURES = 10  # verified per message; each costs a key lookup and a pass over the body
# rules/scores.toml [dkim]: SpamAssassin's names and points (its network score set, Bayes off)
SCORES = {
    "signed": ("DKIM_SIGNED", 0.1),  # at least one signature
    "valid": ("DKIM_VALID", -0.1),  # at least one passes
    "valid_author": ("DKIM_VALID_AU", -0.1),  # one from the From domain passes (DMARC knows that domain)
    "invalid": ("DKIM_INVALID", 0.1),  # signed, and none passes
}

# dkimpy logs attacker-controlled text (key records, header values) at error level; our results
# carry the reason, sanitised, so its own logger stays silent.
_SILENT = logging.Logger("dkimpy")
_SILENT.setLevel(logging.CRITICAL + 1)


_SIGNED = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class DkimResult:
    """One DKIM signature's verification (RFC 8601 names); "none" stands for a message without one."""

    method: ClassVar[str] = "dkim"
    plural: ClassVar[bool] = True
    result: Literal["pass", "fail", "neutral", "temperror", "permerror", "none"]
    domain: str  # d=, sanitised
    selector: str  # s=, sanitised
    algorithm: str = ""  # a=, e.g. rsa-sha256, ed25519-sha256
    detail: str = ""  # why it did not pass

    @property
    def listed(self) -> bool:
        return self.result != "none"

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}

    def authres(self) -> object:
        return authres.DKIMAuthenticationResult(
            result=self.result,
            header_d=self.domain or None,
            header_s=self.selector or None,
            header_a=self.algorithm or None,
        )


UNSIGNED = DkimResult("none", "", "")


@dataclass(frozen=True)
class DkimSettings:
    enabled: bool = True
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    timeout: float = field(default=10.0, metadata=POSITIVE)  # seconds for the key lookups of all signatures
    # dkimpy holds the message in memory: larger mail is not verified
    max_size: int = field(default=25 * 1024 * 1024, metadata=POSITIVE)


@register(
    name="dkim",
    settings=DkimSettings,
    order=50,
    scores={"dkim": SCORES, "dkim_domains": None},
    build=lambda s, runtime: DkimCheck(
        runtime.resolver.dkim_txt, s.timeout, s.max_size, runtime.scores("dkim"), runtime.scores("dkim_domains")
    ),
)
class DkimCheck(Check):
    def __init__(
        self,
        dnsfunc: Callable[..., bytes],
        timeout: float = 10.0,
        max_size: int = 25 * 1024 * 1024,
        points: Mapping[str, float] | None = None,
        domain_points: Mapping[str, float] | None = None,
    ):
        """`dnsfunc(name, timeout=)`: the key record as bytes, b"" when there is none, DnsError on failure.

        `timeout` bounds the key lookups of all of a message's signatures; the pipeline's deadline
        is a second later, so a slow DNS shows as temperror per signature, not as a check timeout.
        `points`: rules/scores.toml's [dkim]; `domain_points`: [dkim_domains], points for a passing
        signature of these domains (amavis' whitelist_auth habit).
        """
        import dkim  # noqa: F401  dkimpy, loaded when the engine is built, not by the first message

        self.dnsfunc = dnsfunc
        self.dns_budget = timeout
        self.timeout = timeout + 1
        self.max_size = max_size
        self.points = points or {key: pts for key, (_, pts) in SCORES.items()}
        self.domain_points = domain_points or {}

    def run(self, message: Message) -> Finding:
        import dkim

        if message.size > self.max_size:  # dkimpy holds the whole message in memory
            return self.finding("skipped", detail=f"larger than max_size ({message.size} > {self.max_size} bytes)")
        if not _SIGNED.search(message.header_section()):  # most mail: no need to load and parse all of it
            return self._ok(())
        with message.open() as stream:
            data = stream.read()
        try:
            verifier = dkim.DKIM(data, logger=_SILENT, minkey=1024)
        except (dkim.DKIMException, IndexError) as e:  # a header line dkimpy cannot split: nothing can be verified
            return self._ok((), printable(f"header section not parsed: {e}"))
        signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
        keys = _Keys(self.dnsfunc, time.monotonic() + message.time_left(self.dns_budget))
        results = tuple(_verify(verifier, i, value, keys) for i, value in enumerate(signatures[:MAX_SIGNATURES]))
        more = len(signatures) - MAX_SIGNATURES
        return self._ok(results, f"{more} more signatures not verified" if more > 0 else "")

    def _ok(self, results: tuple[DkimResult, ...], detail: str = "") -> Finding:
        """The results with the points they earn: signed, valid or invalid, and per trusted domain."""
        symbols = []
        if results:
            passed = {r.domain.lower() for r in results if r.result == "pass"}
            symbols = [self._symbol("signed"), self._symbol("valid" if passed else "invalid")]
            symbols += [(f"DKIM_DOMAIN_{d}", self.domain_points[d]) for d in sorted(passed & self.domain_points.keys())]
        return scored(
            self.name,
            "ok",
            symbols,
            critical=self.critical,
            detail=detail,
            authentication=results or (UNSIGNED,),
            data=results,
        )

    def _symbol(self, key: str) -> tuple[str, float]:
        return SCORES[key][0], self.points[key]


class _Keys:
    """The dnsfunc dkimpy calls for one message: each key name looked up once, within the message's deadline.

    It keeps what each lookup returned, so a signature that did not verify can be told apart:
    a key problem (permerror) from a signature that does not match its good key (fail).
    """

    def __init__(self, dnsfunc: Callable[..., bytes], deadline: float):
        self._dnsfunc, self._deadline = dnsfunc, deadline
        self.records: dict[bytes, bytes | DnsError] = {}

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes:
        if name not in self.records:
            try:
                self.records[name] = self._dnsfunc(name, timeout=self._deadline - time.monotonic())
            except DnsError as e:
                self.records[name] = e
        record = self.records[name]
        if isinstance(record, DnsError):
            raise record
        return record


def _verify(verifier: dkim.DKIM, idx: int, header_value: bytes, keys: _Keys) -> DkimResult:
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        tags = parse_tag_value(header_value)
    except InvalidTagValueList as e:  # d= and s= unknown: dkimpy would fail the same way
        return DkimResult("permerror", "", "", detail=printable(f"malformed tag list: {type(e).__name__} {e}"))

    def result(outcome: str, detail: str = "") -> DkimResult:
        return DkimResult(
            outcome,  # type: ignore[arg-type]
            domain=_text(tags.get(b"d", b""), 100),
            selector=_text(tags.get(b"s", b""), 100),
            algorithm=_text(tags.get(b"a", b""), 40),
            detail=printable(detail, 200),
        )

    if tags.get(b"a") == b"rsa-sha1":
        return result("permerror", "rsa-sha1 is not accepted (RFC 8301)")
    if b"h" in tags and b"from" not in (h.strip().lower() for h in tags[b"h"].split(b":")):
        return result("permerror", "From is not signed")
    try:
        if verifier.verify(idx=idx, dnsfunc=keys):
            return result("pass")
    except DnsError as e:
        return result("temperror", f"key lookup: {e}")
    except dkim.ValidationError as e:
        return result("fail" if str(e).startswith("body hash mismatch") else "permerror", _short(e))
    except dkim.DKIMException as e:  # bad c=, key too small, unknown key type
        return result("permerror", _short(e))
    except Exception as e:  # dkimpy lets its parsers' errors out on hostile values (b= padding, ed25519 length)
        return result("permerror", f"malformed signature: {type(e).__name__}: {e}")
    name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
    problem = _key_problem(name, keys.records.get(name, b""))
    return result("permerror", problem) if problem else result("fail", "signature did not verify")


def _key_problem(name: bytes, record: bytes) -> str:
    """Why a key record cannot verify anything, or "" when it is a usable key."""
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    shown = _text(name, 120)
    if not record:
        return f"no key record at {shown}"
    try:
        if not parse_tag_value(record).get(b"p", b"x").strip():
            return f"key revoked (empty p=) at {shown}"
        dkim.evaluate_pk(name, record)
    except (InvalidTagValueList, dkim.DKIMException, ValueError) as e:
        return f"bad key record at {shown}: {_short(e)}"
    return ""


def _short(error: Exception) -> str:
    """dkimpy's message without the long base64 values it quotes."""
    return str(error).split(" (", 1)[0]


def _text(value: bytes, limit: int) -> str:
    return printable(value.decode("ascii", "replace"), limit)
