"""Load and validate milterd.toml: every section is a frozen dataclass, every key checked.

Data only, and nothing heavy imported: a reload reads it, and the engine is built from it.

Unknown sections and keys, and values of the wrong type, are errors that name the file and key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import registry
from .dkimsign import SigningSettings, check_signing
from .dns import parse_nameserver
from .metrics import MetricsSettings, check_metrics
from .notify import NotifySettings, parse_notify
from .quarantine import QuarantineSettings
from .rules import Rules, load_rules
from .sql import SqlSettings, check_sql
from .tomlschema import POSITIVE, ConfigError, build, read_toml

DEFAULT_PATH = Path("/etc/milterd/milterd.toml")
MAX_MESSAGE_TIMEOUT = 240.0


@dataclass(frozen=True)
class MilterSettings:
    listen: str = "inet:8891@127.0.0.1"
    rules: str = "rules"  # relative to the config file
    user: str = ""  # drop root to this user after opening the socket; "" keeps the current user
    hostname: str = field(default_factory=socket.getfqdn)  # for X-Virus-Scanned
    spool_threshold: int = 1 << 20  # bytes of a message kept in memory; the rest goes to a temp file
    spool_dir: str = ""  # where spooled messages go ("" = the system temp dir)
    # SMTP sessions served at once: messages evaluated at once, each holding one of libmilter's worker
    # threads for its whole evaluation (eom blocks); more wait for a slot, in that thread, inside their
    # message_timeout. 100 = Postfix's default_process_limit, so with a stalled backend no message of a
    # default Postfix spends its budget waiting for a slot instead of being checked.
    max_concurrent: int = field(default=100, metadata=POSITIVE)
    stop_timeout: float = field(default=30.0, metadata=POSITIVE)  # SIGTERM: seconds transactions in flight get
    # seconds from end of message to the reply, waiting for a slot included; well below Postfix's
    # milter_content_timeout (300 s), or Postfix gives up first
    message_timeout: float = field(default=120.0, metadata=POSITIVE)
    # trying milterd beside amavis: every check runs, the verdict is logged and counted, the mail is
    # accepted unchanged (dry_run=yes in the log line); a [[bank]] with dry_run = true does it for one
    # port or network only
    dry_run: bool = False
    dry_run_header: bool = False  # in a dry run, add X-Milterd-Verdict: category, score, would-be action
    timeout: int = 600  # seconds libmilter waits on an idle MTA connection
    log_file: str = ""  # "" = stderr in the foreground, syslog (mail facility) as a daemon
    log_level: typing.Literal["debug", "info", "warning", "error"] = "info"
    pidfile: str = ""
    # Clients whose mail is originating (as SASL-authenticated ones are): the ORIGINATING policy bank
    # and DKIM signing. milterd cannot read Postfix's mynetworks: list the same networks here.
    mynetworks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class DnsSettings:
    """The one resolver DKIM, SPF and DMARC use."""

    # "host" or "host:port" ("[::1]:5353" for IPv6); empty = the system resolver (/etc/resolv.conf)
    nameservers: tuple[str, ...] = ()
    timeout: float = field(default=5.0, metadata=POSITIVE)  # seconds for one lookup, every server and retry
    cache_size: int = field(default=10000, metadata=POSITIVE)  # answers kept, each for its TTL


@dataclass(frozen=True)
class Config:
    """Validated settings, data only: `engine.build_engine` makes the running parts from it."""

    path: Path | None
    rules: Rules
    milter: MilterSettings = field(default_factory=MilterSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    sql: SqlSettings = field(default_factory=SqlSettings)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    checks: Mapping[str, Any] = field(default_factory=dict)  # check name -> its settings ([name])
    given: frozenset[str] = field(default=frozenset(), compare=False)  # "section.key"s the file sets

    def check(self, name: str) -> Any:
        """A check's settings: its section, or its defaults when the file has none."""
        return self.checks.get(name) or registry()[name].settings()

    def __getattr__(self, name: str) -> Any:
        """`config.clamav` for `config.check("clamav")`."""
        if name in registry():
            return self.check(name)
        raise AttributeError(name)


_SECTIONS = {
    "milter": MilterSettings,
    "signing": SigningSettings,
    "dns": DnsSettings,
    "sql": SqlSettings,
    "quarantine": QuarantineSettings,
    "metrics": MetricsSettings,
}


def load_config(path: Path | None = None) -> Config:
    """Read a config file and its rules directory.

    With no path, the default file is used when it exists; otherwise built-in defaults apply (so
    `milterd scan` works on a machine with no configuration).
    """
    if path is None and not DEFAULT_PATH.exists():
        return Config(path=None, rules=load_rules(None))
    path = Path(path or DEFAULT_PATH)
    data = read_toml(path)
    schema = {**_SECTIONS, **{name: spec.settings for name, spec in registry().items()}}
    unknown = sorted(set(data) - set(schema) - {"notify"})
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]")
    if isinstance(data.get("signing"), dict) and "mynetworks" in data["signing"]:
        raise ConfigError(f"{path}: signing.mynetworks is now milter.mynetworks (the policy banks use it too)")
    sections = {}
    for name, cls in schema.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        sections[name] = build(cls, section, path, f"{name}.")
    for nameserver in sections["dns"].nameservers:
        try:
            parse_nameserver(nameserver)
        except ValueError as e:
            raise ConfigError(f"{path}: dns.nameservers: {e}") from None
    if sections["milter"].message_timeout > MAX_MESSAGE_TIMEOUT:
        raise ConfigError(
            f"{path}: milter.message_timeout must be at most {MAX_MESSAGE_TIMEOUT:g} s, well below Postfix's"
            " milter_content_timeout (300 s): past it Postfix has given up on the reply"
        )
    for i, network in enumerate(sections["milter"].mynetworks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{path}: milter.mynetworks[{i}]: {network!r} is not a network (CIDR)") from None
    check_signing(sections["signing"], path)
    check_sql(sections["sql"], path)
    check_metrics(sections["metrics"], path)
    notify = parse_notify(data.get("notify", {}), path)
    if sections["quarantine"].store == "sql" and not sections["sql"].enabled:
        raise ConfigError(f'{path}: quarantine.store = "sql" needs [sql] dsn or dsn_file')
    via = sections["quarantine"].release_via
    if not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", via):
        raise ConfigError(f"{path}: quarantine.release_via must be HOST:PORT, not {via!r}")
    rules_dir = path.parent / sections["milter"].rules
    if not rules_dir.is_dir():
        raise ConfigError(f"{path}: milter.rules: {rules_dir} is not a directory")
    return Config(
        path=path,
        rules=load_rules(rules_dir),
        milter=sections.pop("milter"),
        signing=sections.pop("signing"),
        dns=sections.pop("dns"),
        sql=sections.pop("sql"),
        quarantine=sections.pop("quarantine"),
        notify=notify,
        metrics=sections.pop("metrics"),
        checks=sections,
        given=frozenset(f"{name}.{key}" for name, table in data.items() for key in table),
    )
