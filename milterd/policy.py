"""Findings + one recipient policy -> one Verdict, the amavis way. Pure: no I/O, no clock.

It only decides; what the verdict looks like in the message (headers, Subject tag) is render.py's.

amavis decides per recipient; milterd keeps one policy per SMTP transaction (recipients whose
policy differs are deferred at RCPT time), so one verdict covers every recipient of a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Literal

from .findings import Finding, Summary, summarize
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
    spammy: str = "***SPAM*** "  # at tag2_level ($sa_spam_subject_tag, SQL spam_subject_tag2)
    tagged: str = ""  # at tag_level ($sa_spam_subject_tag1, SQL spam_subject_tag); "" = none, as amavis' undef


INTERNAL = {"internal": True}  # field metadata: set by the lookups, never by a rules file


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
    # the categories whose mail is kept in quarantine (amavis' *_quarantine_to; Debian: virus, banned)
    quarantine: tuple[str, ...] = ("virus", "banned")
    quarantine_cutoff_level: float = 999.0  # spam at or above is not kept; 999 = always kept (amavis' undef)
    # amavis' *_lovers: the category is still found (alert, Subject tag), but its destiny is PASS
    virus_lover: bool = False
    banned_files_lover: bool = False
    unchecked_lover: bool = False
    spam_lover: bool = False
    bad_header_lover: bool = False
    # amavis' bypass_*_checks: the check is not run for the recipient, or its finding is ignored
    bypass_virus_checks: bool = False
    bypass_banned_checks: bool = False
    bypass_spam_checks: bool = False
    bypass_header_checks: bool = False
    # decide and log, but accept every message unchanged ([milter] dry_run for all; a bank for one port)
    dry_run: bool = False
    # Set per recipient by the lookups, never in policy.toml:
    local: bool = field(default=False, metadata=INTERNAL)  # gets spam headers and Subject tags
    sender_list: Literal["", "W", "B"] = field(default="", metadata=INTERNAL)  # the sender white- or blacklisted
    sender_score: float = field(default=0.0, metadata=INTERNAL)  # points the sender lists add (amavis' soft wblist)
    bank: str = field(default="", metadata=INTERNAL, compare=False)  # the policy banks applied, "/"-joined
    source: str = field(default="built-in", metadata=INTERNAL, compare=False)  # the most specific source used


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
    reason: str = ""  # why it blocked, for the log
    blocked_by: Category | None = None  # the category whose destiny blocked it

    @property
    def blocked(self) -> bool:
        return self.action != "accept"


def is_own_header(name: str) -> bool:
    """Headers milterd writes; copies arriving from outside are removed so nobody can forge them."""
    name = name.lower()
    return name.startswith("x-spam-") or name in ("x-amavis-alert", "x-quarantine-id")


def kept(policy: Policy, verdict: Verdict) -> str:
    """The quarantine category of this verdict ("" when the policy keeps no copy): the blocking
    category, or the main one of delivered mail (amavis keeps passed spam too); spam at or above
    quarantine_cutoff_level is not kept; nothing is kept of a tempfail (the sender retries)."""
    if verdict.action == "tempfail":
        return ""
    category = (verdict.blocked_by or verdict.category).name.lower()
    if category not in policy.quarantine:
        return ""
    if category == "spam" and verdict.spam_score is not None and verdict.spam_score >= policy.quarantine_cutoff_level:
        return ""
    return category


def format_score(value: float) -> str:
    """amavis' score format: %.3f with trailing zeros (and a bare point) dropped."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def spam_level(found: Summary, policy: Policy) -> float | None:
    """The score as this recipient's policy sees it: the checks' points plus what the sender lists
    add; None when no check scored, or when the recipient bypasses spam checks."""
    if policy.bypass_spam_checks or found.score is None:
        return None
    return found.score + policy.sender_score


def categories(found: Summary, policy: Policy) -> tuple[Category, ...]:
    """The message's categories for this policy, highest first.

    A whitelisted sender never reaches SPAMMY or SPAM, a blacklisted one always does (amavis). A
    DMARC fail under p=reject is SPAM when `dmarc_reject` is on: the domain owner's word weighs as
    a kill-level score would (SpamAssassin scores DMARC_REJECT the same way).
    """
    present = {Category.CLEAN}
    if found.viruses:
        present.add(Category.VIRUS)
    if found.banned:
        present.add(Category.BANNED)
    if found.uninspected:
        present.add(Category.UNCHECKED)
    if found.bad_headers:
        present.add(Category.BAD_HEADER)
    if _spam_by_level(found, policy, policy.kill_level) or _dmarc_reject(found, policy):
        present.add(Category.SPAM)
    if _spam_by_level(found, policy, policy.tag2_level):
        present.add(Category.SPAMMY)
    return tuple(sorted(present, reverse=True))


def decide(findings: Mapping[str, Finding] | Summary, policy: Policy) -> Verdict:
    """The amavis walk: categories high to low, the first whose destiny is not PASS blocks."""
    found = findings if isinstance(findings, Summary) else summarize(findings)
    score = spam_level(found, policy)
    ordered = categories(found, policy)
    unchecked_why = found.unchecked_why
    for category in ordered:
        if category is Category.UNCHECKED and found.failed and policy.scanner_failure == "tempfail":
            reply = Reply("451", "4.7.1", printable(f"Try again later: {unchecked_why}"))
            return Verdict(ordered[0], ordered, "tempfail", reply, score, reason=unchecked_why)
        destiny = _destiny(category, policy)
        if category is Category.SPAM and not _spam_by_level(found, policy, policy.kill_level):
            destiny = Destiny.PASS  # SPAM by the DMARC policy alone: that reject follows
        if destiny is Destiny.PASS:
            if category is Category.SPAM and _dmarc_reject(found, policy):
                reply = Reply("550", "5.7.1", printable(f"Rejected: {found.policy_reject}"))
                return Verdict(ordered[0], ordered, "reject", reply, score, found.policy_reject, category)
            continue
        why = _reason(category, found, score, policy, unchecked_why)
        if destiny is Destiny.DISCARD or (
            destiny is Destiny.BOUNCE and score is not None and score >= policy.dsn_cutoff_level
        ):
            return Verdict(ordered[0], ordered, "discard", None, score, reason=why, blocked_by=category)
        xcode = "5.6.0" if category is Category.BAD_HEADER else "5.7.0"
        reply = Reply("554", xcode, printable(f"Rejected: {why}"))
        return Verdict(ordered[0], ordered, "reject", reply, score, reason=why, blocked_by=category)
    return Verdict(ordered[0], ordered, "accept", None, score)


def _spam_by_level(found: Summary, policy: Policy, level: float) -> bool:
    if policy.sender_list:
        return policy.sender_list == "B" and not policy.bypass_spam_checks
    score = spam_level(found, policy)
    return score is not None and score >= level


def _dmarc_reject(found: Summary, policy: Policy) -> bool:
    return policy.dmarc_reject and bool(found.policy_reject)


def _destiny(category: Category, policy: Policy) -> Destiny:
    """The category's destiny for this recipient: PASS for its lovers."""
    destiny, lover = {
        Category.VIRUS: (policy.destiny.virus, policy.virus_lover),
        Category.BANNED: (policy.destiny.banned, policy.banned_files_lover),
        Category.UNCHECKED: (policy.destiny.unchecked, policy.unchecked_lover),
        Category.SPAM: (policy.destiny.spam, policy.spam_lover),
        Category.BAD_HEADER: (policy.destiny.bad_header, policy.bad_header_lover),
    }.get(category, (Destiny.PASS, False))
    return Destiny.PASS if lover else destiny


def _reason(category: Category, found: Summary, score: float | None, policy: Policy, unchecked: str) -> str:
    if category is Category.VIRUS:
        return f"virus {', '.join(found.viruses)} found"
    if category is Category.BANNED:
        return f"message contains banned file {', '.join(found.banned)}"
    if category is Category.BAD_HEADER:
        return f"bad header section: {'; '.join(found.bad_headers)}"
    if category is Category.UNCHECKED:
        return f"message could not be checked ({unchecked})"
    if category is Category.SPAM and policy.sender_list == "B":
        return "spam, sender blacklisted"
    if category is Category.SPAM:
        return f"spam, score {format_score(score or 0)}"
    return category.name.lower().replace("_", " ")
