"""Session fixtures: real clamd, spamd, pyzord, MariaDB, milterd and Postfix on loopback, started once per run.

Every daemon runs in a private directory on free ports and is stopped by PID at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import daemons
from tests.dnsserver import start_dns

ROOT = Path(__file__).resolve().parent.parent
MILTERD = str(Path(sys.executable).parent / "milterd")
SQL_DIR = ROOT / "tests" / "sql"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def pytest_collection_modifyitems(items):
    """Mark each test by its directory: unit, integration or e2e."""
    for item in items:
        layer = Path(item.fspath).parent.name
        if layer in ("unit", "integration", "e2e"):
            item.add_marker(layer)


@pytest.fixture(scope="session")
def daemon_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("daemons")
    daemons.make_traversable(path)
    return path


@pytest.fixture(scope="session")
def clamd(daemon_dir):
    server = daemons.start_clamd(daemon_dir / "clamd")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spamd(daemon_dir):
    server = daemons.start_spamd(daemon_dir / "spamd")
    yield server
    server.stop()


def write_config(
    directory: Path,
    *,
    clamav: str,
    spamd: str,
    policy: dict | None = None,
    dns: str | None = None,
    spamd_critical: bool = False,
) -> Path:
    """A milterd.toml plus rules/: the shipped banned.toml, and policy.toml with `policy` merged over it.

    `dns`: the nameserver ("127.0.0.1:PORT") for DKIM, SPF and DMARC; without one they are off, so
    no test waits on a resolver that cannot answer.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules").mkdir(exist_ok=True)
    rules = tomllib.loads((ROOT / "rules" / "policy.toml").read_text())
    for key, value in (policy or {}).items():
        if isinstance(value, dict):
            rules.setdefault(key, {}).update(value)
        else:
            rules[key] = value
    (directory / "rules" / "policy.toml").write_text(_toml(rules))
    shutil.copy(ROOT / "rules" / "banned.toml", directory / "rules" / "banned.toml")
    path = directory / "milterd.toml"
    off = "[dkim]\nenabled = false\n[spf]\nenabled = false\n[dmarc]\nenabled = false\n"
    auth = f'[dns]\nnameservers = ["{dns}"]\n' if dns else off
    # the quarantine and the notification outbox in the test's own directory; no relay listens on port 1
    quarantine = (
        f'[quarantine]\ndirectory = "{directory / "quarantine"}"\n'
        f'[notify]\noutbox = "{directory / "outbox"}"\nvia = "127.0.0.1:1"\n'
    )
    critical = "critical = true\n" if spamd_critical else ""
    path.write_text(
        f'[milter]\n[clamav]\nsocket = "{clamav}"\n[spamd]\naddress = "{spamd}"\n{critical}{auth}{quarantine}'
    )
    return path


def _toml(data: dict) -> str:
    """Enough TOML for rules: scalars, lists of strings, one level of tables."""
    plain = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(plain) + "\n\n" + "\n\n".join(tables) + "\n"


@dataclass
class Milterd:
    listen: str  # milterd's form: inet:PORT@HOST or unix:PATH
    log: Path
    proc: subprocess.Popen

    @property
    def port(self) -> int:
        return int(self.listen.split(":")[1].split("@")[0])

    @property
    def socket(self) -> str:
        """Postfix's form of the same socket."""
        if self.listen.startswith("unix:"):
            return self.listen
        return f"inet:127.0.0.1:{self.port}"


def start_milterd(config: Path, unix: Path | None = None) -> Milterd:
    """`milterd run --foreground` on a free port (or a unix socket), as a user would start it."""
    port = 0 if unix else daemons.free_port()
    listen = f"unix:{unix}" if unix else f"inet:{port}@127.0.0.1"
    config.write_text(config.read_text().replace("[milter]\n", f'[milter]\nlisten = "{listen}"\n', 1))
    log = config.with_suffix(".log")
    proc = subprocess.Popen(
        [MILTERD, "run", "--foreground", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=open(log, "wb")
    )
    if unix:
        daemons.wait_for_unix_socket(unix, 20, proc, logs=[log])
    else:
        daemons.wait_for_port("127.0.0.1", port, 20, proc, logs=[log])
    return Milterd(listen, log, proc)


def stop_milterd(*milterds: Milterd) -> None:
    """SIGTERM to all first, then wait: libmilter notices a stop only every 5 s, so one at a time adds up."""
    for milterd in milterds:
        milterd.proc.terminate()
    for milterd in milterds:
        try:
            milterd.proc.wait(15)
        except subprocess.TimeoutExpired:
            milterd.proc.kill()
            milterd.proc.wait()


@pytest.fixture(scope="session")
def dns(daemon_dir):
    """The authoritative DNS server for DKIM, SPF and DMARC, empty: tests add their names with dns.update()."""
    server = start_dns(daemon_dir / "dns")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pyzord(daemon_dir):
    """A private pyzord (UDP, gdbm); anonymous may report and whitelist. Its usage log counts requests."""
    server = daemons.start_pyzord(daemon_dir / "pyzord")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb(daemon_dir):
    """A private MariaDB (own datadir, unix socket, 127.0.0.1:free port) with the seed schema:
    tests/sql/mail.sql (database `mail`, account mail_admin, SELECT only) and tests/sql/amavis.sql
    (amavis' lookup tables in database `amavis`, empty).

    `mariadb.dsn` is mail_admin's SQLAlchemy URL for `mail`; `mariadb.url("amavis")` for `amavis`;
    `mariadb.execute(sql, params)` / `mariadb.query(...)` run as root (PyMySQL %s placeholders,
    autocommit), so tests insert their own rows. A test may `stop()` it and must `start()` it
    again (same port and data) before it ends.
    """
    server = daemons.start_mariadb(daemon_dir / "mariadb")
    try:
        for name in ("mail.sql", "amavis.sql"):
            server.load_sql(SQL_DIR / name)
        yield server
    finally:
        server.stop()
