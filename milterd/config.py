"""Load and validate milterd.toml: every section is a frozen dataclass, every key checked.

Unknown sections and keys, and values of the wrong type, are errors that name the file and key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .dkimsign import Signer, SigningSettings, build_signer
from .dns import parse_nameserver
from .mime import Limits
from .rules import Rules, load_rules
from .tomlschema import POSITIVE, ConfigError, build, read_toml

DEFAULT_PATH = Path("/etc/milterd/milterd.toml")


@dataclass(frozen=True)
class MilterSettings:
    listen: str = "inet:8891@127.0.0.1"
    rules: str = "rules"  # relative to the config file
    user: str = ""  # drop root to this user after opening the socket; "" keeps the current user
    hostname: str = field(default_factory=socket.getfqdn)  # for X-Virus-Scanned
    spool_threshold: int = 1 << 20  # bytes of a message kept in memory; the rest goes to a temp file
    spool_dir: str = ""  # where spooled messages go ("" = the system temp dir)
    max_concurrent: int = field(default=32, metadata=POSITIVE)  # messages evaluated at once; more wait for a slot
    timeout: int = 600  # seconds libmilter waits on an idle MTA connection
    log_file: str = ""  # "" = stderr in the foreground, syslog (mail facility) as a daemon
    log_level: typing.Literal["debug", "info", "warning", "error"] = "info"
    pidfile: str = ""


@dataclass(frozen=True)
class ClamavSettings:
    enabled: bool = True
    # a unix socket path or "tcp:HOST:PORT"; a list is a failover pool
    socket: tuple[str, ...] = field(default=("/run/clamav/clamd.ctl",), metadata=POSITIVE)
    timeout: float = field(default=30.0, metadata=POSITIVE)
    # clamd's StreamMaxLength default: clamd refuses larger streams, so larger mail is UNCHECKED
    max_size: int = field(default=25 * 1024 * 1024, metadata=POSITIVE)


@dataclass(frozen=True)
class SpamdSettings:
    enabled: bool = True
    # HOST:PORT or a unix socket path; a list is a failover pool
    address: tuple[str, ...] = field(default=("127.0.0.1:783",), metadata=POSITIVE)
    timeout: float = field(default=60.0, metadata=POSITIVE)
    max_size: int = 512000  # larger messages skip SpamAssassin, as spamc does


@dataclass(frozen=True)
class BannedSettings(Limits):
    """The banned-file check; the MIME walker's unpacking limits are amavis' ($MAXLEVELS, $MAXFILES, ...)."""

    enabled: bool = True


@dataclass(frozen=True)
class HeadersSettings:
    """amavis' bad-header tests (8-bit, control characters, long lines, syntax, missing, duplicates, MIME)."""

    enabled: bool = True


@dataclass(frozen=True)
class DnsSettings:
    """The one resolver DKIM, SPF and DMARC use."""

    # "host" or "host:port" ("[::1]:5353" for IPv6); empty = the system resolver (/etc/resolv.conf)
    nameservers: tuple[str, ...] = ()
    timeout: float = field(default=5.0, metadata=POSITIVE)  # seconds for one lookup, every server and retry


@dataclass(frozen=True)
class DkimSettings:
    enabled: bool = True
    timeout: float = field(default=10.0, metadata=POSITIVE)  # seconds for the key lookups of all signatures
    # dkimpy holds the message in memory: larger mail is not verified
    max_size: int = field(default=25 * 1024 * 1024, metadata=POSITIVE)


@dataclass(frozen=True)
class SpfSettings:
    enabled: bool = True
    timeout: float = field(default=20.0, metadata=POSITIVE)  # seconds for the whole evaluation (RFC 7208 4.6.4)


@dataclass(frozen=True)
class DmarcSettings:
    """DMARC for the From domain; built only when [dkim] and [spf] are both enabled (it judges their results)."""

    enabled: bool = True
    timeout: float = field(default=10.0, metadata=POSITIVE)  # seconds for the policy lookups (From and org domain)


@dataclass(frozen=True)
class PyzorSettings:
    """Pyzor digests checked against its servers; off by default, as it asks an outside server."""

    enabled: bool = False
    servers: tuple[str, ...] = field(default=("public.pyzor.org:24441",), metadata=POSITIVE)  # HOST:PORT
    timeout: float = field(default=5.0, metadata=POSITIVE)
    max_size: int = field(default=512000, metadata=POSITIVE)  # larger ones are not digested (spamc's limit)


@dataclass(frozen=True)
class RazorSettings:
    """Razor through Debian's razor-check; off by default, as it asks outside servers."""

    enabled: bool = False
    command: str = "razor-check"
    homedir: str = ""  # razor's -home (its identity and server list); "" = the running user's ~/.razor
    timeout: float = field(default=5.0, metadata=POSITIVE)


@dataclass(frozen=True)
class DccSettings:
    """DCC through the dccifd daemon's socket; off by default, as dccifd asks outside servers."""

    enabled: bool = False
    socket: str = "/var/lib/dcc/dccifd"
    timeout: float = field(default=5.0, metadata=POSITIVE)


@dataclass(frozen=True)
class Config:
    path: Path | None
    rules: Rules
    milter: MilterSettings = field(default_factory=MilterSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    signer: Signer | None = None  # built from [signing] when enabled: its keys read and checked
    clamav: ClamavSettings = field(default_factory=ClamavSettings)
    spamd: SpamdSettings = field(default_factory=SpamdSettings)
    banned: BannedSettings = field(default_factory=BannedSettings)
    headers: HeadersSettings = field(default_factory=HeadersSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    spf: SpfSettings = field(default_factory=SpfSettings)
    dmarc: DmarcSettings = field(default_factory=DmarcSettings)
    pyzor: PyzorSettings = field(default_factory=PyzorSettings)
    razor: RazorSettings = field(default_factory=RazorSettings)
    dcc: DccSettings = field(default_factory=DccSettings)


_SECTIONS = {
    "milter": MilterSettings,
    "signing": SigningSettings,
    "clamav": ClamavSettings,
    "spamd": SpamdSettings,
    "banned": BannedSettings,
    "headers": HeadersSettings,
    "dns": DnsSettings,
    "dkim": DkimSettings,
    "spf": SpfSettings,
    "dmarc": DmarcSettings,
    "pyzor": PyzorSettings,
    "razor": RazorSettings,
    "dcc": DccSettings,
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
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]")
    sections = {}
    for name, cls in _SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        sections[name] = build(cls, section, path, f"{name}.")
    for nameserver in sections["dns"].nameservers:
        try:
            parse_nameserver(nameserver)
        except ValueError as e:
            raise ConfigError(f"{path}: dns.nameservers: {e}") from None
    signer = build_signer(sections["signing"], path)
    rules_dir = path.parent / sections["milter"].rules
    if not rules_dir.is_dir():
        raise ConfigError(f"{path}: milter.rules: {rules_dir} is not a directory")
    return Config(path=path, rules=load_rules(rules_dir), signer=signer, **sections)
