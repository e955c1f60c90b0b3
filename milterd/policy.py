"""Findings + one recipient policy -> one Verdict, the amavis way. Pure: no I/O, no clock.

amavis decides per recipient; milterd keeps one policy per SMTP transaction (recipients whose
policy differs are deferred at RCPT time), so one verdict covers every recipient of a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Literal

from . import authresults
from .findings import Finding
from .sanitize import printable


class Category(IntEnum):
    """amavis content categories (ccat majors), higher wins."""

    CLEAN = 1
    BAD_HEADER = 4
    SPAMMY = 5
    SPAM = 6
    UNCHECKED = 7
    BANNED = 8
    VIRUS = 9


class Destiny(StrEnum):
    PASS = "PASS"
    DISCARD = "DISCARD"
    BOUNCE = "BOUNCE"
    REJECT = "REJECT"


Action = Literal["accept", "reject", "discard", "tempfail", "quarantine"]
ScannerFailure = Literal["tempfail", "unchecked"]


@dataclass(frozen=True)
class Destinies:
    """`[destiny]` in rules/policy.toml; defaults are amavis' (upstream and Debian agree)."""

    virus: Destiny = Destiny.DISCARD
    banned: Destiny = Destiny.DISCARD
    unchecked: Destiny = Destiny.PASS
    spam: Destiny = Destiny.PASS
    bad_header: Destiny = Destiny.PASS


@dataclass(frozen=True)
class SubjectTags:
    """`[subject_tags]`: what is prepended to the Subject of passed mail, for local recipients."""

    virus: str = "***INFECTED*** "
    unchecked: str = "***UNCHECKED*** "
    spammy: str = "***SPAM*** "


@dataclass(frozen=True)
class Policy:
    """The settings that apply to one recipient. Defaults are Debian amavis' (the seed's base)."""

    tag_level: float = 2.0  # X-Spam-* headers at or above; -999 = always (amavis' undef)
    tag2_level: float = 6.31  # SPAMMY: X-Spam-Flag YES and the Subject tag
    kill_level: float = 6.31  # SPAM: the spam destiny applies
    dsn_cutoff_level: float = 10.0  # at or above, a BOUNCE is a silent discard (no backscatter)
    scanner_failure: ScannerFailure = "tempfail"
    destiny: Destinies = field(default_factory=Destinies)
    subject_tags: SubjectTags = field(default_factory=SubjectTags)
    # Refuse mail whose From domain's DMARC policy says reject and that failed it (amavis has no
    # DMARC; off by default, so mailing lists that break signatures keep flowing until you decide).
    dmarc_reject: bool = False
    local: bool = False  # recipient in local_domains: gets spam headers and Subject tags


@dataclass(frozen=True)
class Reply:
    code: str
    xcode: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.xcode} {self.text}"


@dataclass(frozen=True)
class Verdict:
    category: Category  # the main category (the highest)
    categories: tuple[Category, ...]
    action: Action
    reply: Reply | None = None  # for reject and tempfail
    spam_score: float | None = None
    headers: tuple[tuple[str, str], ...] = ()  # to add, unfolded
    subject_tag: str = ""
    reason: str = ""  # why it blocked, for the log

    @property
    def blocked(self) -> bool:
        return self.action != "accept"


def is_own_header(name: str) -> bool:
    """Headers milterd writes; copies arriving from outside are removed so nobody can forge them."""
    name = name.lower()
    return name.startswith("x-spam-") or name == "x-amavis-alert"


def format_score(value: float) -> str:
    """amavis' score format: %.3f with trailing zeros (and a bare point) dropped."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def decide(findings: Mapping[str, Finding], policy: Policy, *, sender: str, hostname: str) -> Verdict:
    """The amavis walk: categories high to low, the first whose destiny is not PASS blocks."""
    viruses = tuple(v for f in findings.values() for v in f.viruses)
    banned = tuple(part for f in findings.values() for part, _ in f.banned)
    bad_headers = tuple(problem for f in findings.values() for problem in f.bad_headers)
    failed = [f for f in findings.values() if f.critical and f.failed]
    uninspected = failed + [f for f in findings.values() if f.critical and f.status == "unchecked"]
    scores = [f.spam_score for f in findings.values() if f.spam_score is not None]
    score = sum(scores) if scores else None

    categories = {Category.CLEAN}
    if viruses:
        categories.add(Category.VIRUS)
    if banned:
        categories.add(Category.BANNED)
    if uninspected:
        categories.add(Category.UNCHECKED)
    if bad_headers:
        categories.add(Category.BAD_HEADER)
    if score is not None and score >= policy.kill_level:
        categories.add(Category.SPAM)
    if score is not None and score >= policy.tag2_level:
        categories.add(Category.SPAMMY)
    ordered = tuple(sorted(categories, reverse=True))

    unchecked_why = ", ".join(
        f"{f.name} {f.status}" + (f" ({f.detail})" if f.status == "unchecked" else "") for f in uninspected
    )
    # amavis' X-Amavis-Alert texts; the same facts make the reject reason
    alerts = {
        Category.VIRUS: f"INFECTED, message contains virus: {', '.join(viruses)}",
        Category.BANNED: f"BANNED, message contains {', '.join(banned)}",
        Category.UNCHECKED: f"UNCHECKED, {unchecked_why}",
        Category.BAD_HEADER: f"BAD HEADER SECTION, {'; '.join(bad_headers)}",
    }
    for category in ordered:
        if category is Category.UNCHECKED and failed and policy.scanner_failure == "tempfail":
            reply = Reply("451", "4.7.1", printable(f"Try again later: {unchecked_why}"))
            return Verdict(ordered[0], ordered, "tempfail", reply, score, reason=unchecked_why)
        destiny = _destiny(category, policy)
        if destiny is Destiny.PASS:
            continue
        why = _reason(category, viruses, banned, bad_headers, score, unchecked_why)
        if destiny is Destiny.DISCARD or (
            destiny is Destiny.BOUNCE and score is not None and score >= policy.dsn_cutoff_level
        ):
            return Verdict(ordered[0], ordered, "discard", None, score, reason=why)
        xcode = "5.6.0" if category is Category.BAD_HEADER else "5.7.0"
        reply = Reply("554", xcode, printable(f"Rejected: {why}"))
        return Verdict(ordered[0], ordered, "reject", reply, score, reason=why)

    dmarc = next((f.dmarc for f in findings.values() if f.dmarc is not None), None)
    if policy.dmarc_reject and dmarc is not None and dmarc.result == "fail" and dmarc.disposition == "reject":
        why = f"DMARC policy of {dmarc.domain} is reject"
        reply = Reply("550", "5.7.1", printable(f"Rejected: {why}"))
        return Verdict(ordered[0], ordered, "reject", reply, score, reason=why)
    return Verdict(
        ordered[0],
        ordered,
        "accept",
        None,
        score,
        headers=_headers(findings, policy, ordered, alerts, score, hostname),
        subject_tag=_subject_tag(policy, ordered),
    )


def _destiny(category: Category, policy: Policy) -> Destiny:
    return {
        Category.VIRUS: policy.destiny.virus,
        Category.BANNED: policy.destiny.banned,
        Category.UNCHECKED: policy.destiny.unchecked,
        Category.SPAM: policy.destiny.spam,
        Category.BAD_HEADER: policy.destiny.bad_header,
    }.get(category, Destiny.PASS)


def _reason(category, viruses, banned, bad_headers, score, unchecked) -> str:
    if category is Category.VIRUS:
        return f"virus {', '.join(viruses)} found"
    if category is Category.BANNED:
        return f"message contains banned file {', '.join(banned)}"
    if category is Category.BAD_HEADER:
        return f"bad header section: {'; '.join(bad_headers)}"
    if category is Category.UNCHECKED:
        return f"message could not be checked ({unchecked})"
    if category is Category.SPAM:
        return f"spam, score {format_score(score or 0)}"
    return category.name.lower().replace("_", " ")


def _headers(findings, policy, categories, alerts, score, hostname):
    headers = []
    dkim, spf, dmarc = findings.get("dkim"), findings.get("spf"), findings.get("dmarc")
    authentication = authresults.header_value(
        hostname,
        dkim.dkim if dkim is not None and dkim.status == "ok" else None,
        spf.spf if spf else None,
        dmarc.dmarc if dmarc else None,
    )
    if authentication:
        headers.append(("Authentication-Results", authentication))
    clamav = findings.get("clamav")
    if clamav is not None and clamav.status == "ok":
        headers.append(("X-Virus-Scanned", f"milterd at {printable(hostname)}"))
    headers += [("X-Amavis-Alert", printable(text, 900)) for category, text in alerts.items() if category in categories]
    if policy.local and score is not None and score >= policy.tag_level:
        spammy = Category.SPAMMY in categories
        tests = ", ".join(f"{name}={format_score(points)}" for f in findings.values() for name, points in f.spam_tests)
        headers += [
            ("X-Spam-Flag", "YES" if spammy else "NO"),
            ("X-Spam-Score", format_score(score)),
            ("X-Spam-Level", "*" * min(64, int(score)) if score >= 1 else ""),
            (
                "X-Spam-Status",
                printable(
                    f"{'Yes' if spammy else 'No'}, score={format_score(score)}"
                    f" tagged_above={format_score(policy.tag_level)}"
                    f" required={format_score(policy.tag2_level)} tests=[{tests}]",
                    4000,
                ),
            ),
        ]
    return tuple(headers)


def _subject_tag(policy: Policy, categories: tuple[Category, ...]) -> str:
    if not policy.local:
        return ""
    tags = policy.subject_tags
    for category, tag in (
        (Category.VIRUS, tags.virus),
        (Category.UNCHECKED, tags.unchecked),
        (Category.SPAMMY, tags.spammy),
    ):
        if category in categories and tag:
            return tag
    return ""
