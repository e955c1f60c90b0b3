"""What a passed message carries of its verdict: the headers milterd adds and the Subject tag.

Authentication-Results (RFC 8601), X-Virus-Scanned, amavis' X-Amavis-Alert and X-Spam-* headers,
and `***SPAM***`-style tags; spam headers and tags only for local recipients, as amavis.
Deciding is policy.py's; this only renders what was decided.
"""

from __future__ import annotations

from . import authresults
from .findings import Summary
from .policy import Category, Policy, Verdict, format_score
from .sanitize import printable


def rendered(
    found: Summary, policy: Policy, verdict: Verdict, hostname: str
) -> tuple[tuple[tuple[str, str], ...], str]:
    """(headers to add, Subject tag) of a passed message; nothing for a blocked one."""
    if verdict.action != "accept":
        return (), ""
    return added_headers(found, policy, verdict, hostname), subject_tag(policy, verdict)


def added_headers(found: Summary, policy: Policy, verdict: Verdict, hostname: str) -> tuple[tuple[str, str], ...]:
    """(name, unfolded value) pairs to add, top first."""
    headers = []
    authentication = authresults.header_value(hostname, found.authentication)
    if authentication:
        headers.append(("Authentication-Results", authentication))
    if found.virus_scanned:
        headers.append(("X-Virus-Scanned", f"milterd at {printable(hostname)}"))
    headers += [("X-Amavis-Alert", printable(text, 900)) for text in _alerts(found, verdict.categories)]
    score = verdict.spam_score  # the policy's spam level: None when spam checks were bypassed
    if policy.local and _tagged(policy, score):
        spammy = Category.SPAMMY in verdict.categories
        symbols = [*found.symbols, *([("SENDER_SCORE", policy.sender_score)] if policy.sender_score else [])]
        tests = ", ".join(f"{name}={format_score(points)}" for name, points in symbols)
        listed = {"W": " WHITELISTED", "B": " BLACKLISTED"}.get(policy.sender_list, "")
        headers += [
            ("X-Spam-Flag", "YES" if spammy else "NO"),
            ("X-Spam-Score", format_score(score)),
            ("X-Spam-Level", "*" * min(64, int(score)) if score >= 1 else ""),
            (
                "X-Spam-Status",
                printable(
                    f"{'Yes' if spammy else 'No'}, score={format_score(score)}"
                    f" tagged_above={format_score(policy.tag_level)}"
                    f" required={format_score(policy.tag2_level)}{listed} tests=[{tests}]",
                    4000,
                ),
            ),
        ]
    return tuple(headers)


def _alerts(found: Summary, categories: tuple[Category, ...]) -> list[str]:
    """amavis' X-Amavis-Alert texts, one per category present, highest first."""
    texts = {  # in the order they are written
        Category.VIRUS: lambda: f"INFECTED, message contains virus: {', '.join(found.viruses)}",
        Category.BANNED: lambda: f"BANNED, message contains {', '.join(found.banned)}",
        Category.UNCHECKED: lambda: f"UNCHECKED, {found.unchecked_why}",
        Category.BAD_HEADER: lambda: f"BAD HEADER SECTION, {'; '.join(found.bad_headers)}",
    }
    return [text() for category, text in texts.items() if category in categories]


def _tagged(policy: Policy, score: float | None) -> bool:
    """At tag_level or above; a whitelisted sender gets 10 points less for this test only (amavis)."""
    if score is None:
        return False
    return (score - 10 if policy.sender_list == "W" else score) >= policy.tag_level


def subject_tag(policy: Policy, verdict: Verdict) -> str:
    """The first tag that applies, from the top: virus, unchecked, spammy (tag2), tagged (tag level)."""
    if not policy.local:
        return ""
    tags, categories = policy.subject_tags, verdict.categories
    for applies, tag in (
        (Category.VIRUS in categories, tags.virus),
        (Category.UNCHECKED in categories, tags.unchecked),
        (Category.SPAMMY in categories, tags.spammy),
        (_tagged(policy, verdict.spam_score), tags.tagged),
    ):
        if applies and tag:
            return tag
    return ""
