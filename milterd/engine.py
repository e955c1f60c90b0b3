"""The engine both front ends share: a spooled message and its recipients in, a Disposition out.

It knows nothing of pymilter: milter.py carries a Disposition out through libmilter, `scan`
prints it. `build_engine` turns a validated Config into an Engine that never changes afterwards
(its checks, pipeline, resolver, walker and signer), so a reload builds a new one and swaps one
reference, and a transaction keeps the Engine it started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import edits as header_edits
from . import render
from .checks import Runtime, build_checks, registry
from .config import Config
from .dkimsign import Signer, build_signer
from .findings import Finding, Summary, summarize
from .lookups import LookupFailed, PolicyLookups, Recipient, Transaction
from .message import Envelope, Message, header_section, split_header_section
from .metrics import Metrics
from .notify import Notifier
from .pipeline import Overloaded, Pipeline
from .policy import Category, Policy, Reply, Verdict, decide, format_score, kept
from .quarantine import DirectoryStore, Entry, QuarantineError, SqlStore, new_id, open_store, purge_daily
from .sanitize import address, printable

log = logging.getLogger("milterd")

INTERNAL_ERROR = Reply("451", "4.3.0", "Temporary local problem, try again later")
LOOKUP_FAILED = Reply("451", "4.3.0", "Temporary lookup failure, try again later")
OVERLOADED = Reply("451", "4.3.2", "Too busy, try again later")
QUARANTINE_FAILED = Reply("451", "4.3.0", "Temporary local problem (quarantine), try again later")


@dataclass(frozen=True)
class Outcome:
    """What happens for one group of recipients that share a policy."""

    recipients: tuple[str, ...]
    policy: Policy
    verdict: Verdict
    originating: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # added on top when the message passes (unfolded)
    subject_tag: str = ""
    signatures: tuple[tuple[str, str], ...] = ()  # DKIM-Signature headers, added on top of those
    edits: tuple[header_edits.Edit, ...] = ()  # every header change, in order, signatures included
    quarantine_id: str = ""  # the kept copy's id, when one was kept
    dry_run: bool = False  # decided, logged and counted, but the mail is accepted as it came (`edits` at most)

    @property
    def reply(self) -> Reply | None:
        """The SMTP reply milterd sets; None: the MTA's own 250 (always in a dry run)."""
        return None if self.dry_run else self.verdict.reply


@dataclass(frozen=True)
class Disposition:
    """The decision on one message: per recipient group the verdict, the reply, the header edits and
    the DKIM signatures, and what the engine does once the reply is decided (`Engine.after_reply`).

    The milter decides one transaction for one policy (recipients whose policy differs are
    deferred at RCPT time), so it carries out `outcome`, the first and only group.
    """

    message: Message
    findings: Mapping[str, Finding]
    summary: Summary  # the findings' contributions together
    groups: tuple[Outcome, ...]
    error: str = ""  # an internal error stopped the evaluation: why (the groups then tempfail)

    @property
    def outcome(self) -> Outcome:
        return self.groups[0]


class Engine:
    """Checks, policy and signing for every message; built once per configuration, never changed."""

    def __init__(
        self,
        config: Config,
        checks,
        signer: Signer | None,
        lookups: PolicyLookups,
        quarantine: DirectoryStore | SqlStore | None = None,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.quarantine = quarantine
        self.notifier = notifier
        self.rules = config.rules
        self.hostname = config.milter.hostname
        self.pipeline = Pipeline(checks, config.milter.max_concurrent, metrics.abandoned if metrics else None)
        self.message_timeout = config.milter.message_timeout
        self.signer = signer
        self.lookups = lookups
        self._users = 0  # transactions that hold this engine (Session); a retired engine closes at 0
        self._retired = False
        self._users_lock = threading.Lock()
        self._stop_purging = threading.Event()
        self.bypass = {check.name: registry()[check.name].bypass for check in checks if registry()[check.name].bypass}

    def recipient(self, address: str, txn: Transaction) -> Recipient:
        """The recipient's effective policy; LookupFailed when the database cannot say (answer 4xx)."""
        return self.lookups.recipient(address, txn)

    def evaluate(self, message: Message, recipients: Sequence[Recipient] | None = None) -> Disposition:
        """Run the checks once, then decide per group of recipients with equal policies.

        `recipients`: with the policies the milter settled at RCPT time; None looks them up for the
        envelope's recipients (scan). A check every recipient bypasses is not run. Everything is
        bounded by [milter] message_timeout from the moment the message is handed over.
        """
        if message.deadline is None:
            message.deadline = time.monotonic() + self.message_timeout
        if recipients is None:
            txn = transaction(message.envelope)
            try:
                recipients = [self.recipient(r, txn) for r in message.envelope.rcpts]
            except LookupFailed as e:
                return self._tempfail(message, LOOKUP_FAILED, f"lookup failed: {e}")
        policies = [r.policy for r in recipients] or [self.rules.policy]
        skip = {name: "bypass" for name, flag in self.bypass.items() if all(getattr(p, flag) for p in policies)}
        try:
            findings = self.pipeline.run(message, skip)
        except Overloaded as e:
            log.warning("%s: 451: %s", printable(message.envelope.queue_id, 40) or "NOQUEUE", e)
            return self._tempfail(message, OVERLOADED, str(e))
        found = summarize(findings)
        groups = [self._outcome(message, findings, found, group) for group in _grouped(recipients, self.rules)]
        return Disposition(message, findings, found, tuple(groups))

    def failed(self, message: Message, error: Exception) -> Disposition:
        """The Disposition of a message whose evaluation failed: 451 4.3.0, the sender retries."""
        return self._tempfail(message, INTERNAL_ERROR, f"internal error: {type(error).__name__}: {error}")

    def after_reply(self, disposition: Disposition) -> None:
        """What follows the decided reply: the log line, the admins' notification (queued, sent later)."""
        if log.isEnabledFor(logging.INFO):  # scan without -v: no line, so none is built
            log.info("%s", log_line(disposition))
        if self.metrics is not None:
            self.metrics.observe(disposition)
        if self.notifier is not None and not disposition.outcome.dry_run:
            self.notifier.notify(disposition)

    def start(self) -> None:
        """The daemon's background work, once root is dropped: sending notifications, purging the quarantine."""
        if self.notifier is not None:
            self.notifier.start()
        if self.quarantine is not None:
            purge_daily(self.quarantine, self.config.quarantine.keep_days, self._stop_purging)

    def acquire(self) -> None:
        """A transaction starts with this engine: it keeps it, whatever a reload swaps in meanwhile."""
        with self._users_lock:
            self._users += 1

    def release(self) -> None:
        with self._users_lock:
            self._users -= 1
            last = self._retired and self._users == 0
        if last:
            self.close()

    def retire(self) -> None:
        """A reload replaced this engine: it closes once its last transaction is done."""
        with self._users_lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Stop its threads and pools; a second close does nothing."""
        if self._stop_purging.is_set():
            return
        self._stop_purging.set()
        self.pipeline.shutdown()
        self.lookups.close()
        if self.notifier is not None:
            self.notifier.close()

    def _tempfail(self, message: Message, reply: Reply, why: str) -> Disposition:
        why = printable(why, 300)
        verdict = Verdict(Category.UNCHECKED, (Category.UNCHECKED,), "tempfail", reply, reason=why)
        outcome = Outcome(message.envelope.rcpts, self.rules.policy, verdict)
        return Disposition(message, {}, summarize({}), (outcome,), error=why)

    def _outcome(
        self, message: Message, findings: Mapping[str, Finding], found: Summary, group: tuple[Recipient, ...]
    ) -> Outcome:
        """The group's verdict over the findings its policy does not bypass, and what it does to the message."""
        policy, originating = group[0].policy, group[0].originating
        rcpts = tuple(r.address for r in group)
        bypassed = {name for name, flag in self.bypass.items() if getattr(policy, flag)}
        if bypassed:
            found = summarize({n: f for n, f in findings.items() if n not in bypassed})
        verdict = decide(found, policy)
        if self.config.milter.dry_run or policy.dry_run:
            return self._dry_run(rcpts, policy, verdict, originating)
        category = kept(policy, verdict) if self.quarantine is not None else ""
        quarantine_id = ""
        if category:
            quarantine_id, verdict = self._keep(message, rcpts, verdict, category)
        headers, tag = render.rendered(found, policy, verdict, self.hostname)
        if verdict.action != "accept":
            return Outcome(rcpts, policy, verdict, originating, quarantine_id=quarantine_id)
        if quarantine_id:
            headers += (("X-Quarantine-ID", f"<{quarantine_id}>"),)
        incoming = message.headers()
        edits = header_edits.header_edits(incoming, headers, tag, self.hostname)
        signatures = tuple(self._signatures(message, found, verdict, originating, incoming, edits))
        edits += header_edits.on_top(signatures)
        return Outcome(rcpts, policy, verdict, originating, headers, tag, signatures, tuple(edits), quarantine_id)

    def _dry_run(self, rcpts: tuple[str, ...], policy: Policy, verdict: Verdict, originating: bool) -> Outcome:
        """What would have happened, for the log and the metrics; the mail passes unchanged (no copy
        kept, nobody notified), with X-Milterd-Verdict on top when [milter] dry_run_header says so."""
        edits: tuple[header_edits.Edit, ...] = ()
        if self.config.milter.dry_run_header:
            score = "-" if verdict.spam_score is None else format_score(verdict.spam_score)
            value = f"category={verdict.category.name} score={score} action={verdict.action}"
            edits = tuple(header_edits.on_top([("X-Milterd-Verdict", value)]))
        return Outcome(rcpts, policy, verdict, originating, edits=edits, dry_run=True)

    def _keep(self, message: Message, rcpts: tuple[str, ...], verdict: Verdict, category: str) -> tuple[str, Verdict]:
        """Keep a copy before the reply; the reply of a refused message ends with its id. A copy that
        cannot be written makes the reply 451: never a 5xx without its copy."""
        env = message.envelope
        entry = Entry(
            new_id(), time.time(), category, verdict.reason or category, env.mail_from, rcpts, message.size,
            env.client_ip, env.client_name, env.helo, env.queue_id,
        )  # fmt: skip
        try:
            self.quarantine.keep(message, entry)
        except QuarantineError as e:
            log.error("%s: %s: 451", printable(env.queue_id, 40) or "NOQUEUE", e)
            why = printable(f"quarantine: {e}", 300)
            return "", replace(verdict, action="tempfail", reply=QUARANTINE_FAILED, reason=why)
        if verdict.reply is not None:
            reply = verdict.reply
            verdict = replace(verdict, reply=replace(reply, text=f"{reply.text}, id={entry.id}"))
        return entry.id, verdict

    def _signatures(self, message: Message, found: Summary, verdict: Verdict, originating: bool, incoming, edits):
        """DKIM-Signature headers for originating mail, over the message as it will leave: our
        header edits made, the spooled body. A signing failure delivers the message unsigned."""
        signer, envelope = self.signer, message.envelope
        if signer is None or not signer.wants(originating, verdict.categories):
            return []
        queue_id = envelope.queue_id or "NOQUEUE"
        if message.size > signer.max_size:
            log.info("%s: not DKIM-signed: larger than signing.max_size (%d bytes)", queue_id, message.size)
            return []
        signed_by = {a.domain.lower() for a in found.authentication if a.method == "dkim" and a.result == "pass"}
        try:
            with message.open() as stream:
                body = split_header_section(stream.read())[1]
            outgoing = header_section(header_edits.edited(incoming, edits)) + b"\r\n" + body
            signatures = signer.sign(outgoing, skip_domains=signed_by)
        except Exception as e:
            log.error("%s: not DKIM-signed: %s: %s", queue_id, type(e).__name__, e, exc_info=True)
            return []
        if signatures:
            log.info("%s: DKIM-signed: %s", queue_id, ", ".join(_signature_tags(v) for _, v in signatures))
        return signatures


def build_engine(config: Config, offline: bool = False, metrics: Metrics | None = None) -> Engine:
    """The running parts made from a validated config: checks, their resolver and walker, the signer
    (its keys read), the policy lookups (the database pool), the quarantine. `offline` (scan) keeps
    no copies. ConfigError when something the config names cannot be used."""
    path = config.path or Path("milterd.toml")
    signer = build_signer(config.signing, path)
    sql = None
    if config.sql.enabled:
        from .sql import SqlLookups, read_dsn

        sql = SqlLookups(config.sql, read_dsn(config.sql, path))
    lookups = PolicyLookups(config.rules, config.milter.mynetworks, sql)
    quarantine = notifier = None
    if not offline:
        quarantine = open_store(config.quarantine, path, sql)
        notifier = Notifier(config.notify, config.milter.hostname, path.parent / config.milter.rules / "notify")
    return Engine(config, build_checks(config, Runtime(config)), signer, lookups, quarantine, notifier, metrics)


def transaction(envelope: Envelope) -> Transaction:
    return Transaction(envelope.mail_from, envelope.client_ip, envelope.auth_user, envelope.daemon_name)


def _grouped(recipients: Sequence[Recipient], rules) -> list[tuple[Recipient, ...]]:
    """Recipients grouped by equal policy, in the order each policy first appears (none: the default's)."""
    groups: dict[Policy, list[Recipient]] = {}
    for rcpt in recipients:
        groups.setdefault(rcpt.policy, []).append(rcpt)
    return [tuple(group) for group in groups.values()] or [(Recipient("", rules.policy),)]


def _signature_tags(value: str) -> str:
    """d=, s= and a= of a DKIM-Signature value, for the log."""
    tags = dict(t.strip().partition("=")[::2] for t in value.split(";"))
    return f"d={tags.get('d', '')} s={tags.get('s', '')} a={tags.get('a', '')}"


def log_line(disposition: Disposition) -> str:
    """Postfix-style: queue id first, then who, what was found, what was done (the reply sent),
    and how long each check took."""
    message, found = disposition.message, disposition.summary
    env, verdict = message.envelope, disposition.outcome.verdict
    score = "-" if verdict.spam_score is None else format_score(verdict.spam_score)
    checks = " ".join(f"{f.name}:{f.status}/{f.elapsed * 1000:.0f}ms" for f in disposition.findings.values())
    reply = disposition.outcome.reply
    parts = [
        f"{printable(env.queue_id, 40) or 'NOQUEUE'}:",
        f"client={printable(env.client_name, 100) or 'unknown'}[{printable(env.client_ip, 60)}],",
        f"from={address(env.mail_from)},",
        f"to={','.join(address(r) for r in env.rcpts)},",
        f"size={message.size}, category={verdict.category.name}, score={score},",
        f"action={verdict.action}, reply={f'{reply.code} {reply.xcode}' if reply else '250'},"
        + (" dry_run=yes," if disposition.outcome.dry_run else ""),  # action= would have been; reply= was
        f"checks=[{checks}]",
    ]
    bank, quarantine_id = disposition.outcome.policy.bank, disposition.outcome.quarantine_id
    if bank:
        parts[-1:-1] = [f"bank={printable(bank, 100)},"]
    if quarantine_id:
        parts[-1:-1] = [f"quarantine={quarantine_id},"]
    # the results, temperror included: the check's own status stays "ok" whatever DNS did
    auth = [f"{a.method}={a.result}/{a.domain or '-'}" for a in found.authentication if a.listed]
    if auth:
        parts[-1] += ","
        parts.append(f"auth=[{' '.join(auth)}]")
    if verdict.reason:
        parts[-1] += ","
        parts.append(f"reason={printable(verdict.reason, 300)}")
    failed = [f"{f.name}: {f.detail}" for f in disposition.findings.values() if f.failed]
    if failed:
        parts[-1] += ","
        parts.append(f"failed=[{printable('; '.join(failed), 500)}]")
    return " ".join(parts)
