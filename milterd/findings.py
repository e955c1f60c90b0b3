"""What a check found: the one value that flows from every check to the policy and the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "unchecked": the check deliberately did not inspect the message (a size or unpacking limit);
# retrying would not help, so unlike the failures it never tempfails.
Status = Literal["ok", "skipped", "unchecked", "unavailable", "timeout", "error"]


@dataclass(frozen=True)
class DkimResult:
    """One DKIM signature's verification (RFC 8601 names)."""

    result: Literal["pass", "fail", "neutral", "temperror", "permerror"]
    domain: str  # d=, sanitised
    selector: str  # s=, sanitised
    algorithm: str = ""  # a=, e.g. rsa-sha256, ed25519-sha256
    detail: str = ""  # why it did not pass

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}


@dataclass(frozen=True)
class SpfResult:
    """The SPF result for the envelope sender (or the HELO name when the sender is empty)."""

    result: Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
    identity: Literal["mailfrom", "helo"]
    domain: str  # the domain checked, sanitised
    detail: str = ""  # pyspf's explanation, sanitised

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}


@dataclass(frozen=True)
class DmarcResult:
    """DMARC for the From domain: identifier alignment of the DKIM and SPF results, and the owner's policy."""

    result: Literal["pass", "fail", "none", "temperror", "permerror"]
    domain: str  # the RFC5322.From domain, sanitised
    policy: Literal["none", "quarantine", "reject", ""] = ""  # p= (or sp= for a subdomain); "" without a record
    disposition: Literal["none", "quarantine", "reject"] = "none"  # what the policy asks for this message
    detail: str = ""

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}


@dataclass(frozen=True)
class Finding:
    """One check's result for one message.

    `critical` checks (virus and spam scanners) make the message UNCHECKED when they could not
    answer; the others (collaborative and DNS checks) only add nothing.
    """

    name: str
    status: Status
    critical: bool = False
    detail: str = ""  # why the check was skipped or failed, or what it saw; never parsed
    elapsed: float = 0.0  # seconds
    viruses: tuple[str, ...] = ()
    spam_score: float | None = None
    spam_tests: tuple[tuple[str, float], ...] = ()
    banned: tuple[tuple[str, str], ...] = ()  # (part path, rule name), both sanitised
    bad_headers: tuple[str, ...] = ()  # problems, each naming the header field, sanitised
    dkim: tuple[DkimResult, ...] = ()  # one per signature, in header order
    spf: SpfResult | None = None
    dmarc: DmarcResult | None = None

    @property
    def failed(self) -> bool:
        """True when the check should have answered and did not."""
        return self.status in ("unavailable", "timeout", "error")

    def to_json(self) -> dict:
        """The finding as `checks.<name>` in `milterd scan --json`."""
        out: dict = {"status": self.status, "time_ms": round(self.elapsed * 1000, 1)}
        if self.detail:
            out["detail"] = self.detail
        if self.viruses:
            out["viruses"] = list(self.viruses)
        if self.spam_score is not None:
            out["score"] = self.spam_score
            out["tests"] = {name: score for name, score in self.spam_tests}
        if self.banned:
            out["banned"] = [{"part": part, "rule": rule} for part, rule in self.banned]
        if self.bad_headers:
            out["bad_headers"] = list(self.bad_headers)
        if self.dkim:
            out["dkim"] = [d.to_json() for d in self.dkim]
        if self.spf is not None:
            out["spf"] = self.spf.to_json()
        if self.dmarc is not None:
            out["dmarc"] = self.dmarc.to_json()
        return out
