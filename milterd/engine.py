"""The engine both front ends share: spooled message in, findings and one verdict out, one log line.

It knows nothing of pymilter; `milter.py` and `cli.py scan` are thin adapters around it.
"""

from __future__ import annotations

import logging

from .checks import build_checks
from .config import Config
from .findings import Finding
from .message import Message
from .pipeline import Pipeline
from .policy import Policy, Verdict, decide, format_score
from .sanitize import address, printable
from .scores import authentication_points

log = logging.getLogger("milterd")


class Engine:
    def __init__(self, config: Config):
        self.config = config
        self.rules = config.rules
        self.pipeline = Pipeline(build_checks(config), config.milter.max_concurrent)

    def policy_for(self, recipients: tuple[str, ...]) -> Policy:
        """The transaction's policy: its first recipient's (the milter defers recipients that differ)."""
        return self.rules.policy_for(recipients[0]) if recipients else self.rules.policy

    def evaluate(self, message: Message, policy: Policy | None = None) -> tuple[dict[str, Finding], Verdict]:
        """`policy`: the one the milter settled at RCPT time (looked up once); scan leaves it to us."""
        findings = self.pipeline.run(message)
        points = authentication_points(findings, self.rules.scores)
        if points is not None:
            findings["scores"] = points
        envelope = message.envelope
        verdict = decide(
            findings,
            policy or self.policy_for(envelope.rcpts),
            sender=envelope.mail_from,
            hostname=self.config.milter.hostname,
        )
        log.info("%s", log_line(message, findings, verdict))
        return findings, verdict

    def close(self) -> None:
        self.pipeline.shutdown()


def log_line(message: Message, findings: dict[str, Finding], verdict: Verdict) -> str:
    """Postfix-style: queue id first, then who, what was found, what was done, and how long each check took."""
    env = message.envelope
    score = "-" if verdict.spam_score is None else format_score(verdict.spam_score)
    checks = " ".join(f"{f.name}:{f.status}/{f.elapsed * 1000:.0f}ms" for f in findings.values())
    parts = [
        f"{printable(env.queue_id, 40) or 'NOQUEUE'}:",
        f"client={printable(env.client_name, 100) or 'unknown'}[{printable(env.client_ip, 60)}],",
        f"from={address(env.mail_from)},",
        f"to={','.join(address(r) for r in env.rcpts)},",
        f"size={message.size}, category={verdict.category.name}, score={score},",
        f"action={verdict.action}, checks=[{checks}]",
    ]
    auth = [f"dkim={d.result}/{d.domain or '-'}" for f in findings.values() for d in f.dkim]
    auth += [f"spf={f.spf.result}/{f.spf.domain or '-'}" for f in findings.values() if f.spf]
    auth += [f"dmarc={f.dmarc.result}/{f.dmarc.domain or '-'}" for f in findings.values() if f.dmarc]
    if auth:  # the results, temperror included: the check's own status stays "ok" whatever DNS did
        parts[-1] += ","
        parts.append(f"auth=[{' '.join(auth)}]")
    if verdict.reason:
        parts[-1] += ","
        parts.append(f"reason={printable(verdict.reason, 300)}")
    failed = [f"{f.name}: {f.detail}" for f in findings.values() if f.failed]
    if failed:
        parts[-1] += ","
        parts.append(f"failed=[{printable('; '.join(failed), 500)}]")
    return " ".join(parts)
