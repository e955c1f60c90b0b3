"""`milterd scan` output: one JSON object per message per line, or a readable table."""

from __future__ import annotations

import json

from .engine import Disposition


def as_json(name: str, disposition: Disposition) -> str:
    found, outcome = disposition.summary, disposition.outcome
    verdict = outcome.verdict
    listed = [a for a in found.authentication if a.listed]
    record = {
        "file": name,
        "size": disposition.message.size,
        "category": verdict.category.name,
        "categories": [c.name for c in verdict.categories],
        "spam_score": verdict.spam_score,
        "viruses": list(found.viruses),
        "banned": list(found.banned),
        "bad_headers": list(found.bad_headers),
        "unchecked": [f"{f.name}: {f.detail or f.status}" for f in found.uninspected],
        "action": verdict.action,
        "reply": str(verdict.reply) if verdict.reply else None,
        "dkim": [a.to_json() for a in listed if a.method == "dkim"],
        "spf": next((a.to_json() for a in listed if a.method == "spf"), {"result": None}),
        "dmarc": next((a.to_json() for a in listed if a.method == "dmarc"), {"result": None}),
        "checks": {n: f.to_json() for n, f in disposition.findings.items()},
        "headers": [list(h) for h in outcome.headers],
        "subject_tag": outcome.subject_tag,
        "signatures": [list(s) for s in outcome.signatures],
        "policy": {"bank": outcome.policy.bank, "source": outcome.policy.source, "local": outcome.policy.local},
    }
    return json.dumps(record, ensure_ascii=True)


TABLE_HEAD = f"{'ACTION':<9} {'CATEGORY':<10} {'SCORE':>7}  FILE / DETAIL"


def check_details(disposition: Disposition) -> list[str]:
    """The checks that failed, were skipped or did not inspect the message, each with why."""
    shown = [f for f in disposition.findings.values() if f.failed or f.status in ("skipped", "unchecked")]
    return [f"{f.name} {f.status}: {f.detail}" for f in shown]


def row_head(name: str, disposition: Disposition) -> str:
    verdict = disposition.outcome.verdict
    score = "-" if verdict.spam_score is None else f"{verdict.spam_score:.1f}"
    return f"{verdict.action:<9} {verdict.category.name:<10} {score:>7}  {name}"


def with_details(head: str, details: list[str]) -> str:
    return head + "".join(f"\n{'':<30}{d}" for d in details)
