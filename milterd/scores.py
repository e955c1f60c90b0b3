"""Spam points for the sender-authentication results (rules/scores.toml), added to SpamAssassin's score.

The names and default points are SpamAssassin's own (its network score set, Bayes off), so an
X-Spam-Status reads as it did when SpamAssassin ran these tests: `SPF_SOFTFAIL=0.972`. Turn SA's
SPF, DKIM and DMARC plugins off when milterd scores them, or they count twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .findings import Finding
from .tomlschema import ConfigError

# table -> key -> (test name, default points)
TESTS: dict[str, dict[str, tuple[str, float]]] = {
    "spf": {
        "pass": ("SPF_PASS", -0.001),
        "fail": ("SPF_FAIL", 0.919),
        "softfail": ("SPF_SOFTFAIL", 0.972),
        "neutral": ("SPF_NEUTRAL", 0.652),
        "none": ("SPF_NONE", 0.001),
        "permerror": ("SPF_PERMERROR", 0.0),
        "temperror": ("SPF_TEMPERROR", 0.0),
    },
    "spf_helo": {  # the null sender: the HELO name was checked
        "pass": ("SPF_HELO_PASS", -0.001),
        "fail": ("SPF_HELO_FAIL", 0.001),
        "softfail": ("SPF_HELO_SOFTFAIL", 0.896),
        "neutral": ("SPF_HELO_NEUTRAL", 0.001),
        "none": ("SPF_HELO_NONE", 0.001),
        "permerror": ("SPF_HELO_PERMERROR", 0.0),
        "temperror": ("SPF_HELO_TEMPERROR", 0.0),
    },
    "dkim": {
        "signed": ("DKIM_SIGNED", 0.1),  # at least one signature
        "valid": ("DKIM_VALID", -0.1),  # at least one passes
        "valid_author": ("DKIM_VALID_AU", -0.1),  # one from the From domain passes
        "invalid": ("DKIM_INVALID", 0.1),  # signed, and none passes
    },
    "dmarc": {
        "pass": ("DMARC_PASS", -0.001),
        "reject": ("DMARC_REJECT", 1.797),  # failed, and the domain asks for reject
        "quarantine": ("DMARC_QUAR", 1.198),
        "none": ("DMARC_NONE", 0.898),  # failed under p=none
        "missing": ("DMARC_MISSING", 0.001),  # no DMARC record
    },
}
# Thresholds and points of the collaborative checks (SpamAssassin's defaults and network scores);
# each check reads its own table: table -> key -> default
COLLABORATIVE: dict[str, dict[str, float]] = {
    "pyzor": {"count_min": 5, "whitelist_min": 10, "whitelist_factor": 0.2, "points": 1.985},  # PYZOR_CHECK
    "razor": {"points": 1.729, "cf_min": 51, "cf_points": 2.430},  # RAZOR2_CHECK, RAZOR2_CF_RANGE_51_100
    "dcc": {"body_max": 999999, "fuz1_max": 999999, "fuz2_max": 999999, "points": 1.1},  # DCC_CHECK
}
KNOWN = (*TESTS, *COLLABORATIVE, "dkim_domains")


@dataclass(frozen=True)
class Scores:
    points: Mapping[tuple[str, str], float] = field(
        default_factory=lambda: {(table, key): pts for table, keys in TESTS.items() for key, (_, pts) in keys.items()}
    )
    # a passing signature from one of these domains adds these points (amavis' whitelist_auth habit)
    dkim_domains: Mapping[str, float] = field(default_factory=dict)
    collaborative: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: {table: dict(keys) for table, keys in COLLABORATIVE.items()}
    )


def parse_scores(data: dict, path: Path) -> Scores:
    """rules/scores.toml: any of the tables above, each key a number; what is missing keeps its default."""
    defaults = Scores()
    points, collaborative = dict(defaults.points), {t: dict(keys) for t, keys in defaults.collaborative.items()}
    domains = {}
    for table, values in data.items():
        if table not in KNOWN:
            raise ConfigError(f"{path}: unknown table [{table}] (known: {', '.join(KNOWN)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path}: {table}.{key} must be a number, not {value!r}")
            if table == "dkim_domains":
                domains[key.lower().rstrip(".")] = float(value)
            elif table in COLLABORATIVE:
                if key not in COLLABORATIVE[table]:
                    known = ", ".join(COLLABORATIVE[table])
                    raise ConfigError(f"{path}: unknown key {table}.{key} (known: {known})")
                collaborative[table][key] = float(value)
            elif key not in TESTS[table]:
                raise ConfigError(f"{path}: unknown key {table}.{key} (known: {', '.join(TESTS[table])})")
            else:
                points[table, key] = float(value)
    return Scores(points, domains, collaborative)


def authentication_points(findings: Mapping[str, Finding], scores: Scores) -> Finding | None:
    """A finding named "scores" whose spam_score and spam_tests are the points the results earned."""
    tests: list[tuple[str, float]] = []

    def add(table: str, key: str) -> None:
        tests.append((TESTS[table][key][0], scores.points[table, key]))

    spf = next((f.spf for f in findings.values() if f.spf is not None), None)
    if spf is not None:
        add("spf" if spf.identity == "mailfrom" else "spf_helo", spf.result)
    dkim = findings.get("dkim")
    dmarc = next((f.dmarc for f in findings.values() if f.dmarc is not None), None)
    if dkim is not None and dkim.status == "ok" and dkim.dkim:
        add("dkim", "signed")
        passed = {d.domain.lower() for d in dkim.dkim if d.result == "pass"}
        add("dkim", "valid" if passed else "invalid")
        if dmarc is not None and dmarc.domain.lower() in passed:
            add("dkim", "valid_author")
        tests += [
            (f"DKIM_DOMAIN_{domain}", scores.dkim_domains[domain])
            for domain in sorted(passed & scores.dkim_domains.keys())
        ]
    if dmarc is not None and dmarc.result in ("pass", "none"):
        add("dmarc", "pass" if dmarc.result == "pass" else "missing")
    elif dmarc is not None and dmarc.result == "fail":
        add("dmarc", dmarc.disposition)
    if not tests:
        return None
    return Finding("scores", "ok", spam_score=round(sum(p for _, p in tests), 3), spam_tests=tuple(tests))
