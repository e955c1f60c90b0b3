"""Quarantine, release, admin notifications and TELL (issue 12) through a real Postfix.

One private Postfix with one listener per milterd, plus `plain`, a listener without milters that
serves as every milterd's `release_via` and as the `[notify] via` relay: what it delivers lands in
the Maildir, where the assertions read it (by Delivered-To, which Postfix's virtual(8) adds).

The milterds, started once:
- main: the directory store, [destiny] virus = "REJECT", [spamd] = a spamd with --allow-tell;
  no admin notifications.
- broken: its quarantine directory lies under a regular file, so no copy can be written (as
  root, permissions would not stop a write).
- notify: virus_admin = admin@example.com, via = plain.
- burst: virus_admin = burst-admin@example.com, via = plain, max_per_minute = 5.
- relay: virus_admin = relay-admin@example.com, via = a port where nothing listens until the test
  starts smtp-sink there; retry_interval = 1.
- sqla, sqlb: `store = "sql"` on the session's MariaDB, with amavis' default $sql_select_policy.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import gzip
import json
import re
import smtplib
import stat
import subprocess
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import daemons
from tests.conftest import MILTERD, Milterd, _toml, start_milterd, stop_milterd, write_config
from tests.integration.test_notify_relay import SMTP_SINK, Sink

AMAVIS_POLICY = (
    "SELECT *, users.id FROM users LEFT JOIN policy ON users.policy_id=policy.id"
    " WHERE users.email IN (%k) ORDER BY users.priority DESC"
)
SQL_USER = ("milterd_quarantine", "quarantine_password")  # SELECT on amavis.*, ALL on its table
ID = re.compile(rb"id=([A-Za-z0-9_-]{12})$")
SENDER = "sender@example.org"  # a local mailbox: a notification to it would be delivered and seen
RCPT = "user@example.com"
VIRUS = "Eicar-Test-Signature"
MAX_PER_MINUTE = 5
BURST = 50


@dataclass
class Mta:
    postfix: daemons.Postfix
    milterds: dict[str, Milterd]
    configs: dict[str, Path]
    relay_port: int
    sink_dir: Path


def configure(base: Path, name: str, clamd, spamd, sections: dict) -> Path:
    """write_config's milterd.toml with `sections` merged over its tables."""
    path = write_config(base / name, clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}")
    data = tomllib.loads(path.read_text())
    for table, values in sections.items():
        data.setdefault(table, {}).update(values)
    path.write_text(_toml(data))
    return path


@pytest.fixture(scope="module")
def tell_spamd(tmp_path_factory):
    server = daemons.start_spamd(tmp_path_factory.mktemp("spamd-tell"), allow_tell=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sql_account(mariadb):
    """An account that may create and fill milterd's quarantine table and read amavis' lookup tables."""
    user, password = SQL_USER
    mariadb.execute(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'")
    mariadb.execute(f"GRANT SELECT ON amavis.* TO '{user}'@'127.0.0.1'")
    mariadb.execute(f"GRANT ALL ON amavis.milterd_quarantine TO '{user}'@'127.0.0.1'")
    try:
        yield mariadb.url("amavis", user=user, password=password)
    finally:
        mariadb.execute("DROP TABLE IF EXISTS amavis.milterd_quarantine")
        mariadb.execute(f"DROP USER '{user}'@'127.0.0.1'")


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd, tell_spamd, sql_account):
    base = tmp_path_factory.mktemp("e2e_quarantine")
    daemons.make_traversable(base)
    plain_port = daemons.free_port()  # the listener without milters; start_postfix picks the others'
    relay_port = daemons.free_port()
    via = {"via": f"127.0.0.1:{plain_port}", "retry_interval": 1}
    release = {"release_via": f"127.0.0.1:{plain_port}"}
    blocker = base / "not-a-directory"
    blocker.write_text("a regular file: nothing can be created under it\n")
    sql = {"dsn": sql_account, "select_policy": AMAVIS_POLICY, "timeout": 3}
    sections = {
        "main": {
            "spamd": {"address": f"127.0.0.1:{tell_spamd.port}"},
            "quarantine": release,
            "notify": {"virus_admin": ""},
        },
        "broken": {"quarantine": {**release, "directory": str(blocker / "quarantine")}, "notify": {"virus_admin": ""}},
        "notify": {"quarantine": release, "notify": {**via, "virus_admin": "admin@example.com"}},
        "burst": {
            "quarantine": release,
            "notify": {**via, "virus_admin": "burst-admin@example.com", "max_per_minute": MAX_PER_MINUTE},
        },
        "relay": {
            "quarantine": release,
            "notify": {"via": f"127.0.0.1:{relay_port}", "retry_interval": 1, "virus_admin": "relay-admin@example.com"},
        },
        "sqla": {"quarantine": {**release, "store": "sql"}, "sql": sql, "notify": {"virus_admin": ""}},
        "sqlb": {"quarantine": {**release, "store": "sql"}, "sql": sql, "notify": {"virus_admin": ""}},
    }
    configs = {name: configure(base, name, clamd, spamd, s) for name, s in sections.items()}
    for name in ("main", "broken"):  # [destiny] virus = "REJECT" said out loud (the shipped default too)
        rules = configs[name].parent / "rules" / "policy.toml"
        data = tomllib.loads(rules.read_text())
        data.setdefault("destiny", {})["virus"] = "REJECT"
        rules.write_text(_toml(data))
    milterds: dict[str, Milterd] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
            started = {name: pool.submit(start_milterd, config) for name, config in configs.items()}
            for name, future in started.items():
                milterds[name] = future.result()
        # plain: a listener without milters on a port chosen before the milterds started (their
        # release_via and via name it)
        plain = f"127.0.0.1:{plain_port} inet n - n - - smtpd\n  -o syslog_name=postfix/plain\n"
        postfix = daemons.start_postfix(
            base / "postfix", {name: m.socket for name, m in milterds.items()}, extra_master_cf=plain
        )
        daemons.wait_for_listen(plain_port, 20, postfix.proc, pid=postfix.pid, logs=[postfix.log])
    except BaseException:
        stop_milterd(*milterds.values())
        raise
    try:
        yield Mta(postfix, milterds, configs, relay_port, base / "sink")
    finally:
        postfix.stop()
        stop_milterd(*[m for m in milterds.values() if m.proc.poll() is None])


# ---------------------------------------------------------------------------------------- helpers


def new_token() -> bytes:
    return b"mtok_" + uuid.uuid4().hex.encode()


def message(token: bytes, body: bytes, sender: str = SENDER, rcpt: str = RCPT, subject: str = "test") -> bytes:
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{token.decode()}@example.org>\r\nDate: {email.utils.formatdate()}\r\n\r\n".encode()
        + body
        + b"\r\n"
        + token
        + b"\r\n"
    )


def send(smtp: smtplib.SMTP, body: bytes, sender: str = SENDER, rcpt: str = RCPT) -> tuple[bytes, int, bytes, bytes]:
    """One transaction on an open connection: (token, code, text, the message sent)."""
    token = new_token()
    raw = message(token, body, sender, rcpt)
    try:
        smtp.sendmail(sender, [rcpt], raw)
    except smtplib.SMTPDataError as e:
        return token, e.smtp_code, e.smtp_error, raw
    return token, 250, b"", raw


def send_one(mta: Mta, listener: str, body: bytes = daemons.EICAR, **kwargs) -> tuple[bytes, int, bytes, bytes]:
    with smtplib.SMTP("127.0.0.1", mta.postfix.ports[listener], timeout=60) as smtp:
        return send(smtp, body, **kwargs)


def rejected(mta: Mta, listener: str, **kwargs) -> tuple[bytes, str, bytes]:
    """EICAR through `listener`, refused with 554 ending in id=ID: (token, the id, the message sent)."""
    token, code, text, raw = send_one(mta, listener, **kwargs)
    assert code == 554, (code, text)
    assert text.startswith(f"5.7.0 Rejected: virus {VIRUS}".encode()), text
    match = ID.search(text)
    assert match, text
    return token, match.group(1).decode(), raw


def headers(raw: bytes) -> list[tuple[str, str]]:
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    head = head.replace("\n\t", " ").replace("\n ", " ")
    return [tuple(part.strip() for part in line.split(":", 1)) for line in head.splitlines() if ":" in line]


def header(raw: bytes, name: str) -> list[str]:
    return [v for k, v in headers(raw) if k.lower() == name.lower()]


def delivered_to(mta: Mta, rcpt: str, needle: bytes = b"") -> list[bytes]:
    return [m for m in mta.postfix.delivered() if header(m, "Delivered-To") == [rcpt] and needle in m]


def wait_for(condition, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return result


def milterd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MILTERD, *args], capture_output=True, text=True, timeout=60)


def listed(config: Path) -> dict[str, dict]:
    out = milterd_cli("quarantine", "list", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    return {entry["id"]: entry for entry in map(json.loads, out.stdout.splitlines())}


def notifications(mta: Mta, admin: str) -> list[bytes]:
    return [m for m in delivered_to(mta, admin) if header(m, "X-Milterd-Notification") == ["1"]]


def outbox(mta: Mta, name: str) -> list[Path]:
    return sorted(p for p in (mta.configs[name].parent / "outbox").glob("*.json"))


# ---------------------------------------------------------------------------------------- 1. keep and release


def test_eicar_is_rejected_with_its_id_and_kept_gzipped_0600_in_a_0700_directory(mta):
    token, qid, raw = rejected(mta, "main")
    directory = mta.configs["main"].parent / "quarantine"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    body, envelope = directory / f"{qid}.eml.gz", directory / f"{qid}.json"
    for path in (body, envelope):
        assert stat.S_ISREG(path.lstat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600, path
    kept = gzip.decompress(body.read_bytes())
    # the message as milterd received it: what was sent, below the Received: header Postfix adds
    assert kept.replace(b"\r\n", b"\n").endswith(raw.replace(b"\r\n", b"\n")), kept[:600]
    assert [k for k, _ in headers(kept) if k.lower() != "received"] == [k for k, _ in headers(raw)]
    entry = json.loads(envelope.read_text())
    assert entry["id"] == qid and entry["category"] == "virus" and entry["rcpts"] == [RCPT]
    assert entry["mail_from"] == SENDER and VIRUS in entry["reason"] and entry["size"] == len(kept)
    assert entry["client_ip"] == "127.0.0.1" and entry["helo"] == "[127.0.0.1]" and entry["queue_id"]
    # the log line of that message says where its copy is
    line = wait_for(
        lambda: [ln for ln in mta.milterds["main"].log.read_text().splitlines() if f"quarantine={qid}" in ln],
        what="milterd's log line",
    )
    assert len(line) == 1 and "category=VIRUS" in line[0] and "reply=554 5.7.0" in line[0], line
    assert line[0].split()[3] == f"{entry['queue_id']}:", line  # after the date, time and milterd[PID]:
    mta.postfix.wait_queue_empty(20)
    assert not [m for m in mta.postfix.delivered() if token in m]


def test_list_show_release_once_and_release_to_another_address(mta):
    config = str(mta.configs["main"])
    token, qid, raw = rejected(mta, "main")
    before = time.time()

    entry = listed(mta.configs["main"])[qid]
    assert set(entry) >= {"id", "time", "category", "mail_from", "rcpts", "size", "reason"}
    assert entry["category"] == "virus" and entry["rcpts"] == [RCPT] and entry["mail_from"] == SENDER
    assert VIRUS in entry["reason"] and abs(entry["time"] - before) < 30
    assert entry["size"] >= len(raw) and not entry.get("released")
    virus_only = milterd_cli("quarantine", "list", "--json", "--category", "virus", "--since", "1h", "--config", config)
    assert qid in virus_only.stdout
    assert qid not in milterd_cli("quarantine", "list", "--json", "--category", "spam", "--config", config).stdout

    show = milterd_cli("quarantine", "show", qid, "--config", config)
    assert show.returncode == 0, show.stderr
    assert re.search(rf"^reason: .*{VIRUS}", show.stdout, re.M), show.stdout
    assert f"Message-ID: <{token.decode()}@example.org>" in show.stdout and "Subject: test" in show.stdout
    assert daemons.EICAR.decode() not in show.stdout  # headers, not the body

    first = milterd_cli("release", qid, "--config", config)
    assert first.returncode == 0, first.stdout + first.stderr
    [copy] = wait_for(lambda: delivered_to(mta, RCPT, token), what="the released copy")
    assert header(copy, "X-Quarantine-ID") == [f"<{qid}>"]
    assert daemons.EICAR in copy and header(copy, "Message-ID") == [f"<{token.decode()}@example.org>"]

    again = milterd_cli("release", qid, "--config", config)
    assert again.returncode != 0
    assert "released already" in again.stderr and time.strftime("%Y-%m-%d") in again.stderr, again.stderr
    assert listed(mta.configs["main"])[qid]["released"]
    mta.postfix.wait_queue_empty(20)
    assert len([m for m in mta.postfix.delivered() if token in m]) == 1  # the refused release sent nothing

    other_token, other_qid, _ = rejected(mta, "main")
    to = milterd_cli("release", other_qid, "--to", "other@example.com", "--config", config)
    assert to.returncode == 0, to.stdout + to.stderr
    [copy] = wait_for(lambda: delivered_to(mta, "other@example.com", other_token), what="the copy --to")
    assert header(copy, "X-Quarantine-ID") == [f"<{other_qid}>"]
    mta.postfix.wait_queue_empty(20)
    assert [m for m in mta.postfix.delivered() if other_token in m] == [copy]  # not to the original recipient


# ---------------------------------------------------------------------------------------- 2. no copy, no 5xx


def test_an_unwritable_quarantine_gives_451_and_nothing_is_delivered(mta):
    token, code, text, _ = send_one(mta, "broken")
    assert code == 451 and text.startswith(b"4.3.0"), (code, text)
    assert b"id=" not in text
    mta.postfix.wait_queue_empty(20)
    assert not [m for m in mta.postfix.delivered() if token in m]
    log = mta.milterds["broken"].log.read_text()
    assert "cannot keep a copy" in log and "quarantine=" not in log


# ---------------------------------------------------------------------------------------- 3. notifications


def test_a_notification_reaches_virus_admin_with_the_virus_and_the_id_and_never_the_sender(mta):
    token, qid, _ = rejected(mta, "notify")
    [note] = wait_for(lambda: notifications(mta, "admin@example.com"), what="the notification")
    assert VIRUS in header(note, "Subject")[0]
    assert f"Quarantine id:  {qid}".encode() in note and VIRUS.encode() in note
    assert token in note  # the original header section (its Message-ID) is quoted
    assert daemons.EICAR not in note
    wait_for(lambda: not outbox(mta, "notify"), what="the outbox to empty")
    mta.postfix.wait_queue_empty(20)
    time.sleep(1)
    assert delivered_to(mta, SENDER) == []  # no backscatter: the sender's own mailbox got nothing
    assert len(notifications(mta, "admin@example.com")) == 1


def test_a_burst_of_50_viruses_gives_max_per_minute_notifications_and_one_summary(mta):
    admin = "burst-admin@example.com"

    def connection(count: int) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", mta.postfix.ports["burst"], timeout=60) as smtp:
            return [send(smtp, daemons.EICAR)[1:3] for _ in range(count)]

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = [r for rs in pool.map(connection, [BURST // 5] * 5) for r in rs]
    assert len(replies) == BURST and all(code == 554 and ID.search(text) for code, text in replies), replies
    wait_for(lambda: len(notifications(mta, admin)) >= MAX_PER_MINUTE, what=f"{MAX_PER_MINUTE} notifications")
    wait_for(lambda: not outbox(mta, "burst"), what="the outbox to empty")
    mta.postfix.wait_queue_empty(20)
    time.sleep(1.5)  # a retry interval and more: nothing else comes within the minute
    assert len(notifications(mta, admin)) == MAX_PER_MINUTE
    held = mta.milterds["burst"].log.read_text().count("held back (max_per_minute 5)")
    assert held == BURST - MAX_PER_MINUTE

    # The summary is written when the minute ends or when milterd stops (close()): stop it, then
    # start it again on the same config, which sends what its outbox holds.
    burst = mta.milterds["burst"]
    stop_milterd(burst)
    assert burst.proc.returncode == 0 and "milterd stopped" in burst.log.read_text()  # a clean stop
    [summary_file] = outbox(mta, "burst")
    assert summary_file.name.startswith("s-")
    log = burst.log.with_suffix(".restart.log")
    burst.proc = subprocess.Popen(
        [MILTERD, "run", "--foreground", "--config", str(mta.configs["burst"])],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )
    daemons.wait_for_port("127.0.0.1", burst.port, 20, burst.proc, logs=[log])
    wait_for(lambda: len(notifications(mta, admin)) == MAX_PER_MINUTE + 1, what="the summary")
    [summary] = [m for m in notifications(mta, admin) if b"held back" in m]
    held_back = BURST - MAX_PER_MINUTE
    assert header(summary, "Subject") == [f"{held_back} more notifications held back (VIRUS x {held_back})"]
    assert summary.count(f": {VIRUS}".encode()) == held_back  # one line per message held back
    assert delivered_to(mta, SENDER) == []


@pytest.mark.skipif(not Path(SMTP_SINK).exists(), reason="needs Postfix's smtp-sink")
def test_with_the_relay_down_the_notification_arrives_once_it_is_back(mta):
    admin = "relay-admin@example.com"
    _, qid, _ = rejected(mta, "relay")
    wait_for(lambda: outbox(mta, "relay"), what="the notification in the outbox")
    time.sleep(2.5)  # the relay is down for a few retries (retry_interval = 1)
    assert len(outbox(mta, "relay")) == 1
    log = mta.milterds["relay"].log.read_text()
    assert f"relay 127.0.0.1:{mta.relay_port} unavailable" in log
    sink = Sink(mta.sink_dir, mta.relay_port)
    try:
        wait_for(lambda: sink.messages() and not outbox(mta, "relay"), timeout=15, what="the notification sent")
        time.sleep(1)
        [(records, note)] = sink.messages()
    finally:
        sink.stop()
    assert records["X-Rcpt-Args"] == [f"<{admin}>"]  # the admin only
    assert VIRUS in note["Subject"] and f"Quarantine id:  {qid}" in note.get_content()


# ---------------------------------------------------------------------------------------- 4. SQL store


def test_sql_store_kept_by_one_milterd_is_listed_and_released_by_the_other(mta, mariadb):
    token, qid, _ = rejected(mta, "sqla")
    [(category,)] = mariadb.query("SELECT category FROM amavis.milterd_quarantine WHERE id = %s", (qid,))
    assert category == "virus"
    assert not (mta.configs["sqla"].parent / "quarantine" / f"{qid}.json").exists()
    entry = listed(mta.configs["sqlb"])[qid]
    assert entry["rcpts"] == [RCPT] and entry["category"] == "virus"
    out = milterd_cli("release", qid, "--config", str(mta.configs["sqlb"]))
    assert out.returncode == 0, out.stdout + out.stderr
    [copy] = wait_for(lambda: delivered_to(mta, RCPT, token), what="the copy released by the other milterd")
    assert header(copy, "X-Quarantine-ID") == [f"<{qid}>"] and daemons.EICAR in copy
    again = milterd_cli("release", qid, "--config", str(mta.configs["sqla"]))
    assert again.returncode != 0 and "released already" in again.stderr


# ---------------------------------------------------------------------------------------- 5. TELL


def test_release_learn_ham_teaches_spamd(mta, tell_spamd):
    nspam, nham = tell_spamd.bayes_counts()
    token, qid, _ = rejected(mta, "main")
    out = milterd_cli("release", qid, "--learn-ham", "--config", str(mta.configs["main"]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "learned as ham" in out.stdout
    wait_for(lambda: delivered_to(mta, RCPT, token), what="the released copy")
    assert tell_spamd.bayes_counts() == (nspam, nham + 1)
