"""Admin notifications (amavis' $virus_admin, $banned_admin, $spam_admin, $bad_header_admin).

After the SMTP reply of a message is decided, `Notifier.notify` renders a plain-text notification
for the admin address of the message's main category and writes it into an on-disk outbox; a
background thread hands the outbox to an SMTP relay (`[notify] via`) and deletes each file only
once the relay accepted it. So a notification never delays the reply, survives a restart and
waits while the relay is down; a relay that refuses one for good (5xx) gets it moved to
`outbox/failed/`, and the log says so.

Never to the original sender (no backscatter), never about a notification (loops: our own
marker header, or our own `from` as the sender), once per message, and at most `max_per_minute`
per admin address: the rest of that minute is summed up in one summary message when it ends.

Templates are plain text with $-placeholders (string.Template): the built-in ones in
milterd/defaults/notify/, overridden by files of the same name in `rules/notify/`. A template may
start with a `Subject:` line and an empty line; the rest is the body. Every value that comes
from the message (virus and file names, addresses, headers) is reduced to printable ASCII before
it is put in, so nothing can add lines to the notification's own header.
"""

from __future__ import annotations

import collections
import dataclasses
import email.policy
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import smtplib
import string
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, localtime, make_msgid
from pathlib import Path

from .cache import TtlCache
from .policy import Category, format_score
from .sanitize import address, printable
from .tomlschema import POSITIVE, ConfigError, build

log = logging.getLogger("milterd")

DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "defaults" / "notify"
TEMPLATES = ("virus", "banned", "spam", "bad_header", "summary")
MARKER = "X-Milterd-Notification"  # on every notification; a message that carries it is never notified about
WINDOW = 60.0  # seconds: max_per_minute counts notifications per admin address in windows this long
SEEN_TTL = 24 * 3600.0  # seconds a notified message is remembered (once per message)
SEEN_MAX = 100_000  # messages remembered at most
LIST_MAX = 20  # virus names, banned parts, bad headers listed in one notification; the rest counted
FAILED = "failed"

# What a category's template may use, and what the summary's may use.
FIELDS = frozenset(
    "category viruses banned bad_headers client helo sender recipients queue_id quarantine_id "
    "reason action reply score date hostname headers admin".split()
)
SUMMARY_FIELDS = frozenset("count categories queue_ids items admin start end max_per_minute date hostname".split())

_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class NotifySettings:
    """The `[notify]` section of milterd.toml, with amavis' names.

    The admin addresses: "" sends none; a bare local part ("postmaster") gets `@<[milter] hostname>`.
    `from_` is the TOML key `from` (amavis' $mailfrom_notify_admin); "" = postmaster@<hostname>.
    Read it with `parse_notify`, which maps the key.
    """

    virus_admin: str = "postmaster"  # Debian's amavis tells postmaster about viruses
    banned_admin: str = ""
    spam_admin: str = ""
    bad_header_admin: str = ""
    from_: str = ""  # TOML key `from`: envelope sender and From: of the notifications
    via: str = "127.0.0.1:25"  # SMTP relay: "host:port", "[v6]:port", or "host" (port 25)
    outbox: str = "/var/lib/milterd/outbox"  # relative: to the config file's directory
    max_per_minute: int = field(default=10, metadata=POSITIVE)  # per admin address; the rest summed up
    retry_interval: float = field(default=60.0, metadata=POSITIVE)  # seconds between tries while the relay fails
    timeout: float = field(default=30.0, metadata=POSITIVE)  # seconds for one SMTP connection step
    max_age_days: float = field(default=5.0, metadata=POSITIVE)  # then an unsendable file goes to failed/
    max_outbox_files: int = field(default=10_000, metadata=POSITIVE)  # past this, new ones are dropped (logged)
    max_header_lines: int = field(default=100, metadata=POSITIVE)  # of the original header section in $headers
    summary_max_items: int = field(default=500, metadata=POSITIVE)  # messages listed in one summary; the rest counted

    def admin(self, category: Category) -> str:
        """The admin address of a main category ("" = nobody)."""
        return {
            Category.VIRUS: self.virus_admin,
            Category.BANNED: self.banned_admin,
            Category.SPAM: self.spam_admin,
            Category.BAD_HEADER: self.bad_header_admin,
        }.get(category, "")


def parse_notify(table: dict, path: Path) -> NotifySettings:
    """The `[notify]` table of `path` as NotifySettings: the key `from` is the field `from_`; unknown
    keys and bad values are ConfigErrors naming the file and the key. A relative outbox is made
    relative to the config file's directory."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [notify] must be a table")
    data = dict(table)
    if "from_" in data:
        raise ConfigError(f"{path}: unknown key notify.from_")
    if "from" in data:
        data["from_"] = data.pop("from")
    try:
        settings = build(NotifySettings, data, path, "notify.")
    except ConfigError as e:
        raise ConfigError(str(e).replace("notify.from_", "notify.from")) from None
    for key in ("virus_admin", "banned_admin", "spam_admin", "bad_header_admin", "from_"):
        value = getattr(settings, key)
        if value and not _ADDRESS.fullmatch(value):
            name = key.rstrip("_")
            raise ConfigError(f"{path}: notify.{name}: {value!r} is not a mail address (local@domain or local)")
    try:
        parse_via(settings.via)
    except ValueError as e:
        raise ConfigError(f"{path}: notify.via: {e}") from None
    if not settings.outbox:
        raise ConfigError(f"{path}: notify.outbox must not be empty")
    outbox = Path(settings.outbox)
    if not outbox.is_absolute():
        settings = dataclasses.replace(settings, outbox=str(Path(path).parent / outbox))
    return settings


def parse_via(via: str) -> tuple[str, int]:
    """`host:port`, "[v6]:port", "host" or "[v6]" (port 25) as (host, port); ValueError otherwise."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", via)
    if match:
        host, port = match.group(1), match.group(2) or "25"
    else:
        host, _, port = via.partition(":") if ":" in via else (via, "", "25")
        if ":" in port:
            raise ValueError(f"{via!r}: write an IPv6 address in brackets, as [::1]:25")
    if not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ValueError(f"{via!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{via!r}: the port must be 1 to 65535")
    return host, int(port)


def load_templates(templates_dir: Path | None) -> dict[str, str]:
    """The five templates: built-in, each overridden by `templates_dir/<name>.txt` when it exists.

    ConfigError (naming the file) for an unreadable template, an unknown `*.txt` in
    templates_dir, an invalid placeholder or one the template cannot have."""
    templates = {}
    given = set()
    if templates_dir is not None and Path(templates_dir).is_dir():
        for entry in sorted(Path(templates_dir).glob("*.txt")):
            if entry.stem not in TEMPLATES:
                known = ", ".join(f"{t}.txt" for t in TEMPLATES)
                raise ConfigError(f"{entry}: unknown notification template (known: {known})")
            given.add(entry.stem)
    for name in TEMPLATES:
        file = Path(templates_dir) / f"{name}.txt" if name in given else DEFAULT_TEMPLATES / f"{name}.txt"
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        template = string.Template(text)
        if not template.is_valid():
            raise ConfigError(f"{file}: a $ that is not a placeholder (write $$ for a dollar sign)")
        allowed = SUMMARY_FIELDS if name == "summary" else FIELDS
        unknown = sorted(set(template.get_identifiers()) - allowed)
        if unknown:
            raise ConfigError(f"{file}: unknown placeholder ${unknown[0]} (known: {', '.join(sorted(allowed))})")
        templates[name] = text
    return templates


def _render(text: str, values: Mapping[str, str], default_subject: str) -> tuple[str, str]:
    """(subject, body) of a template: its `Subject:` first line, if any, and the rest."""
    subject = default_subject
    first, sep, rest = text.partition("\n")
    if first.lower().startswith("subject:"):
        subject, text = first[len("subject:") :].strip(), rest.removeprefix("\r\n").removeprefix("\n")
    subject = string.Template(subject).safe_substitute(values)
    body = string.Template(text).safe_substitute(values)
    return _oneline(subject, 250), body


def _oneline(text: str, limit: int) -> str:
    """No control characters (CR, LF, TAB...): a header value that cannot start a new header line."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listed(items, limit: int = LIST_MAX, width: int = 200) -> list[str]:
    items = list(items)
    out = [printable(i, width) for i in items[:limit]]
    if len(items) > limit:
        out.append(f"and {len(items) - limit} more")
    return out


@dataclass
class _Window:
    """One admin address's current minute: how many were sent, what was held back."""

    admin: str
    start: float
    sent: int = 0
    held: int = 0
    items: list[str] = field(default_factory=list)
    queue_ids: list[str] = field(default_factory=list)
    categories: collections.Counter = field(default_factory=collections.Counter)
    start_wall: float = field(default_factory=time.time)


class Notifier:
    """Admin notifications for one Engine: `notify` after each reply, `start`/`close` the sender thread.

    Thread-safe. `clock` (monotonic seconds) is injectable for the rate limit's tests.
    """

    def __init__(
        self,
        settings: NotifySettings,
        hostname: str,
        templates_dir: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.hostname = hostname
        self.templates = load_templates(templates_dir)
        self.mail_from = settings.from_ or f"postmaster@{hostname}"
        self.outbox = Path(settings.outbox)
        self.failed_dir = self.outbox / FAILED
        self.relay = parse_via(settings.via)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: TtlCache[bool] = TtlCache(SEEN_TTL, SEEN_MAX, clock)
        self._windows: dict[str, _Window] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._relay_ok = True

    # ------------------------------------------------------------------ deciding and writing

    def admin_for(self, category: Category) -> str:
        """The qualified admin address for a main category, "" for none."""
        admin = self.settings.admin(category)
        if admin and "@" not in admin:
            admin = f"{admin}@{self.hostname}"
        return admin

    def notify(self, disposition) -> None:
        """Queue the admin notification a decided message calls for, if any. Never raises, never
        waits on the network (it writes one small file and wakes the sender thread)."""
        try:
            self._notify(disposition)
        except Exception as e:
            queue_id = _queue_id(disposition)
            log.error("%s: notification failed: %s: %s", queue_id, type(e).__name__, e, exc_info=True)

    def _notify(self, disposition) -> None:
        outcome = disposition.outcome
        category = outcome.verdict.category
        admin = self.admin_for(category)
        if not admin:
            return
        message = disposition.message
        envelope = message.envelope
        queue_id = _queue_id(disposition)
        sender = envelope.mail_from.strip("<>").lower()
        if sender == admin.lower():
            log.info("%s: no %s notification: the admin %s is the sender", queue_id, category.name, address(admin))
            return
        marked = any(name.strip().lower() == MARKER.lower() for name, _ in message.headers())
        if marked or sender == self.mail_from.lower():
            log.info("%s: no %s notification about a notification (loop)", queue_id, category.name)
            return
        key = self._key(disposition, category, admin)
        now = self._clock()
        with self._lock:
            if self._seen.get(key):
                return
            self._seen.put(key, True)
            window = self._windows.get(admin.lower())
            if window is not None and now >= window.start + WINDOW:
                self._summarize(window)
                window = None
            if window is None:
                window = self._windows[admin.lower()] = _Window(admin, now)
            if window.sent >= self.settings.max_per_minute:
                self._hold(window, disposition, category)
                log.info(
                    "%s: %s notification to %s held back (max_per_minute %d): in the summary",
                    queue_id, category.name, address(admin), self.settings.max_per_minute,
                )  # fmt: skip
                return
            window.sent += 1
        values = self._values(disposition, category, admin)
        default = f"{category.name} in mail FROM {values['sender']}"
        subject, body = _render(self.templates[category.name.lower()], values, default)
        record = self._record(admin, subject, body, "notification", queue_id, category.name)
        if self._write(f"n-{key}.json", record):
            log.info("%s: %s notification to %s queued", queue_id, category.name, address(admin))
            self._wake.set()

    def _key(self, disposition, category: Category, admin: str) -> str:
        """Names one message's notification: the same disposition twice gives the same key."""
        message = disposition.message
        env = message.envelope
        digest = hashlib.sha256()
        for part in (env.queue_id, env.mail_from, *env.rcpts, category.name, admin.lower(), str(message.size)):
            digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(message.header_section())
        return digest.hexdigest()[:32]

    def _hold(self, window: _Window, disposition, category: Category) -> None:
        window.held += 1
        window.categories[category.name] += 1
        queue_id = _queue_id(disposition)
        if len(window.items) < self.settings.summary_max_items:
            window.queue_ids.append(queue_id)
            found = disposition.summary
            detail = {
                Category.VIRUS: ", ".join(_listed(found.viruses, 5)),
                Category.BANNED: ", ".join(_listed(found.banned, 5)),
                Category.BAD_HEADER: ", ".join(_listed(found.bad_headers, 3)),
            }.get(category, printable(disposition.outcome.verdict.reason, 200))
            env = disposition.message.envelope
            window.items.append(
                f"{queue_id} {category.name} from {address(env.mail_from)} "
                f"client {_client(env)}: {detail}, {disposition.outcome.verdict.action}"
            )

    def tick(self, force: bool = False) -> float | None:
        """Write the summary of every admin's minute that has ended (`force`: of every minute, on
        close); the seconds until the next one ends, None when none is open."""
        now = self._clock()
        wrote = False
        with self._lock:
            for key, window in list(self._windows.items()):  # noqa: B007
                if force or now >= window.start + WINDOW:
                    del self._windows[key]
                    wrote |= self._summarize(window)
            due = min((w.start + WINDOW - now for w in self._windows.values()), default=None)
        if wrote:
            self._wake.set()
        return None if due is None else max(due, 0.0)

    def _summarize(self, window: _Window) -> bool:
        """The summary of a minute's held-back notifications, if any were; called with the lock held."""
        if not window.held:
            return False
        admin = window.admin
        listed = len(window.items)
        items = list(window.items)
        if window.held > listed:
            items.append(f"... and {window.held - listed} more (summary_max_items {self.settings.summary_max_items})")
        values = {
            "count": str(window.held),
            "categories": ", ".join(f"{n} x {c}" for n, c in window.categories.most_common()),
            "queue_ids": ", ".join(window.queue_ids) + (" ..." if window.held > listed else ""),
            "items": "\n".join(items),
            "admin": admin,
            "start": format_datetime(localtime(_fromtimestamp(window.start_wall))),
            "end": format_datetime(localtime(_fromtimestamp(window.start_wall + WINDOW))),
            "max_per_minute": str(self.settings.max_per_minute),
            "date": format_datetime(localtime()),
            "hostname": printable(self.hostname, 255),
        }
        subject, body = _render(self.templates["summary"], values, f"{window.held} more notifications held back")
        record = self._record(admin, subject, body, "summary", "", values["categories"])
        name = f"s-{hashlib.sha256(admin.encode()).hexdigest()[:12]}-{int(window.start_wall)}-{secrets.token_hex(4)}"
        if self._write(name + ".json", record):
            log.info(
                "notification summary to %s queued: %d held back (%s)",
                address(admin),
                window.held,
                values["categories"],
            )
            return True
        return False

    def _values(self, disposition, category: Category, admin: str) -> dict[str, str]:
        """The placeholders' values, each sanitised: no control characters, no CR or LF (but the
        multi-line $bad_headers and $headers, whose every line is)."""
        message = disposition.message
        env = message.envelope
        outcome = disposition.outcome
        verdict = outcome.verdict
        found = disposition.summary
        reply = outcome.reply
        score = verdict.spam_score if verdict.spam_score is not None else found.score
        return {
            "category": category.name,
            "viruses": ", ".join(_listed(found.viruses)) or "-",
            "banned": ", ".join(_listed(found.banned)) or "-",
            "bad_headers": "\n".join("  " + p for p in _listed(found.bad_headers, width=300)) or "  -",
            "client": _client(env),
            "helo": printable(env.helo, 255) or "-",
            "sender": address(env.mail_from),
            "recipients": ", ".join(_listed([address(r) for r in outcome.recipients or env.rcpts], width=330)) or "-",
            "queue_id": _queue_id(disposition),
            "quarantine_id": printable(str(getattr(outcome, "quarantine_id", "") or ""), 64) or "-",
            "reason": printable(verdict.reason, 300) or "-",
            "action": verdict.action,
            "reply": printable(str(reply), 300) if reply else "250 (accepted)",
            "score": format_score(score) if score is not None else "-",
            "date": format_datetime(localtime()),
            "hostname": printable(self.hostname, 255),
            "headers": self._headers(message),
            "admin": admin,
        }

    def _headers(self, message) -> str:
        lines = []
        for name, value in message.headers():
            for line in f"{name}: {value}".split("\n"):
                lines.append(printable(line.replace("\t", "        ").rstrip("\r"), 998))
        limit = self.settings.max_header_lines
        if len(lines) > limit:
            lines = lines[:limit] + [f"[{len(lines) - limit} more header lines not shown (max_header_lines)]"]
        return "\n".join(lines)

    def _record(self, admin: str, subject: str, body: str, kind: str, queue_id: str, category: str) -> dict:
        # 7bit: non-ASCII template text goes quoted-printable; 998: each header on one line, never folded
        msg = EmailMessage(policy=email.policy.SMTP.clone(cte_type="7bit", max_line_length=998))
        msg["Date"] = format_datetime(localtime())
        msg["From"] = self.mail_from
        msg["To"] = admin
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid("milterd", domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg[MARKER] = "1"
        msg.set_content(body, charset="utf-8")
        return {
            "version": 1,
            "kind": kind,
            "mail_from": self.mail_from,
            "rcpt": admin,
            "queue_id": queue_id,
            "category": category,
            "created": time.time(),
            "message": msg.as_bytes().decode("utf-8", "surrogateescape"),
        }

    def _ensure_outbox(self) -> Path:
        for directory in (self.outbox, self.failed_dir):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)  # whatever the umask
        return self.outbox

    def _write(self, name: str, record: dict) -> bool:
        """The record as outbox/name, atomically (a temp file, 0600, linked into place); False when
        that name exists already (in the outbox or failed/) or the outbox is full."""
        outbox = self._ensure_outbox()
        final = outbox / name
        if final.exists() or (self.failed_dir / name).exists():
            return False
        waiting = sum(1 for e in os.scandir(outbox) if e.is_file() and not e.name.startswith("."))
        if waiting >= self.settings.max_outbox_files:
            log.error(
                "notification to %s dropped: %d files wait in %s (max_outbox_files); is the relay %s down?",
                address(record["rcpt"]), waiting, outbox, self.settings.via,
            )  # fmt: skip
            return False
        data = json.dumps(record).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=outbox)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, final)  # never replaces: a second writer of the same name loses
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        _fsync_dir(outbox)
        return True

    # ------------------------------------------------------------------ sending

    def start(self) -> None:
        """Start the sender thread; it first sends what the outbox holds (from before a restart)."""
        if self._thread is not None:
            return
        try:
            self._ensure_outbox()
            self._clean_temp()
        except OSError as e:
            log.error("notify outbox %s: %s", self.outbox, e)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="milterd-notify", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the sender thread look at the outbox and the rate-limit windows now."""
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the sender thread (waiting up to `timeout` s) and write the summaries of the open
        minutes into the outbox, so the next start sends them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("notify: the sender thread did not stop within %.0f s", timeout)
            self._thread = None
        try:
            self.tick(force=True)
        except Exception as e:
            log.error("notify: summaries not written: %s: %s", type(e).__name__, e)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            due, drained = None, False
            try:
                due = self.tick()
                if self._stop.is_set():
                    break
                drained = self.deliver()
            except Exception as e:
                log.error("notify: sender: %s: %s", type(e).__name__, e, exc_info=True)
            waits = [w for w in (due, None if drained else self.settings.retry_interval) if w is not None]
            self._wake.wait(min(waits) if waits else None)

    def pending(self) -> list[Path]:
        """The outbox files waiting, oldest first."""
        try:
            entries = [e for e in os.scandir(self.outbox) if e.is_file() and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        dated = []
        for entry in entries:
            try:
                dated.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
            except FileNotFoundError:
                continue  # sent by another sender meanwhile
        return [path for _, _, path in sorted(dated)]

    def deliver(self) -> bool:
        """Send every outbox file through the relay (one connection). True when nothing is left to
        retry; False when the relay could not be reached or deferred one (retry later)."""
        smtp, drained = None, True
        try:
            for path in self.pending():
                if self._stop.is_set():
                    return False
                result, smtp = self._deliver_one(path, smtp)
                if result == "retry-all":
                    return False
                drained &= result != "retry"
            return drained
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()

    def _deliver_one(self, path: Path, smtp):
        """("sent" | "failed" | "skipped" | "retry" | "retry-all", the connection to reuse)."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return "skipped", smtp
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "skipped", smtp  # another sender (a reload's old Notifier, another process) has it
            if os.fstat(f.fileno()).st_nlink == 0:
                return "skipped", smtp  # sent and removed while we waited for it
            try:
                record = json.loads(f.read())
                mail_from, rcpt, text = record["mail_from"], record["rcpt"], record["message"]
                created = float(record.get("created", 0))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                self._fail(path, f"unreadable outbox file: {e}")
                return "failed", smtp
            if time.time() - created > self.settings.max_age_days * 86400:
                days = self.settings.max_age_days
                self._fail(path, f"not accepted by {self.settings.via} within max_age_days {days:g}")
                return "failed", smtp
            if smtp is None:
                host, port = self.relay
                try:
                    smtp = smtplib.SMTP(host, port, local_hostname=self.hostname, timeout=self.settings.timeout)
                except (OSError, smtplib.SMTPException) as e:
                    self._relay_down(e)
                    return "retry-all", None
            try:
                smtp.sendmail(mail_from, [rcpt], text.encode("utf-8", "surrogateescape"))
            except smtplib.SMTPRecipientsRefused as e:
                code, reply = next(iter(e.recipients.values()), (0, b""))
                return self._refused(path, code, reply, rcpt), smtp
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
                return self._refused(path, e.smtp_code, e.smtp_error, rcpt), smtp
            except (OSError, smtplib.SMTPException) as e:
                self._relay_down(e)
                try:
                    smtp.close()
                except OSError:
                    pass
                return "retry-all", None
            os.unlink(path)
            _fsync_dir(self.outbox)
        if not self._relay_ok:
            log.info("notify: relay %s accepts again", self.settings.via)
            self._relay_ok = True
        log.info(
            "%s: %s notification sent to %s via %s",
            record.get("queue_id") or "-", record.get("kind", "notification"), address(rcpt), self.settings.via,
        )  # fmt: skip
        return "sent", smtp

    def _refused(self, path: Path, code: int, reply, rcpt: str) -> str:
        text = printable(reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply), 300)
        if 500 <= code < 600:
            self._fail(path, f"{self.settings.via} refused it for {address(rcpt)}: {code} {text}")
            return "failed"
        log.warning("notify: %s deferred %s for %s: %s %s; retry in %g s",
                    self.settings.via, path.name, address(rcpt), code, text, self.settings.retry_interval)  # fmt: skip
        return "retry"

    def _fail(self, path: Path, why: str) -> None:
        """Move a file the relay will never take into failed/, and say so."""
        try:
            self.failed_dir.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, self.failed_dir / path.name)
            log.error("notify: %s moved to %s: %s", path.name, self.failed_dir, why)
        except OSError as e:
            log.error("notify: %s: %s; and it cannot be moved to %s: %s", path.name, why, self.failed_dir, e)

    def _relay_down(self, error: Exception) -> None:
        level = logging.WARNING if self._relay_ok else logging.DEBUG
        self._relay_ok = False
        waiting, retry = len(self.pending()), self.settings.retry_interval
        log.log(
            level, "notify: relay %s unavailable: %s: %s; %d notifications wait in %s, retry every %g s",
            self.settings.via, type(error).__name__, error, waiting, self.outbox, retry,
        )  # fmt: skip

    def _clean_temp(self) -> None:
        """Temp files a crash left behind (older than an hour: a live writer's are seconds old)."""
        for entry in os.scandir(self.outbox):
            if entry.name.startswith(".tmp-") and time.time() - entry.stat().st_mtime > 3600:
                os.unlink(entry.path)


def _queue_id(disposition) -> str:
    try:
        return printable(disposition.message.envelope.queue_id, 40) or "NOQUEUE"
    except Exception:
        return "NOQUEUE"


def _client(env) -> str:
    return f"{printable(env.client_name, 100) or 'unknown'}[{printable(env.client_ip, 60)}]"


def _fromtimestamp(seconds: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
