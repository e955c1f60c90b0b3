"""The pymilter adapter: one Session per SMTP connection, collecting the envelope and the message.

Callbacks are thin and answer nothing they need not (@noreply), so Postfix does not wait on them;
`data()` does answer, which removes the 40 ms delayed-ACK stall measured over inet: sockets.
All the work happens at end of message, in the Engine; the Session only carries out the
Disposition it returns, then hands it back for what follows the reply (the log line).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import re
import socket
import threading
from dataclasses import replace

import Milter

from . import actions
from .engine import Engine
from .lookups import LookupFailed, Recipient, Transaction
from .message import Envelope, Message, Spool
from .metrics import Metrics
from .sanitize import address, printable

log = logging.getLogger("milterd")

_LINE_END = re.compile(rb"\r?\n")
M_ARENA_MAX = -8  # glibc's mallopt parameter number


class Session(Milter.Base):
    """One SMTP connection; a transaction starts at MAIL FROM and ends at end of message or abort."""

    engine: Engine  # the current Engine: the service sets it, a reload swaps it (this one reference)
    metrics: Metrics = Metrics()  # the process's; the service sets it
    stopping = False  # the service is stopping: new transactions are deferred
    in_flight = 0  # transactions started and not yet ended, in every session
    _count = threading.Lock()

    def __init__(self):
        self.client_ip = self.client_name = self.helo = self.daemon_name = ""
        self.smtp = True  # False for Postfix's non_smtpd_milters (sendmail, pickup)
        self.spool: Spool | None = None
        self.transaction_engine: Engine | None = None
        self.in_body = False
        self.sid = self.metrics.sessions.start()
        self._new_transaction(None)

    def _new_transaction(self, mail_from: str | None) -> None:
        """Start a transaction at MAIL FROM; None ends it and frees its spool.

        A transaction keeps the Engine it started with, whatever a reload swaps in meanwhile: it
        holds it (acquire) until it ends, so a replaced engine closes only when no one uses it.
        """
        if self.spool is not None:
            self.spool.close()
        if self.transaction_engine is not None:
            self.transaction_engine.release()
            with Session._count:
                Session.in_flight -= 1
        self.transaction_engine = None
        self.mail_from = mail_from or ""
        self.rcpts: list[Recipient] = []
        self.auth_user = ""
        self.in_body = False
        self.spool = None
        if mail_from is not None:
            engine = self.transaction_engine = self.engine
            engine.acquire()
            with Session._count:
                Session.in_flight += 1
            self.spool = Spool(engine.config.milter.spool_threshold, engine.config.milter.spool_dir)

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.client_name = hostname or ""
        self.daemon_name = self.getsymval("{daemon_name}") or ""  # the smtpd service: policy banks
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_ip = str(hostaddr[0])
            # Postfix's cleanup presents non-SMTP mail as localhost [127.0.0.1] port 0.
            self.smtp = not (hostname == "localhost" and self.client_ip == "127.0.0.1" and hostaddr[1] == 0)
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname):
        self.helo = hostname or ""
        self.metrics.sessions.stage(self.sid, "helo")
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from, *params):
        self._new_transaction(mail_from.strip("<>"))
        self.auth_user = self.getsymval("{auth_authen}") or ""
        self.metrics.sessions.stage(self.sid, "mail", self.getsymval("i") or "")
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        """One policy per transaction: a recipient whose policy differs is deferred (452 4.5.3),
        and RFC 5321 clients send it again in a new transaction.

        Postfix cannot defer a recipient of non-SMTP mail (it would hold the whole message), and
        mail clients handle 452 badly, so for those and for originating mail the first recipient's
        policy applies to all, as amavis' milter does. A lookup that fails defers the recipient
        (451 4.3.0): it is never taken for non-local because the database was away.
        """
        self.metrics.sessions.stage(self.sid, "rcpt")
        if Session.stopping:
            self.setreply("451", "4.3.2", "milterd is stopping, try again later")
            return Milter.TEMPFAIL
        txn = Transaction(self.mail_from, self.client_ip, self.auth_user, self.daemon_name)
        try:
            recipient = self.transaction_engine.recipient(rcpt.strip("<>"), txn)
        except LookupFailed as e:
            self.metrics.lookup(False)
            log.warning("%s: %s: lookup failed, 451: %s", self._queue_id(), address(rcpt), e)
            self.setreply("451", "4.3.0", "Temporary lookup failure, try again later")
            return Milter.TEMPFAIL
        self.metrics.lookup(True)
        if self.rcpts and recipient.policy != self.rcpts[0].policy:
            if self.smtp and not recipient.originating:
                self.metrics.deferred()
                self.setreply("452", "4.5.3", "Too many recipients: please send this one separately")
                return Milter.TEMPFAIL
            log.info("%s: recipients require different policies; the first recipient's applies", self._queue_id())
            recipient = replace(recipient, policy=self.rcpts[0].policy)
        self.rcpts.append(recipient)
        return Milter.CONTINUE

    def _queue_id(self) -> str:
        return printable(self.getsymval("i") or "", 40) or "NOQUEUE"

    def data(self):
        self.metrics.sessions.stage(self.sid, "data")
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name, value):
        """With SMFIP_HDR_LEADSPC the value comes as sent, its leading space included ("Subject:x"
        stays so, and DKIM's simple canonicalization verifies); an MTA without it drops that space."""
        separator = b":" if self.leading_space else b": "
        self.spool.write(name.encode("ascii", "replace") + separator + _LINE_END.sub(b"\r\n", value) + b"\r\n")
        return Milter.CONTINUE

    @classmethod
    def protocol_mask(cls) -> int:
        """pymilter turns SMFIP_HDR_LEADSPC off; milterd asks for it (Postfix offers it)."""
        return super().protocol_mask() & ~Milter.P_HDR_LEADSPC

    @property
    def leading_space(self) -> bool:
        """Header values come and go with their leading white space (negotiated SMFIP_HDR_LEADSPC)."""
        return bool(getattr(self, "_protocol", 0) & Milter.P_HDR_LEADSPC)

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
        self.metrics.sessions.stage(self.sid, "eom")
        self._end_headers()
        engine = self.transaction_engine
        envelope = Envelope(
            mail_from=self.mail_from,
            rcpts=tuple(r.address for r in self.rcpts),
            client_ip=self.client_ip,
            client_name=self.client_name,
            helo=self.helo,
            queue_id=self.getsymval("i") or "",
            auth_user=self.auth_user,
            daemon_name=self.daemon_name,
        )
        message = Message(envelope, self.spool)
        queue_id = envelope.queue_id or "NOQUEUE"
        try:
            try:
                disposition = engine.evaluate(message, self.rcpts)
                result = actions.apply(self, disposition.outcome, self.leading_space)
            except Exception as e:  # never lose a message to a bug: the sender retries
                log.error("%s: internal error: %s: %s", queue_id, type(e).__name__, e, exc_info=True)
                disposition = engine.failed(message, e)
                result = actions.apply(self, disposition.outcome, self.leading_space)
            try:
                engine.after_reply(disposition)
            except Exception as e:  # the reply is decided: what follows it must not change it
                log.error("%s: after the reply: %s: %s", queue_id, type(e).__name__, e, exc_info=True)
            return result
        finally:
            self._new_transaction(None)
            self.metrics.sessions.stage(self.sid, "idle")

    def abort(self):
        self._new_transaction(None)
        self.metrics.sessions.stage(self.sid, "idle")
        return Milter.CONTINUE

    def close(self):
        self._new_transaction(None)
        self.metrics.sessions.end(self.sid)
        return Milter.CONTINUE


def run_milter(settings, on_listening) -> None:
    """Open the socket, call `on_listening()` (root is dropped there), then serve until libmilter
    stops (smfi_stop). Blocks; the service runs it in a thread of its own."""
    Milter.factory = Session
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)
    main = Milter.milter.main

    def main_after_listen():  # runmilter opens the socket, then calls main()
        no_delay_on_listeners()
        if settings.user:
            drop_privileges(settings.user)
        on_listening()
        return main()

    Milter.milter.main = main_after_listen
    if settings.listen.startswith(("unix:", "local:")):
        os.umask(0o111)  # the socket must be writable by Postfix; the directory's mode guards it
    log.info("milterd listening on %s", settings.listen)
    Milter.runmilter("milterd", settings.listen, settings.timeout)


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
