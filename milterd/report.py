"""`milterd scan` output: one JSON object per message per line, or a readable table."""

from __future__ import annotations

import json

from .findings import Finding
from .policy import Verdict


def as_json(name: str, size: int, findings: dict[str, Finding], verdict: Verdict) -> str:
    record = {
        "file": name,
        "size": size,
        "category": verdict.category.name,
        "categories": [c.name for c in verdict.categories],
        "spam_score": verdict.spam_score,
        "viruses": [v for f in findings.values() for v in f.viruses],
        "banned": [part for f in findings.values() for part, _ in f.banned],
        "bad_headers": [problem for f in findings.values() for problem in f.bad_headers],
        "unchecked": [
            f"{f.name}: {f.detail or f.status}"
            for f in findings.values()
            if f.critical and (f.failed or f.status == "unchecked")
        ],
        "action": verdict.action,
        "reply": str(verdict.reply) if verdict.reply else None,
        "dkim": [d.to_json() for f in findings.values() for d in f.dkim],
        "spf": next((f.spf.to_json() for f in findings.values() if f.spf), {"result": None}),
        "dmarc": next((f.dmarc.to_json() for f in findings.values() if f.dmarc), {"result": None}),
        "checks": {n: f.to_json() for n, f in findings.items()},
        "headers": [list(h) for h in verdict.headers],
        "subject_tag": verdict.subject_tag,
    }
    return json.dumps(record, ensure_ascii=True)


TABLE_HEAD = f"{'ACTION':<9} {'CATEGORY':<10} {'SCORE':>7}  FILE / DETAIL"


def as_row(name: str, findings: dict[str, Finding], verdict: Verdict) -> str:
    score = "-" if verdict.spam_score is None else f"{verdict.spam_score:.1f}"
    details = [verdict.reason] if verdict.reason else []
    shown = [f for f in findings.values() if f.failed or f.status in ("skipped", "unchecked")]
    details += [f"{f.name} {f.status}: {f.detail}" for f in shown]
    line = f"{verdict.action:<9} {verdict.category.name:<10} {score:>7}  {name}"
    return line + "".join(f"\n{'':<30}{d}" for d in details)
