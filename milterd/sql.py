"""amavis' SQL lookups, run as amavis runs them: `$sql_select_policy` and `$sql_select_white_black_list`
taken verbatim, `%k` becoming one bound parameter per lookup key and `?` the recipient's id.

Values are always bound, never put into the SQL text. One connection pool serves every session;
answers are kept for `cache_ttl` seconds. A lookup that fails raises LookupFailed, whose text
never holds the password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import TtlCache
from .lookups import LookupFailed
from .sanitize import printable
from .secretfile import SecretFileError, read_secret
from .tomlschema import POSITIVE, ConfigError

# Outside quoted strings: %k, a ? placeholder, or a colon SQLAlchemy would read as a bind name.
_TOKENS = re.compile(r"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|%k|\?|:(?=\w)""")
_NONE = object()  # a cached "no row"


@dataclass(frozen=True)
class SqlSettings:
    """[sql]: per-recipient policy and sender lists from the mail server's own database."""

    dsn: str = ""  # an SQLAlchemy URL: mysql+pymysql://user:password@127.0.0.1:3306/mail, sqlite:///path
    dsn_file: str = ""  # or a file (mode 0600) that holds it, relative to milterd.toml
    select_policy: str = ""  # amavis' $sql_select_policy, verbatim
    select_white_black_list: str = ""  # amavis' $sql_select_white_black_list; "" = no sender lists from SQL
    timeout: float = field(default=5.0, metadata=POSITIVE)  # seconds to connect, and for each query
    cache_ttl: float = 60.0  # seconds an answer is reused; 0 = ask every time
    cache_entries: int = field(default=10_000, metadata=POSITIVE)  # answers kept at most
    pool_size: int = field(default=4, metadata=POSITIVE)  # connections kept open; as many more under load

    @property
    def enabled(self) -> bool:
        return bool(self.dsn or self.dsn_file)


def check_sql(settings: SqlSettings, path: Path) -> None:
    """The values alone (the DSN file is read when the lookups are built)."""
    if settings.dsn and settings.dsn_file:
        raise ConfigError(f"{path}: sql: give dsn or dsn_file, not both")
    if settings.enabled and not settings.select_policy:
        raise ConfigError(f"{path}: sql.select_policy is needed with a dsn (amavis' $sql_select_policy)")
    if settings.select_policy and "%k" not in settings.select_policy:
        raise ConfigError(f"{path}: sql.select_policy must have %k (the recipient's lookup keys)")
    wb = settings.select_white_black_list
    if wb and ("%k" not in wb or "?" not in wb):
        raise ConfigError(
            f"{path}: sql.select_white_black_list must have ? (the recipient's id) and %k (the sender's keys)"
        )


def read_dsn(settings: SqlSettings, path: Path) -> str:
    """The DSN, from the config or its file; a file others can read is refused (it holds a password)."""
    if settings.dsn:
        return settings.dsn
    try:
        return read_secret(path.parent / settings.dsn_file, 4096).decode("utf-8", "replace").strip()
    except SecretFileError as e:
        raise ConfigError(f"{path}: sql.dsn_file: {e}") from None


def bind(query: str, keys: int, placeholder: str = "rid") -> tuple[str, list[str]]:
    """The query with `%k` as `:k0, :k1, ...` (`keys` of them) and `?` as `:rid`; and the key names.

    Quoted strings are left as they are; a colon elsewhere is escaped, so nothing in the text but
    our own names is read as a bind parameter.
    """
    names = [f"k{i}" for i in range(keys)]

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token == "%k":
            return ", ".join(f":{n}" for n in names)
        if token == "?":
            return f":{placeholder}"
        if token == ":":
            return "\\:"
        return token.replace(":", "\\:")

    return _TOKENS.sub(replace, query), names


class Database:
    """One connection pool for a DSN, whose errors never show the password. Thread-safe."""

    def __init__(self, settings: SqlSettings, dsn: str):
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        self.settings = settings
        self._secret = ""
        try:
            url = make_url(dsn)
        except ArgumentError:
            raise ConfigError("sql.dsn is not an SQLAlchemy URL (driver://user:password@host:port/database)") from None
        self._secret = url.password or ""
        self.where = url.render_as_string(hide_password=True)
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "mysql":
            t = max(1, round(settings.timeout))
            connect_args = {"connect_timeout": t, "read_timeout": t, "write_timeout": t}
        elif url.get_backend_name() == "sqlite":
            connect_args = {"timeout": settings.timeout, "check_same_thread": False}
        try:
            self.engine = create_engine(
                url,
                connect_args=connect_args,
                pool_pre_ping=True,  # a restarted server: the stale connection is replaced, not failed
                pool_recycle=3600,
                **(
                    {
                        "pool_size": settings.pool_size,
                        "max_overflow": settings.pool_size,
                        "pool_timeout": settings.timeout,
                    }
                    if url.get_backend_name() != "sqlite"
                    else {}
                ),
            )
        except Exception as e:  # a missing driver, a bad option: the message may quote the URL
            raise ConfigError(f"sql.dsn: {self._redact(str(e))}") from None

    def failures(self, what: str, error: type[Exception] = LookupFailed) -> _Failures:
        """A context in which any database error becomes `error`, naming `what` and the server."""
        return _Failures(self, what, error)

    def close(self) -> None:
        self.engine.dispose()

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class SqlLookups(Database):
    """The two lookups over one pool. Thread-safe: one instance serves every session."""

    def __init__(self, settings: SqlSettings, dsn: str):
        super().__init__(settings, dsn)
        self._cache: TtlCache[Any] = TtlCache(settings.cache_ttl, settings.cache_entries)

    def policy(self, keys: Sequence[str]) -> Mapping[str, Any] | None:
        """The first row of select_policy for these recipient keys (amavis orders by priority in
        the query), columns lower-cased; None when no row matches."""
        return self._first(("policy", tuple(keys)), self.settings.select_policy, keys, {})

    def white_black(self, recipient_id: Any, sender_keys: Sequence[str]) -> Any:
        """The first `wb` of select_white_black_list for the recipient's id and the sender's keys, or None."""
        if not self.settings.select_white_black_list or recipient_id is None:
            return None
        row = self._first(
            ("wb", recipient_id, tuple(sender_keys)),
            self.settings.select_white_black_list,
            sender_keys,
            {"rid": recipient_id},
        )
        return None if row is None else next(iter(row.values()), None)

    def columns(self, keys: Sequence[str]) -> list[str]:
        """The column names select_policy returns (for check-config), whatever the rows."""
        from sqlalchemy import text

        sql, names = bind(self.settings.select_policy, len(keys))
        with self.failures("select_policy"), self.engine.connect() as connection:
            return [c.lower() for c in connection.execute(text(sql), dict(zip(names, keys, strict=True))).keys()]

    def _first(self, cache_key: tuple, query: str, keys: Sequence[str], params: dict) -> Mapping[str, Any] | None:
        from sqlalchemy import text

        cached = self._cache.get(cache_key)
        if cached is not None:
            return None if cached is _NONE else cached
        sql, names = bind(query, len(keys))
        with self.failures("select_white_black_list" if params else "select_policy"), self.engine.connect() as c:
            row = c.execute(text(sql), {**dict(zip(names, map(_bindable, keys), strict=True)), **params}).first()
        found = None if row is None else {k.lower(): v for k, v in row._mapping.items()}
        self._cache.put(cache_key, _NONE if found is None else found)
        return found


def _bindable(key: str) -> str:
    """A key as a driver can bind it. Octets that are not UTF-8 reach milterd as surrogates
    (pymilter's surrogateescape), which no driver encodes: they become U+FFFD, so that key matches
    nothing and the other keys (the domain's) still answer, instead of an exception at RCPT."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return key


class _Failures:
    """Any database error as LookupFailed (or `error`), naming what failed and the server, never the password."""

    def __init__(self, database: Database, what: str, error: type[Exception]):
        self.database, self.what, self.error = database, what, error

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from sqlalchemy.exc import SQLAlchemyError

        if error is None or not isinstance(error, SQLAlchemyError | OSError):
            return False
        cause = getattr(error, "orig", None) or error
        detail = self.database._redact(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        raise self.error(printable(f"{self.what} on {self.database.where}: {detail}", 400)) from None
