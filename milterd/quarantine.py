"""The quarantine: a copy of blocked mail that an admin can read and release.

amavis' `$QUARANTINEDIR` and `amavisd-release`, kept before the SMTP reply: a message is refused
(or discarded) only once its copy is on disk, and a copy that cannot be written makes the reply
451, never a 5xx without it. Each entry has an id of 12 characters of [A-Za-z0-9_-] (amavis'
mail_id), the gzipped message (`ID.eml.gz`) and its envelope (`ID.json`), both 0600, in a 0700
directory opened by path for every entry.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import logging
import os
import re
import smtplib
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal

from .message import CHUNK, Message
from .tomlschema import POSITIVE

ID = re.compile(r"[A-Za-z0-9_-]{12}")
log = logging.getLogger("milterd")
CATEGORIES = ("virus", "banned", "unchecked", "spam", "bad_header")  # what policy.toml's `quarantine` may list


class QuarantineError(Exception):
    """An entry that cannot be written, found or released; the message says which and why."""


@dataclass(frozen=True)
class QuarantineSettings:
    """[quarantine]: where kept mail goes and how it is released (amavis' $QUARANTINEDIR, amavisd-release)."""

    directory: str = "/var/lib/milterd/quarantine"  # made 0700 when missing; entries 0600
    # "sql": in the [sql] database (table milterd_quarantine), so that several milterd hosts share one
    # quarantine and a release works from any of them
    store: Literal["directory", "sql"] = "directory"
    # SMTP HOST:PORT where released mail is re-injected: a Postfix service without milters (README)
    release_via: str = "127.0.0.1:10025"
    keep_days: int = field(default=30, metadata=POSITIVE)  # older entries are purged (daily, and by `purge`)
    timeout: float = field(default=30.0, metadata=POSITIVE)  # seconds for a release's SMTP exchange


@dataclass(frozen=True)
class Entry:
    """One kept message's envelope and why it was kept (`ID.json`)."""

    id: str
    time: float  # when it was kept (epoch seconds)
    category: str  # virus, banned, spam, ...
    reason: str
    mail_from: str
    rcpts: tuple[str, ...]
    size: int
    client_ip: str = ""
    client_name: str = ""
    helo: str = ""
    queue_id: str = ""
    released: float | None = None  # when it was released, and to whom
    released_to: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        data = dict(data)
        data["rcpts"] = tuple(data.get("rcpts", ()))
        data["released_to"] = tuple(data.get("released_to", ()))
        return cls(**data)


def new_id() -> str:
    """12 characters of [A-Za-z0-9_-] from 72 random bits, as amavis' mail_id; never starting with
    "-", which a command line would take for an option (`milterd release -x...`)."""
    while (mail_id := base64.urlsafe_b64encode(os.urandom(9)).decode("ascii")).startswith("-"):
        pass
    return mail_id


class DirectoryStore:
    """Entries as files in one directory. Writers never replace a file in place: a new file is
    written under a temporary name and renamed, so a reader sees a whole entry or none."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def keep(self, message: Message, entry: Entry) -> None:
        """Write the entry; QuarantineError (with the reason) when it cannot be, and nothing is left."""
        try:
            self._ensure_directory()
            body, tmp = self.directory / f"{entry.id}.eml.gz", self.directory / f"{entry.id}.eml.tmp"
            with _exclusive(tmp) as out, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6) as gz:
                with message.open() as stream:
                    while chunk := stream.read(CHUNK):
                        gz.write(chunk)
            os.rename(tmp, body)
            self._write_entry(entry)
        except OSError as e:
            for leftover in (f"{entry.id}.eml.tmp", f"{entry.id}.eml.gz", f"{entry.id}.json.tmp"):
                with contextlib.suppress(OSError):
                    (self.directory / leftover).unlink()
            raise QuarantineError(f"cannot keep a copy in {self.directory}: {e.strerror or e}") from None

    def entries(self) -> Iterator[Entry]:
        """Every entry, oldest first."""
        found = []
        for path in self.directory.glob("*.json"):
            if ID.fullmatch(path.stem):
                try:
                    found.append(Entry.from_json(json.loads(path.read_text())))
                except (OSError, ValueError, TypeError):
                    continue  # being written or removed meanwhile, or not ours
        return iter(sorted(found, key=lambda e: e.time))

    def get(self, entry_id: str) -> Entry:
        path = self._path(entry_id, ".json")
        try:
            return Entry.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise QuarantineError(f"no quarantined message {entry_id}") from None
        except (OSError, ValueError, TypeError) as e:
            raise QuarantineError(f"{path}: unreadable: {e}") from None

    def open(self, entry_id: str) -> BinaryIO:
        """The kept message, as it arrived."""
        try:
            return gzip.open(self._path(entry_id, ".eml.gz"), "rb")  # type: ignore[return-value]
        except FileNotFoundError:
            raise QuarantineError(f"no quarantined message {entry_id}") from None

    def released(self, entry: Entry, rcpts: Sequence[str], when: float) -> None:
        try:
            self._write_entry(replace(entry, released=when, released_to=tuple(rcpts)))
        except OSError as e:
            raise QuarantineError(f"released, but cannot record it in {self.directory}: {e.strerror or e}") from None

    def purge(self, older_than: float) -> int:
        """Remove the entries kept before `older_than` (epoch seconds); how many."""
        removed = 0
        for entry in self.entries():
            if entry.time < older_than:
                _unlink(self.directory / f"{entry.id}.json")
                _unlink(self.directory / f"{entry.id}.eml.gz")
                removed += 1
        return removed

    def _ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True)
        mode = self.directory.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            os.chmod(self.directory, 0o700)

    def _write_entry(self, entry: Entry) -> None:
        path = self.directory / f"{entry.id}.json"
        tmp = path.with_suffix(".json.tmp")
        _unlink(tmp)
        with _exclusive(tmp) as out:
            out.write(_entry_json(entry).encode() + b"\n")
        os.rename(tmp, path)

    def _path(self, entry_id: str, suffix: str) -> Path:
        if not ID.fullmatch(entry_id):
            raise QuarantineError(f"{entry_id!r} is not a quarantine id (12 characters of A-Z a-z 0-9 _ -)")
        return self.directory / f"{entry_id}{suffix}"


class SqlStore:
    """Entries in the [sql] database, one row each (amavis' msgs and quarantine tables are the model):
    several milterd hosts share one quarantine, and a release works from any of them. Errors are
    QuarantineError (the message then gets 451), without the password."""

    def __init__(self, database):
        from sqlalchemy import Column, Float, LargeBinary, MetaData, String, Table, Text
        from sqlalchemy.dialects import mysql

        self.database = database
        self.table = Table(
            "milterd_quarantine",
            MetaData(),
            Column("id", String(12), primary_key=True),
            Column("time", Float, nullable=False, index=True),
            Column("category", String(16), nullable=False),
            Column("entry", Text, nullable=False),  # the Entry as JSON
            Column("message", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        )
        self._created = False
        self.directory = database.where  # what the purge log names

    def keep(self, message: Message, entry: Entry) -> None:
        with message.open() as stream:
            data = gzip.compress(stream.read(), compresslevel=6)
        row = {"id": entry.id, "time": entry.time, "category": entry.category, "entry": _entry_json(entry)}
        with self._failures("keep"), self.database.engine.begin() as db:
            db.execute(self.table.insert().values(**row, message=data))

    def entries(self) -> Iterator[Entry]:
        with self._failures("list"), self.database.engine.connect() as db:
            rows = db.execute(self.table.select().with_only_columns(self.table.c.entry).order_by(self.table.c.time))
            return iter([Entry.from_json(json.loads(text)) for (text,) in rows])

    def get(self, entry_id: str) -> Entry:
        return Entry.from_json(json.loads(self._column(entry_id, "entry")))

    def open(self, entry_id: str) -> BinaryIO:
        return io.BytesIO(gzip.decompress(self._column(entry_id, "message")))

    def released(self, entry: Entry, rcpts: Sequence[str], when: float) -> None:
        done = replace(entry, released=when, released_to=tuple(rcpts))
        with self._failures("release"), self.database.engine.begin() as db:
            db.execute(self.table.update().where(self.table.c.id == entry.id).values(entry=_entry_json(done)))

    def purge(self, older_than: float) -> int:
        with self._failures("purge"), self.database.engine.begin() as db:
            return db.execute(self.table.delete().where(self.table.c.time < older_than)).rowcount

    def _column(self, entry_id: str, column: str):
        if not ID.fullmatch(entry_id):
            raise QuarantineError(f"{entry_id!r} is not a quarantine id (12 characters of A-Z a-z 0-9 _ -)")
        with self._failures("read"), self.database.engine.connect() as db:
            value = db.execute(
                self.table.select().with_only_columns(self.table.c[column]).where(self.table.c.id == entry_id)
            ).scalar()
        if value is None:
            raise QuarantineError(f"no quarantined message {entry_id}")
        return value

    def _failures(self, what: str):
        """Database errors as QuarantineError; the table is made the first time it is needed."""
        if not self._created:
            with self.database.failures("quarantine: create table", QuarantineError):
                self.table.create(self.database.engine, checkfirst=True)
            self._created = True
        return self.database.failures(f"quarantine: {what}", QuarantineError)


def _entry_json(entry: Entry) -> str:
    return json.dumps(entry.to_json(), ensure_ascii=True)


def open_store(settings: QuarantineSettings, config_path: Path, database=None) -> DirectoryStore | SqlStore:
    """The store [quarantine] names: its directory (relative to milterd.toml), or the [sql] database."""
    if settings.store == "sql":
        if database is None:
            raise QuarantineError('quarantine.store = "sql" needs [sql] dsn')
        return SqlStore(database)
    return DirectoryStore(config_path.parent / settings.directory)


class _exclusive:
    """A new file, mode 0600 from its creation whatever the umask, flushed to disk on close."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> BinaryIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def release(
    store: DirectoryStore | SqlStore, settings: QuarantineSettings, entry_id: str, to: Sequence[str] = ()
) -> Entry:
    """Send a kept message to its recipients (or `to`) through `release_via`, with X-Quarantine-ID;
    the entry marked released. QuarantineError when it was released already or the server refused it."""
    entry = store.get(entry_id)
    if entry.released is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(entry.released))
        raise QuarantineError(f"{entry_id} was released already, at {when}, to {', '.join(entry.released_to)}")
    rcpts = list(to) or list(entry.rcpts)
    host, _, port = settings.release_via.rpartition(":")
    with store.open(entry_id) as stream:
        data = f"X-Quarantine-ID: <{entry_id}>\r\n".encode() + stream.read()
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=settings.timeout) as smtp:
            refused = smtp.sendmail(entry.mail_from or "<>", rcpts, data)
    except smtplib.SMTPRecipientsRefused as e:
        raise QuarantineError(f"{settings.release_via} refused every recipient: {_refusals(e.recipients)}") from None
    except (smtplib.SMTPException, OSError) as e:
        raise QuarantineError(f"{settings.release_via}: {e}") from None
    accepted = [r for r in rcpts if r not in refused]
    store.released(entry, accepted, time.time())
    if refused:
        raise QuarantineError(f"released to {', '.join(accepted)}; refused: {_refusals(refused)}")
    return replace(entry, released_to=tuple(accepted))


def _refusals(refused: dict) -> str:
    return "; ".join(f"{rcpt}: {code} {text.decode('utf-8', 'replace')}" for rcpt, (code, text) in refused.items())


def purge_daily(
    store: DirectoryStore | SqlStore, keep_days: int, stop: threading.Event, interval: float = 86400.0
) -> threading.Thread:
    """A daemon thread that purges entries older than keep_days now and then once a day, until `stop`."""

    def purge() -> None:
        while not stop.is_set():
            try:
                removed = store.purge(time.time() - keep_days * 86400)
                if removed:
                    log.info("quarantine: %d entries older than %d days removed", removed, keep_days)
            except (OSError, QuarantineError) as e:
                log.warning("quarantine: purge of %s failed: %s", store.directory, getattr(e, "strerror", None) or e)
            stop.wait(interval)

    thread = threading.Thread(target=purge, name="quarantine-purge", daemon=True)
    thread.start()
    return thread


def parse_age(text: str) -> float:
    """'90s', '30m', '2h', '7d' -> seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not an age such as 30m, 2h or 7d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
