"""The pymilter adapter: one Session per SMTP connection, collecting the envelope and the message.

Callbacks are thin and answer nothing they need not (@noreply), so Postfix does not wait on them;
`data()` does answer, which removes the 40 ms delayed-ACK stall measured over inet: sockets.
All the work happens at end of message, in the Engine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import re
import socket

import Milter

from . import actions
from .authresults import claims_our_id
from .engine import Engine
from .message import Envelope, Message, Spool, header_section, split_header_section
from .policy import Policy

log = logging.getLogger("milterd")

_LINE_END = re.compile(rb"\r?\n")
M_ARENA_MAX = -8  # glibc's mallopt parameter number


class Session(Milter.Base):
    """One SMTP connection; a transaction starts at MAIL FROM and ends at end of message or abort."""

    engine: Engine  # set by serve()

    def __init__(self):
        self.client_ip = self.client_name = self.helo = ""
        self.smtp = True  # False for Postfix's non_smtpd_milters (sendmail, pickup)
        self.spool: Spool | None = None
        self.in_body = False
        self._new_transaction(None)

    def _new_transaction(self, mail_from: str | None) -> None:
        """Start a transaction at MAIL FROM; None ends it and frees its spool."""
        if self.spool is not None:
            self.spool.close()
        settings = self.engine.config.milter
        self.mail_from = mail_from or ""
        self.rcpts: list[str] = []
        self.policy: Policy | None = None
        self.header_names: list[str] = []
        self.forged_results: list[int] = []  # indexes of Authentication-Results headers claiming our authserv-id
        self.subject: str | None = None
        self.auth_user = ""
        self.in_body = False
        self.spool = Spool(settings.spool_threshold, settings.spool_dir) if mail_from is not None else None

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.client_name = hostname or ""
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_ip = str(hostaddr[0])
            # Postfix's cleanup presents non-SMTP mail as localhost [127.0.0.1] port 0.
            self.smtp = not (hostname == "localhost" and self.client_ip == "127.0.0.1" and hostaddr[1] == 0)
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname):
        self.helo = hostname or ""
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from, *params):
        self._new_transaction(mail_from.strip("<>"))
        self.auth_user = self.getsymval("{auth_authen}") or ""
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        """One policy per transaction: a recipient whose policy differs is deferred (452 4.5.3),
        and RFC 5321 clients send it again in a new transaction.

        Postfix cannot defer a recipient of non-SMTP mail (it would hold the whole message), so
        there the first recipient's policy applies to all, as amavis' milter does.
        """
        rcpt = rcpt.strip("<>")
        policy = self.engine.rules.policy_for(rcpt)
        if self.policy is not None and policy != self.policy:
            if self.smtp:
                self.setreply("452", "4.5.3", "Too many recipients: please send this one separately")
                return Milter.TEMPFAIL
            log.info(
                "%s: recipients require different policies; the first recipient's applies",
                self.getsymval("i") or "NOQUEUE",
            )
        self.policy = self.policy or policy
        self.rcpts.append(rcpt)
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name, value):
        self.header_names.append(name)
        lower = name.lower()
        if lower == "subject":
            self.subject = value.decode("utf-8", "surrogateescape")
        elif lower == "authentication-results":
            index = sum(n.lower() == lower for n in self.header_names)
            if claims_our_id(value.decode("latin-1"), self.engine.config.milter.hostname):
                self.forged_results.append(index)
        self.spool.write(name.encode("ascii", "replace") + b": " + _LINE_END.sub(b"\r\n", value) + b"\r\n")
        return Milter.CONTINUE

    def _end_headers(self) -> None:
        """The blank line after the headers, written at the first body chunk or at end of message:
        no eoh() callback means one protocol packet less per message."""
        if not self.in_body:
            self.in_body = True
            self.spool.write(b"\r\n")

    @Milter.noreply
    def body(self, chunk):
        self._end_headers()
        self.spool.write(chunk)
        return Milter.CONTINUE

    def eom(self):
        self._end_headers()
        envelope = Envelope(
            mail_from=self.mail_from,
            rcpts=tuple(self.rcpts),
            client_ip=self.client_ip,
            client_name=self.client_name,
            helo=self.helo,
            queue_id=self.getsymval("i") or "",
            auth_user=self.auth_user,
        )
        message = Message(envelope, self.spool)
        try:
            findings, verdict = self.engine.evaluate(message, self.policy)
            edits = actions.header_edits(verdict, self.header_names, self.subject, self.forged_results)
            if verdict.action == "accept":
                edits += actions.on_top(self._signatures(message, findings, verdict.categories, edits))
            return actions.apply(self, verdict, edits)
        except Exception as e:  # never lose a message to a bug: the sender retries
            log.error(
                "%s: internal error, tempfail: %s: %s",
                envelope.queue_id or "NOQUEUE",
                type(e).__name__,
                e,
                exc_info=True,
            )
            self.setreply("451", "4.3.0", "Temporary local problem, try again later")
            return Milter.TEMPFAIL
        finally:
            self._new_transaction(None)

    def _signatures(self, message: Message, findings, categories, edits) -> list[tuple[str, str]]:
        """DKIM-Signature headers for originating mail, over the message as it will leave: our
        header edits made, the spooled body. A signing failure delivers the message unsigned."""
        signer = self.engine.config.signer
        envelope = message.envelope
        if signer is None or not signer.wants(envelope, categories):
            return []
        queue_id = envelope.queue_id or "NOQUEUE"
        if message.size > signer.max_size:
            log.info("%s: not DKIM-signed: larger than signing.max_size (%d bytes)", queue_id, message.size)
            return []
        signed_by = {d.domain.lower() for f in findings.values() for d in f.dkim if d.result == "pass"}
        try:
            with message.open() as stream:
                headers, body = split_header_section(stream.read())
            outgoing = header_section(actions.edited(headers, edits)) + b"\r\n" + body
            signatures = signer.sign(outgoing, skip_domains=signed_by)
        except Exception as e:
            log.error("%s: not DKIM-signed: %s: %s", queue_id, type(e).__name__, e, exc_info=True)
            return []
        if signatures:
            log.info("%s: DKIM-signed: %s", queue_id, ", ".join(_signature_tags(v) for _, v in signatures))
        return signatures

    def abort(self):
        self._new_transaction(None)
        return Milter.CONTINUE

    def close(self):
        self._new_transaction(None)
        return Milter.CONTINUE


def _signature_tags(value: str) -> str:
    """d=, s= and a= of a DKIM-Signature value, for the log."""
    tags = dict(t.strip().partition("=")[::2] for t in value.split(";"))
    return f"d={tags.get('d', '')} s={tags.get('s', '')} a={tags.get('a', '')}"


def serve(engine: Engine) -> None:
    """Listen and serve until stopped. Root is dropped (to `[milter] user`) after the socket is open."""
    settings = engine.config.milter
    limit_malloc_arenas()
    Session.engine = engine
    Milter.factory = Session
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)
    main = Milter.milter.main

    def main_after_listen():  # runmilter opens the socket, then calls main()
        no_delay_on_listeners()
        if settings.user:
            drop_privileges(settings.user)
        return main()

    Milter.milter.main = main_after_listen
    if settings.listen.startswith(("unix:", "local:")):
        os.umask(0o111)  # the socket must be writable by Postfix; the directory's mode guards it
    log.info("milterd listening on %s", settings.listen)
    Milter.runmilter("milterd", settings.listen, settings.timeout)
    log.info("milterd stopped")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core); with a thread
    per SMTP session and per check, freed memory stays spread over them and RSS creeps up under load
    (make bench: 98 MB after every load, 84 MB after 500 messages at c=50). Two arenas hold it flat."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def no_delay_on_listeners() -> None:
    """Turn Nagle's algorithm off on our TCP listening socket (accepted sockets inherit it on Linux).

    At end of message libmilter writes one packet per header change, then the verdict. With Nagle
    on, the second packet waits for Postfix's delayed ACK: 40 ms per message. libmilter gives no
    access to its sockets, so we find the listener among our descriptors.
    """
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except (OSError, ValueError):
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                log.debug("TCP_NODELAY on %s", sock.getsockname())
        finally:
            sock.detach()


def drop_privileges(user: str) -> None:
    entry = pwd.getpwnam(user)
    if os.getuid() != 0:
        if os.getuid() != entry.pw_uid:
            raise PermissionError(f"started as uid {os.getuid()}, cannot become {user}")
        return
    os.setgroups(os.getgrouplist(user, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("running as %s", user)
