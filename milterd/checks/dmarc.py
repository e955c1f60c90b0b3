"""DMARC (RFC 7489) for the RFC5322.From domain: its owner's policy, and whether a DKIM or SPF pass aligns with it.

Results (RFC 8601 names):
- pass: a DKIM signature that passed (its d=) or an SPF pass (its domain) is aligned with the From
  domain: relaxed (the default), the same organizational domain; strict (adkim=s, aspf=s), the
  same name.
- fail: neither. `policy` is the record's p= (its sp= when the From domain is a subdomain whose
  policy came from its organizational domain's record) and `disposition` is that policy. pct= is
  not applied: sampling would make the same mail pass one day and be refused the next; the
  policy is reported whole and the operator's rules decide what a fail costs.
- none: no DMARC record at _dmarc.<From domain> nor at _dmarc.<organizational domain>, or more
  than one where the lookup stopped (RFC 7489 6.6.3: no DMARC processing).
- temperror: a policy lookup got no answer, or no aligned pass yet but an aligned DKIM or SPF
  result is temperror or its check did not answer: a DNS hiccup never turns into a fail.
- permerror: the message has no From field, several (RFC 5322 allows one; 6.6.1 lets a receiver
  reject such mail, we report it), no address with a domain, more than MAX_FROM_DOMAINS domains;
  or an address whose domain is not a domain name; or the record has no valid p= (or an invalid
  sp=) and no valid rua= (6.6.3 step 6; with a valid rua= it counts as p=none).

A From field with several authors (RFC 5322 3.6.2) in several domains is evaluated for each domain
and the strictest result is applied (RFC 7489 6.6.1), see `strictest`: that one is the result
reported, in the log and in Authentication-Results (header.from= its domain), it decides the
points, and a fail under p=reject asks for a reject. The other domains' results are in the detail.

When DKIM or SPF was skipped (a message over [dkim] max_size, `scan` without a client address)
and nothing aligned passed, the check is skipped too: a fail it could not establish is not a fail.
Not checked, as for SPF: SASL-authenticated clients and loopback (our own users and this host).

Organizational domains (RFC 7489 3.2) come from the Public Suffix List that the publicsuffixlist
package bundles, ICANN and private sections (no network): a name under an unknown TLD counts as
being under a one-label public suffix. The record parsing and alignment are our own rather than
the `dmarc` package's: its relaxed alignment is a suffix match (d=co.uk aligns with any
example.co.uk, the owner of github.io with every alice.github.io), its strict parser throws the
record away for one bad tag, and neither parser does 6.6.3's "invalid p= with a valid rua= is
p=none".
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from typing import ClassVar, Literal

import authres.dmarc

from ..dns import DnsError
from ..findings import Finding, scored
from ..message import Message
from ..sanitize import printable
from ..tomlschema import POSITIVE
from . import Check, register
from .dkim import SCORES as DKIM_SCORES
from .spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
# rules/scores.toml [dmarc]: SpamAssassin's names and points (its network score set, Bayes off)
SCORES = {
    "pass": ("DMARC_PASS", -0.001),
    "reject": ("DMARC_REJECT", 1.797),  # failed, and the domain asks for reject
    "quarantine": ("DMARC_QUAR", 1.198),
    "none": ("DMARC_NONE", 0.898),  # failed under p=none
    "missing": ("DMARC_MISSING", 0.001),  # no DMARC record
}


@dataclass(frozen=True)
class DmarcResult:
    """DMARC for the From domain: identifier alignment of the DKIM and SPF results, and the owner's policy."""

    method: ClassVar[str] = "dmarc"
    plural: ClassVar[bool] = False
    listed: ClassVar[bool] = True
    result: Literal["pass", "fail", "none", "temperror", "permerror"]
    domain: str  # the RFC5322.From domain, sanitised
    policy: Literal["none", "quarantine", "reject", ""] = ""  # p= (or sp= for a subdomain); "" without a record
    disposition: Literal["none", "quarantine", "reject"] = "none"  # what the policy asks for this message
    detail: str = ""

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}

    def authres(self) -> object:
        return authres.dmarc.DMARCAuthenticationResult(
            result=self.result, header_from=self.domain or None, policy=self.policy or None
        )


@dataclass(frozen=True)
class DmarcSettings:
    """DMARC for the From domain; built only when [dkim] and [spf] are both enabled (it judges their results)."""

    enabled: bool = True
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why
    timeout: float = field(default=10.0, metadata=POSITIVE)  # seconds for the policy lookups (From and org domain)


# 6.6.3 step 2: a DMARC record starts with v=DMARC1 ("DMARC1" is case-sensitive, 6.3)
_VERSION = re.compile(r"\s*[vV]\s*=\s*DMARC1\s*(?:;|$)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,]+(?:![0-9]+[kmgtKMGT]?)?")  # 6.4 dmarc-uri
_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")


# A From field naming more domains is not evaluated (permerror): each costs up to two DNS lookups.
MAX_FROM_DOMAINS = 10


class FromError(ValueError):
    """The message has no From domain to evaluate."""


class RecordError(ValueError):
    """The record cannot be used: no valid p= (or an invalid sp=) and no valid rua=."""


@dataclass(frozen=True)
class Record:
    """The tags of a DMARC record that decide a result; invalid values fall back to the defaults (6.3)."""

    p: str  # none, quarantine, reject
    sp: str = ""  # "" when absent: subdomains get p
    adkim: str = "r"  # r (relaxed) or s (strict)
    aspf: str = "r"
    pct: int = 100
    note: str = ""  # a problem that was let through, for the detail


def parse_record(text: str) -> Record:
    """A record that passed `is_dmarc_record`; RecordError when it cannot be used at all.

    Tolerant, as 6.3 asks: unknown tags and empty parts are ignored, an invalid adkim, aspf or pct
    falls back to its default, the first of repeated tags counts.
    """
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if eq and name:
            tags.setdefault(name, value.strip())
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower()
    adkim, aspf, pct = tags.get("adkim", "").lower(), tags.get("aspf", "").lower(), tags.get("pct", "")
    record = Record(
        p,
        sp,
        adkim if adkim in ("r", "s") else "r",
        aspf if aspf in ("r", "s") else "r",
        int(pct) if pct.isdigit() and int(pct) <= 100 else 100,
    )
    problem = ""
    if "p" not in tags:
        problem = "no p="
    elif p not in POLICIES:
        problem = f"invalid p={tags['p']}"
    elif "sp" in tags and sp not in POLICIES:
        problem = f"invalid sp={tags['sp']}"
    if not problem:
        return record
    if not any(_URI.fullmatch(uri.strip()) for uri in tags.get("rua", "").split(",")):
        raise RecordError(f"{problem} and no valid rua=")
    return Record("none", "", record.adkim, record.aspf, record.pct, f"{problem} with a rua=: taken as p=none")


def is_dmarc_record(text: str) -> bool:
    return _VERSION.match(text) is not None


def from_domains(message: Message) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The RFC5322.From domains (lower-case, IDNA A-labels, each once, in the order of the field), and
    why any other address cannot be evaluated ("x is not a domain name").

    FromError when there is nothing to evaluate: no From field, several From fields, no address with
    a domain, no address with a valid domain, or more than MAX_FROM_DOMAINS domains.
    """
    header = message.header_section()
    parsed = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
        header.decode("utf-8", "replace"), headersonly=True
    )
    fields = parsed.get_all("From") or []
    if not fields:
        raise FromError("no From field")
    if len(fields) > 1:
        raise FromError(f"{len(fields)} From fields")
    domains: list[str] = []
    problems: list[str] = []
    for _, address in getaddresses(fields):
        if "@" not in address:
            continue
        try:
            domain = _normalise(address.rpartition("@")[2])
        except FromError as e:
            if str(e) not in problems:
                problems.append(str(e))
        else:
            if domain not in domains:
                domains.append(domain)
    if not domains:
        raise FromError(problems[0] if problems else "no address with a domain in From")
    if len(domains) > MAX_FROM_DOMAINS:
        raise FromError(f"From names {len(domains)} domains: more than {MAX_FROM_DOMAINS} are not evaluated")
    return tuple(domains), tuple(problems)


def _normalise(domain: str) -> str:
    text = domain.strip().rstrip(".")
    try:
        ascii_name = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise FromError(f"{text} is not a domain name") from None
    if len(ascii_name) > 253 or not _DOMAIN.fullmatch(ascii_name):
        raise FromError(f"{text} is not a domain name")
    return ascii_name


@dataclass(frozen=True)
class Skipped:
    """A From domain without a result: DKIM or SPF was skipped and nothing aligned passed."""

    domain: str
    detail: str


Outcome = DmarcResult | Skipped


def severity(outcome: Outcome) -> int:
    """How strict an outcome is; `strictest` picks the highest.

    7 fail under p=reject, 6 fail under p=quarantine, 5 fail under p=none: any fail beats every
    other result, and the policy that asks for more beats the one that asks for less.
    4 temperror: no fail, but one might be a fail once DNS answers.
    3 skipped (DKIM or SPF could not be checked): one might be a fail, and nothing says so.
    2 permerror: a broken record, or an address that is not a domain name.
    1 none: no DMARC record.
    0 pass: the message passes only when every From domain passes.
    """
    if isinstance(outcome, Skipped):
        return 3
    if outcome.result == "fail":
        return 5 + POLICIES.index(outcome.disposition)
    return {"temperror": 4, "permerror": 2, "none": 1, "pass": 0}[outcome.result]


def strictest(outcomes: list[Outcome]) -> Outcome:
    """RFC 7489 6.6.1 for a From field with several domains: the strictest result (see `severity`),
    the first in the From field among equals."""
    return max(outcomes, key=severity)  # max keeps the first of equal keys


@register(
    name="dmarc",
    settings=DmarcSettings,
    order=70,
    after=("dkim", "spf"),
    needs=("dkim", "spf"),
    scores={"dmarc": SCORES},
    build=lambda s, runtime: DmarcCheck(runtime.resolver.lookup, s.timeout, runtime.rules.scores),
)
class DmarcCheck(Check):
    def __init__(
        self,
        lookup: Callable[..., list],
        timeout: float = 10.0,
        points: Mapping[str, Mapping[str, float]] | None = None,
    ):
        """`lookup(name, rdtype, timeout)` as milterd.dns.Resolver.lookup: [] for no record, DnsError on failure.

        `timeout` bounds the policy lookups of one message (two at most); the pipeline's deadline
        is a second later, so a slow DNS shows as temperror, not as a check timeout. `points`:
        rules/scores.toml's [dmarc], and [dkim]'s valid_author (a passing signature of the From
        domain, which only DMARC knows).
        """
        from publicsuffixlist import PublicSuffixList

        self.lookup = lookup
        self.dns_budget = timeout
        self.timeout = timeout + 1
        self._psl = PublicSuffixList()  # read-only after loading: shared by every thread
        self.points = points or {
            "dmarc": {key: pts for key, (_, pts) in SCORES.items()},
            "dkim": {key: pts for key, (_, pts) in DKIM_SCORES.items()},
        }

    def org_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix plus one label; a public suffix is its own."""
        return self._psl.privatesuffix(domain) or domain

    def aligned(self, from_domain: str, domain: str, mode: str) -> bool:
        domain = domain.lower().rstrip(".")
        if not domain:
            return False
        if mode == "s":
            return domain == from_domain
        return self.org_domain(domain) == self.org_domain(from_domain)

    def skip_reason(self, message: Message, earlier: Mapping[str, Finding]) -> str | None:
        return message.envelope.own_submission()

    def run(self, message: Message) -> Finding:
        """Outside the pipeline there are no DKIM and SPF findings: nothing aligned can be known."""
        return self.run_after(message, {})

    def run_after(self, message: Message, earlier: Mapping[str, Finding]) -> Finding:
        try:
            domains, problems = from_domains(message)
        except FromError as e:
            return self._finding(earlier, DmarcResult("permerror", "", detail=str(e)))
        deadline = time.monotonic() + message.time_left(self.dns_budget)
        outcomes: list[Outcome] = [self._domain(message, earlier, domain, deadline) for domain in domains]
        outcomes += [DmarcResult("permerror", "", detail=problem) for problem in problems]
        chosen = strictest(outcomes)
        others = [_summary(o) for o in outcomes if o is not chosen]
        if others:
            chosen = replace(chosen, detail=f"{chosen.detail}; other From domains: {', '.join(others)}")
        if isinstance(chosen, Skipped):
            return self.finding("skipped", detail=printable(chosen.detail, 200))
        return self._finding(earlier, chosen)

    def _domain(self, message: Message, earlier: Mapping[str, Finding], domain: str, deadline: float) -> Outcome:
        """DMARC for one From domain: its policy (the domain's record, else its organizational domain's)."""
        org = self.org_domain(domain)
        try:
            records, where = self._records(domain, deadline), domain
            if not records and org != domain:
                records, where = self._records(org, deadline), org
        except DnsError as e:
            return DmarcResult("temperror", domain, detail=f"policy lookup: {e}")
        if not records:
            tried = f"_dmarc.{domain}" + (f" nor at _dmarc.{org}" if org != domain else "")
            return DmarcResult("none", domain, detail=f"no DMARC record at {tried}")
        if len(records) > 1:
            return DmarcResult("none", domain, detail=f"{len(records)} DMARC records at _dmarc.{where}")
        try:
            record = parse_record(records[0])
        except RecordError as e:
            return DmarcResult("permerror", domain, detail=f"_dmarc.{where}: {e}")
        policy = record.sp if where != domain and record.sp else record.p
        return self._evaluate(message, earlier, domain, record, policy)

    def _evaluate(
        self, message: Message, earlier: Mapping[str, Finding], domain: str, record: Record, policy: str
    ) -> Outcome:
        passed: list[str] = []  # aligned identifiers that passed
        unknown: list[str] = []  # why an aligned pass cannot be ruled out
        transient = False
        seen: list[str] = []  # the other results, for a fail's detail

        dkim = earlier.get("dkim")
        if dkim is None or dkim.status != "ok":
            unknown.append(f"DKIM {dkim.status if dkim else 'not run'}")
            transient |= dkim is not None and dkim.failed
        else:
            for signature in (r for r in dkim.authentication if r.method == "dkim" and r.listed):
                if not self.aligned(domain, signature.domain, record.adkim):
                    seen.append(f"dkim {signature.result} d={signature.domain} (not aligned)")
                elif signature.result == "pass":
                    passed.append(f"dkim d={signature.domain}")
                elif signature.result == "temperror":
                    unknown.append(f"dkim temperror d={signature.domain}")
                    transient = True
                else:
                    seen.append(f"dkim {signature.result} d={signature.domain}")

        spf_finding = earlier.get("spf")
        if spf_finding is None or spf_finding.status != "ok":
            unknown.append(f"SPF {spf_finding.status if spf_finding else 'not run'}")
            transient |= spf_finding is not None and spf_finding.failed
        elif (spf := next((r for r in spf_finding.authentication if isinstance(r, SpfResult)), None)) is not None:
            # RFC 7489 3.1.2: the MAIL FROM identity; HELO only stands in for a null reverse-path,
            # which is the one case SpfCheck checks it (postmaster@HELO, RFC 7208 2.4).
            usable = spf.identity == "mailfrom" or not message.envelope.mail_from.strip("<> ")
            if not (usable and self.aligned(domain, spf.domain, record.aspf)):
                seen.append(f"spf {spf.result} {spf.domain} (not aligned)")
            elif spf.result == "pass":
                passed.append(f"spf {spf.domain}")
            elif spf.result == "temperror":
                unknown.append(f"spf temperror {spf.domain}")
                transient = True
            else:
                seen.append(f"spf {spf.result} {spf.domain}")

        notes = [record.note] if record.note else []
        if record.pct < 100:
            notes.append(f"pct={record.pct} not applied")
        if passed:
            detail = "; ".join(["aligned: " + ", ".join(passed), *notes])
            return DmarcResult("pass", domain, policy, detail=detail)  # type: ignore[arg-type]
        if transient:
            detail = "no aligned pass yet: " + ", ".join(unknown)
            return DmarcResult("temperror", domain, policy, detail="; ".join([detail, *notes]))  # type: ignore[arg-type]
        if unknown:
            return Skipped(domain, "no aligned pass, and " + ", ".join(unknown))
        detail = "no aligned DKIM or SPF pass" + (": " + ", ".join(seen) if seen else "")
        return DmarcResult("fail", domain, policy, policy, detail="; ".join([detail, *notes]))  # type: ignore[arg-type]

    def _records(self, domain: str, deadline: float) -> list[str]:
        """The DMARC records at _dmarc.<domain> (other TXT records there are not DMARC's)."""
        texts = (
            b"".join(rdata.strings).decode("utf-8", "replace")
            for rdata in self.lookup(f"_dmarc.{domain}.", "TXT", deadline - time.monotonic())
        )
        return [text for text in texts if is_dmarc_record(text)]

    def _finding(self, earlier: Mapping[str, Finding], outcome: DmarcResult) -> Finding:
        """The result with its points, DKIM_VALID_AU among them; a fail under p=reject asks for a reject."""
        dmarc = replace(outcome, domain=printable(outcome.domain, 255), detail=printable(outcome.detail, 200))
        signed_by = {
            r.domain.lower()
            for f in earlier.values()
            for r in f.authentication
            if r.method == "dkim" and r.result == "pass"
        }
        symbols = []
        if outcome.domain and outcome.domain in signed_by:
            symbols.append((DKIM_SCORES["valid_author"][0], self.points["dkim"]["valid_author"]))
        key = {"pass": "pass", "none": "missing", "fail": outcome.disposition}.get(outcome.result)
        if key:
            symbols.append((SCORES[key][0], self.points["dmarc"][key]))
        reject = ""
        if outcome.result == "fail" and outcome.disposition == "reject":
            reject = f"DMARC policy of {dmarc.domain} is reject"
        return scored(
            self.name, "ok", symbols, critical=self.critical, authentication=(dmarc,), policy_reject=reject, data=dmarc
        )


def _summary(outcome: Outcome) -> str:
    """'example.net fail (policy reject)', 'example.org pass', 'permerror ([192.0.2.1] is not a domain name)'."""
    if isinstance(outcome, Skipped):
        return f"{outcome.domain} skipped"
    if not outcome.domain:
        return f"permerror ({outcome.detail})"
    policy = f" (policy {outcome.policy})" if outcome.result == "fail" else ""
    return f"{outcome.domain} {outcome.result}{policy}"
