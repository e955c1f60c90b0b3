"""What a check found: the one result type every check returns and every consumer reads.

A Finding has the fields every check shares (name, status, time, detail), the spam points it
earned as named symbols (SpamAssassin's and rspamd's habit), and what it contributes to the
content categories: viruses, banned parts, bad headers, authentication results. Data only one
check needs stays typed in that check's module (`data`); no consumer looks a check up by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

# "unchecked": the check deliberately did not inspect the message (a size or unpacking limit);
# retrying would not help, so unlike the failures it never tempfails.
Status = Literal["ok", "skipped", "unchecked", "unavailable", "timeout", "error"]
FAILED = ("unavailable", "timeout", "error")


class AuthResult(Protocol):
    """One RFC 8601 method result (dkim, spf, dmarc): what Authentication-Results, scan --json,
    the log line and the checks that judge them (DMARC) read."""

    method: str  # the RFC 8601 method name
    plural: bool  # a list in scan --json (one per signature), else one object
    result: str
    domain: str  # sanitised

    @property
    def listed(self) -> bool:
        """Shown in scan --json and the log line; False for a result only the header carries (dkim=none)."""

    def to_json(self) -> dict: ...

    def authres(self) -> object:
        """The authres package's result object, for the Authentication-Results header."""


@dataclass(frozen=True)
class Finding:
    """One check's result for one message.

    `critical` checks make the message UNCHECKED when they could not answer; the others only add
    nothing. `score` is the spam points the check adds (None: it scored nothing), `symbols` the
    named tests that make it up.
    """

    name: str
    status: Status
    critical: bool = False
    detail: str = ""  # why the check was skipped or failed, or what it saw; never parsed
    elapsed: float = 0.0  # seconds
    score: float | None = None
    symbols: tuple[tuple[str, float], ...] = ()
    virus_scanned: bool = False  # a virus scanner read the whole message (X-Virus-Scanned)
    viruses: tuple[str, ...] = ()
    banned: tuple[tuple[str, str], ...] = ()  # (part path, rule name), both sanitised
    bad_headers: tuple[str, ...] = ()  # problems, each naming the header field, sanitised
    authentication: tuple[AuthResult, ...] = ()
    # why the sender domain's published policy asks to refuse this message (DMARC p=reject failed)
    policy_reject: str = ""
    data: object = None  # the check's own typed result, for the check itself and its tests

    @property
    def failed(self) -> bool:
        """True when the check should have answered and did not."""
        return self.status in FAILED

    @property
    def uninspected(self) -> bool:
        """A critical check that did not look at the message: it makes the message UNCHECKED."""
        return self.critical and (self.failed or self.status == "unchecked")

    def to_json(self) -> dict:
        """The finding as `checks.<name>` in `milterd scan --json`."""
        out: dict = {"status": self.status, "time_ms": round(self.elapsed * 1000, 1)}
        if self.detail:
            out["detail"] = self.detail
        if self.viruses:
            out["viruses"] = list(self.viruses)
        if self.score is not None:
            out["score"] = self.score
            out["tests"] = dict(self.symbols)
        if self.banned:
            out["banned"] = [{"part": part, "rule": rule} for part, rule in self.banned]
        if self.bad_headers:
            out["bad_headers"] = list(self.bad_headers)
        for result in self.authentication:
            if result.listed and result.plural:
                out.setdefault(result.method, []).append(result.to_json())
            elif result.listed:
                out[result.method] = result.to_json()
        return out


def scored(name: str, status: Status, symbols: Iterable[tuple[str, float]], **fields) -> Finding:
    """A finding whose score is the sum of its symbols' points (None when there are none)."""
    symbols = tuple(symbols)
    score = round(sum(points for _, points in symbols), 3) if symbols else None
    return Finding(name, status, score=score, symbols=symbols, **fields)


@dataclass(frozen=True)
class Summary:
    """Every finding's contributions together: what policy, rendering, the log and scan read."""

    virus_scanned: bool
    viruses: tuple[str, ...]
    banned: tuple[str, ...]  # part paths
    bad_headers: tuple[str, ...]
    uninspected: tuple[Finding, ...]  # critical checks that did not look (failed or unchecked)
    score: float | None  # the spam level: every check's points; None when nothing scored
    symbols: tuple[tuple[str, float], ...]
    authentication: tuple[AuthResult, ...]
    policy_reject: str

    @property
    def failed(self) -> tuple[Finding, ...]:
        """The critical checks that could not answer (a retry may help)."""
        return tuple(f for f in self.uninspected if f.failed)

    @property
    def unchecked_why(self) -> str:
        return ", ".join(
            f"{f.name} {f.status}" + (f" ({f.detail})" if f.status == "unchecked" else "") for f in self.uninspected
        )


def summarize(findings: Mapping[str, Finding]) -> Summary:
    values = findings.values()
    scores = [f.score for f in values if f.score is not None]
    return Summary(
        virus_scanned=any(f.virus_scanned and f.status == "ok" for f in values),
        viruses=tuple(v for f in values for v in f.viruses),
        banned=tuple(part for f in values for part, _ in f.banned),
        bad_headers=tuple(p for f in values for p in f.bad_headers),
        uninspected=tuple(f for f in values if f.uninspected),
        score=sum(scores) if scores else None,
        symbols=tuple(s for f in values for s in f.symbols),
        authentication=tuple(a for f in values for a in f.authentication),
        policy_reject=next((f.policy_reject for f in values if f.policy_reject), ""),
    )
