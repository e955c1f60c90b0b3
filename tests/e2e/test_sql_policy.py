"""Per-recipient policy from SQL, through a real Postfix in front of real milterds, clamd, spamd and MariaDB.

Two milterds, each with `[sql]` on the session's private MariaDB:
- "domains": the seed server's own lookup (`mail.domains`, `SELECT "Y" as local ...`), no
  local_domains, recipient_delimiter "+", tag_level -999 (every local recipient's copy is tagged),
  cache_ttl 1 s.
- "amavis": amavis' README.sql schema in the `amavis` database with amavis' default
  $sql_select_policy and $sql_select_white_black_list, and [destiny] spam = "REJECT".

Mail is sent as a remote MTA would (XCLIENT to a TEST-NET-1 address), so milterd sees a
non-originating client; assertions read what Postfix answered and the copies it delivered.
"""

from __future__ import annotations

import email.utils
import smtplib
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import daemons
from tests.conftest import GTUBE, _toml, start_milterd, stop_milterd, write_config

SEED_POLICY = 'SELECT "Y" as local FROM domains WHERE CONCAT("@",domain) IN (%k)'
AMAVIS_POLICY = (
    "SELECT *, users.id FROM users LEFT JOIN policy ON users.policy_id=policy.id"
    " WHERE users.email IN (%k) ORDER BY users.priority DESC"
)
AMAVIS_WBLIST = (
    "SELECT wb FROM wblist JOIN mailaddr ON wblist.sid=mailaddr.id"
    " WHERE wblist.rid=? AND mailaddr.email IN (%k) ORDER BY mailaddr.priority DESC"
)
SEED_DOMAINS = [("example.com",), ("example.org",)]
# SpamAssassin (offline, as tests/daemons configures it) scores this 2.7 (DEAR_FRIEND): above the
# shipped tag_level 2, below the shipped kill_level 4.
DEAR_FRIEND = (
    b"Dear friend,\r\nYou have been selected to receive a free gift. Click here to claim your prize:"
    b" http://example.net/claim\r\nThis is not spam. To unsubscribe click here."
)
CLEAN = b"Hello Bob, lunch on Thursday at noon?"
REMOTE = "ADDR=192.0.2.1 NAME=mail.remote.test"  # XCLIENT: a remote MTA, not originating

# amavis' rows (ids chosen apart from users.id so a wrong `id` column would show)
POLICIES = {  # id -> policy_name and the columns set
    9101: {"policy_name": "strict", "spam_kill_level": 1.5},
    9102: {"policy_name": "lover", "spam_lover": "Y"},
    9103: {"policy_name": "bypass", "bypass_spam_checks": "Y"},
    9104: {"policy_name": "subject", "spam_subject_tag": "[SQL-TAGGED] "},
    9105: {"policy_name": "hostile", "spam_tag_level": -999, "spam_subject_tag": "[HOSTILE] "},
}
# RCPT TO as a client writes it -> its users.email row: amavis looks up the raw (unquoted) address,
# local part lower-cased ($localpart_is_case_sensitive off)
HOSTILE_USERS = {
    '"quo\\"te"@example.com': 'quo"te@example.com',
    '"back\\\\slash"@example.com': "back\\slash@example.com",
    "O'Brien@example.com": "o'brien@example.com",
    "100%_@example.com": "100%_@example.com",
    '"x\'; DROP TABLE users; --"@example.com': "x'; drop table users; --@example.com",
    "jösé@example.com": "jösé@example.com",
}
USERS = {  # email -> policy id (9999: no such policy, every policy column NULL)
    "strict@example.com": 9101,
    "lover@example.com": 9102,
    "bypass@example.com": 9103,
    "tagme@example.com": 9104,
    "wbuser@example.com": 9999,
    **{row: 9105 for row in HOSTILE_USERS.values()},
}
SENDERS = {"goodguy@remote.test": "W", "@.spammers.test": "B"}  # wblist for wbuser@example.com


def sql_section(dsn: str, select_policy: str, select_white_black_list: str = "", cache_ttl: float = 60) -> str:
    lines = [
        "[sql]",
        f'dsn = "{dsn}"',
        f"select_policy = '{select_policy}'",
        f"select_white_black_list = '{select_white_black_list}'",
        "timeout = 3",
        f"cache_ttl = {cache_ttl}",
    ]
    return "\n".join(lines) + "\n"


def sql_config(directory: Path, clamd, spamd, policy: dict, sql: str, drop: tuple[str, ...] = ()) -> Path:
    path = write_config(directory, clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}", policy=policy)
    rules = directory / "rules" / "policy.toml"
    data = tomllib.loads(rules.read_text())
    for key in drop:
        data.pop(key, None)
    rules.write_text(_toml(data))
    path.write_text(path.read_text() + sql)
    return path


@pytest.fixture(scope="module")
def amavis_rows(mariadb):
    """amavis' users/policy/mailaddr/wblist rows for this module, removed afterwards."""
    for pid, columns in POLICIES.items():
        names = ", ".join(["id", *columns])
        mariadb.execute(
            f"INSERT INTO amavis.policy ({names}) VALUES ({', '.join(['%s'] * (len(columns) + 1))})",
            (pid, *columns.values()),
        )
    for address, pid in USERS.items():
        mariadb.execute("INSERT INTO amavis.users (email, policy_id) VALUES (%s, %s)", (address, pid))
    [(rid,)] = mariadb.query("SELECT id FROM amavis.users WHERE email = %s", ("wbuser@example.com",))
    for sender, wb in SENDERS.items():
        mariadb.execute("INSERT INTO amavis.mailaddr (email) VALUES (%s)", (sender,))
        [(sid,)] = mariadb.query("SELECT id FROM amavis.mailaddr WHERE email = %s", (sender,))
        mariadb.execute("INSERT INTO amavis.wblist (rid, sid, wb) VALUES (%s, %s, %s)", (rid, sid, wb))
    try:
        yield
    finally:
        mariadb.execute("DELETE FROM amavis.wblist WHERE rid = %s", (rid,))
        mariadb.execute("DELETE FROM amavis.mailaddr WHERE email IN %s", (list(SENDERS),))
        mariadb.execute("DELETE FROM amavis.users WHERE email IN %s", (list(USERS),))
        mariadb.execute("DELETE FROM amavis.policy WHERE id IN %s", (list(POLICIES),))


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd, mariadb, amavis_rows):
    """The private Postfix with one listener per milterd."""
    base = tmp_path_factory.mktemp("e2e_sql")
    daemons.make_traversable(base)
    configs = {
        "domains": sql_config(
            base / "domains",
            clamd,
            spamd,
            {"tag_level": -999, "recipient_delimiter": "+"},
            sql_section(mariadb.dsn, SEED_POLICY, cache_ttl=1),
            drop=("local_domains",),
        ),
        "amavis": sql_config(
            base / "amavis",
            clamd,
            spamd,
            {"destiny": {"spam": "REJECT"}, "recipient_delimiter": "+"},
            sql_section(mariadb.url("amavis"), AMAVIS_POLICY, AMAVIS_WBLIST),
        ),
    }
    milterds = {}
    try:
        for name, config in configs.items():
            milterds[name] = start_milterd(config)
        postfix = daemons.start_postfix(base / "postfix", {name: m.socket for name, m in milterds.items()})
    except BaseException:
        stop_milterd(*milterds.values())
        raise
    yield Mta(postfix, milterds)
    postfix.stop()
    stop_milterd(*milterds.values())


@dataclass
class Mta:
    postfix: daemons.Postfix
    milterds: dict


@dataclass
class Sent:
    token: bytes
    mail: tuple[int, bytes] = (0, b"")
    rcpts: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    data: tuple[int, bytes] | None = None  # None: no recipient was accepted, DATA not sent

    def code(self, rcpt: str) -> int:
        return self.rcpts[rcpt][0]


def new_token() -> bytes:
    return b"mtok_" + uuid.uuid4().hex.encode()


def message(token: bytes, body: bytes, subject: str = "test", sender: str = "sender@remote.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: friends@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{token.decode()}@remote.test>\r\nDate: {email.utils.formatdate()}\r\n\r\n".encode()
        + body
        + b"\r\n"
        + token
        + b"\r\n"
    )


@contextmanager
def remote_smtp(mta: Mta, listener: str):
    """An SMTP session that Postfix and milterd see as coming from a remote MTA (192.0.2.1)."""
    with smtplib.SMTP("127.0.0.1", mta.postfix.ports[listener], timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.docmd("XCLIENT", REMOTE)[0] == 220
        smtp.ehlo("mail.remote.test")
        yield smtp


def transact(
    smtp: smtplib.SMTP,
    rcpts,
    body: bytes = CLEAN,
    sender: str = "sender@remote.test",
    subject: str = "test",
    token: bytes | None = None,
    options=(),
) -> Sent:
    """One transaction: MAIL, each RCPT (its reply kept), DATA if any was accepted. Never raises on 4xx/5xx."""
    sent = Sent(token or new_token())
    sent.mail = smtp.mail(sender, list(options))
    assert sent.mail[0] == 250, sent.mail
    for rcpt in rcpts:  # as written: smtplib's rcpt() would re-parse a quoted local part
        sent.rcpts[rcpt] = smtp.docmd("RCPT", f"TO:<{rcpt}>")
    if any(code == 250 for code, _ in sent.rcpts.values()):
        code, text = smtp.docmd("DATA")
        assert code == 354, (code, text)
        raw = message(sent.token, body, subject, sender)
        smtp.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        sent.data = smtp.getreply()
    else:
        smtp.rset()
    return sent


def send(mta: Mta, listener: str, rcpts, **kwargs) -> Sent:
    with remote_smtp(mta, listener) as smtp:
        return transact(smtp, rcpts, **kwargs)


def headers(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\n\n", 1)[0].decode("utf-8", "replace").replace("\n\t", " ").replace("\n ", " ")
    return [tuple(part.strip() for part in line.split(":", 1)) for line in head.splitlines() if ":" in line]


def header(raw: bytes, name: str) -> list[str]:
    return [v for k, v in headers(raw) if k.lower() == name.lower()]


def spam_headers(raw: bytes) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers(raw) if k.lower().startswith("x-spam-")]


def delivered_copies(mta: Mta, token: bytes, count: int, timeout: float = 30) -> dict[str, bytes]:
    """The `count` delivered copies holding token, by their Delivered-To (Postfix's virtual(8) adds it)."""
    deadline = time.monotonic() + timeout
    while True:
        copies = [m for m in mta.postfix.delivered() if token in m]
        if len(copies) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(copies) == count, f"{len(copies)} copies of {token!r} delivered, expected {count}"
    return {header(m, "Delivered-To")[0].lower(): m for m in copies}


def nothing_delivered(mta: Mta, token: bytes) -> None:
    mta.postfix.wait_queue_empty(20)
    assert not [m for m in mta.postfix.delivered() if token in m]


def milterd_line(mta: Mta, listener: str, token: bytes, timeout: float = 10) -> str:
    """milterd's one log line for the message holding token (by the queue id Postfix logged)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [
            line.split(": ")[1]
            for line in mta.postfix.log.read_text().splitlines()
            if token.decode() in line and "message-id=" in line
        ]
        lines = [
            line
            for line in mta.milterds[listener].log.read_text().splitlines()
            for queue_id in ids
            if f" {queue_id}: " in line and "category=" in line
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------- the seed's `domains` lookup


def test_a_recipient_in_domains_is_tagged_and_one_outside_is_not(mta):
    sent = send(mta, "domains", ["alice+news@example.com", "bob@example.org"])
    assert sent.code("alice+news@example.com") == 250 and sent.code("bob@example.org") == 250
    assert sent.data[0] == 250
    for copy in delivered_copies(mta, sent.token, 2).values():
        assert header(copy, "X-Spam-Flag") == ["NO"]
        assert header(copy, "X-Spam-Status")[0].startswith("No, score=")
        assert "tagged_above=-999" in header(copy, "X-Spam-Status")[0]

    outside = send(mta, "domains", ["carol@remote.test"])
    assert outside.code("carol@remote.test") == 250 and outside.data[0] == 250
    [copy] = delivered_copies(mta, outside.token, 1).values()
    assert spam_headers(copy) == []
    assert len(header(copy, "X-Virus-Scanned")) == 1  # scanned all the same


def test_a_domain_inserted_while_milterd_runs_is_tagged_after_cache_ttl(mta, mariadb):
    rcpt = "dave@milterd.test"  # Postfix accepts milterd.test (VIRTUAL_DOMAINS); `domains` lacks it
    before = send(mta, "domains", [rcpt])
    assert before.data[0] == 250
    [copy] = delivered_copies(mta, before.token, 1).values()
    assert spam_headers(copy) == []
    mariadb.execute("INSERT INTO mail.domains (domain) VALUES (%s)", ("milterd.test",))
    try:
        time.sleep(1.5)  # cache_ttl = 1: the cached "no row" for dave@milterd.test has expired
        after = send(mta, "domains", [rcpt])
        assert after.data[0] == 250
        [copy] = delivered_copies(mta, after.token, 1).values()
        assert header(copy, "X-Spam-Flag") == ["NO"]
        assert header(copy, "X-Spam-Status")[0].startswith("No, score=")
    finally:
        mariadb.execute("DELETE FROM mail.domains WHERE domain = %s", ("milterd.test",))


def test_mariadb_down_answers_451_at_rcpt_and_nothing_passes_unscanned(mta, mariadb):
    milterd = mta.milterds["domains"]
    local, remote = "erin@example.com", "frank@remote.test"
    mariadb.stop()
    try:
        with remote_smtp(mta, "domains") as smtp:
            down = transact(smtp, [local, remote])
            # DATA with no recipient accepted: Postfix refuses it
            smtp.mail("sender@remote.test")
            smtp.rcpt(local)
            no_data = smtp.docmd("DATA")
    finally:
        mariadb.start()
    for rcpt in (local, remote):  # the non-local one too: never "not local" because the database was away
        code, text = down.rcpts[rcpt]
        assert code == 451 and text.startswith(b"4.3.0"), (rcpt, code, text)
    assert down.data is None
    assert no_data[0] == 554, no_data
    nothing_delivered(mta, down.token)

    log = milterd.log.read_text()
    failed = [line for line in log.splitlines() if "lookup failed, 451" in line]
    assert any(f"<{local}>" in line for line in failed) and any(f"<{remote}>" in line for line in failed)
    line = next(line for line in failed if f"<{local}>" in line)
    assert f"select_policy on mysql+pymysql://mail_admin:***@127.0.0.1:{mariadb.port}/mail" in line, line
    assert "OperationalError" in line and "2003" in line, line  # pymysql's "Can't connect to MySQL server"
    assert "mail_admin_password" not in log
    assert "Traceback" not in log

    again = send(mta, "domains", [local, remote])
    assert again.code(local) == 250 and again.code(remote) == 452  # two policies again: the split
    assert again.data[0] == 250
    [copy] = delivered_copies(mta, again.token, 1).values()
    assert header(copy, "X-Spam-Status")[0].startswith("No, score=")


def test_a_mixed_policy_transaction_is_split_by_452_and_each_part_gets_its_headers(mta):
    local, outside = "grace@example.com", "heidi@remote.test"
    token = new_token()
    with remote_smtp(mta, "domains") as smtp:
        first = transact(smtp, [local, outside], token=token)
        assert first.code(local) == 250
        code, text = first.rcpts[outside]
        assert code == 452 and text.startswith(b"4.5.3"), (code, text)
        assert first.data[0] == 250
        second = transact(smtp, [outside], token=token)  # what an RFC 5321 client does with the 452
        assert second.code(outside) == 250 and second.data[0] == 250
    copies = delivered_copies(mta, token, 2)
    assert header(copies[local], "X-Spam-Flag") == ["NO"]
    assert header(copies[local], "X-Spam-Status")[0].startswith("No, score=")
    assert spam_headers(copies[outside]) == []
    assert len(header(copies[outside], "X-Virus-Scanned")) == 1


def test_originating_mail_keeps_mixed_recipients_under_the_first_recipients_policy(mta):
    """From 127.0.0.1 (mynetworks): no 452; both copies get what the first recipient's policy gives."""
    local, outside = "ivan@example.com", "judy@remote.test"
    with smtplib.SMTP("127.0.0.1", mta.postfix.ports["domains"], timeout=60) as smtp:
        sent = transact(smtp, [local, outside])
    assert sent.code(local) == 250 and sent.code(outside) == 250 and sent.data[0] == 250
    copies = delivered_copies(mta, sent.token, 2)
    for copy in copies.values():
        assert header(copy, "X-Spam-Status")[0].startswith("No, score=")
    line = milterd_line(mta, "domains", sent.token)
    assert "bank=ORIGINATING" in line, line


# Each local part as the client writes it in RCPT TO; Postfix hands milterd the address unquoted.
HOSTILE_LOCAL = [
    '"quo\\"te"@example.com',
    '"back\\\\slash"@example.com',
    "o'brien@example.com",
    "per%cent@example.com",
    "under_score@example.com",
    "100%_@example.com",
    '"x\'; DROP TABLE domains; --"@example.com',
    "jösé@example.com",
]
# Would be local if a key were pasted into the SQL or matched with LIKE; as bound values they match nothing.
HOSTILE_OUTSIDE = [
    '"\') OR 1=1 -- "@remote.test',
    '"\\") OR (\\"1\\"=\\"1"@remote.test',
    "%@remote.test",
    "_@remote.test",
]


def test_hostile_local_parts_reach_mariadb_only_as_bound_parameters(mta, mariadb):
    milterd = mta.milterds["domains"]
    start = milterd.log.stat().st_size
    for rcpt in HOSTILE_LOCAL + HOSTILE_OUTSIDE:
        options = ["SMTPUTF8"] if not rcpt.isascii() else []
        with remote_smtp(mta, "domains") as smtp:
            sent = transact(smtp, [rcpt], options=options)
        code, text = sent.rcpts[rcpt]
        assert code == 250, (rcpt, code, text)  # Postfix takes each; milterd neither defers nor fails it
        assert sent.data[0] == 250, (rcpt, sent.data)
        [copy] = delivered_copies(mta, sent.token, 1).values()
        if rcpt in HOSTILE_LOCAL:  # @example.com matched: the key list was bound whole
            assert header(copy, "X-Spam-Status")[0].startswith("No, score="), rcpt
        else:
            assert spam_headers(copy) == [], rcpt
    assert sorted(mariadb.query("SELECT domain FROM mail.domains")) == SEED_DOMAINS
    with milterd.log.open("rb") as f:
        f.seek(start)
        log = f.read().decode("utf-8", "replace")
    for bad in ("lookup failed", "internal error", "Traceback", "ERROR"):
        assert bad not in log, log


# ------------------------------------------------------------------ amavis' users/policy/wblist


def test_a_per_user_kill_level_refuses_what_another_user_receives(mta):
    for rcpt in ("strict@example.com", "strict+news@example.com"):  # the delimiter finds strict@ too
        sent = send(mta, "amavis", [rcpt], body=DEAR_FRIEND)
        assert sent.code(rcpt) == 250
        code, text = sent.data
        assert code == 554 and text.startswith(b"5.7.0 Rejected: spam, score 2."), (rcpt, code, text)
        nothing_delivered(mta, sent.token)

    relaxed = send(mta, "amavis", ["relaxed@example.com"], body=DEAR_FRIEND)
    assert relaxed.data[0] == 250
    [copy] = delivered_copies(mta, relaxed.token, 1).values()
    assert header(copy, "X-Spam-Flag") == ["NO"]
    status = header(copy, "X-Spam-Status")[0]
    assert status.startswith("No, score=2.") and "DEAR_FRIEND" in status and "required=4" in status


def test_a_spam_lover_gets_gtube_delivered_and_tagged_while_another_user_refuses_it(mta):
    lover = send(mta, "amavis", ["lover@example.com"], body=GTUBE, subject="pills")
    assert lover.data[0] == 250
    [copy] = delivered_copies(mta, lover.token, 1).values()
    assert header(copy, "X-Spam-Flag") == ["YES"]
    assert header(copy, "X-Spam-Status")[0].startswith("Yes, score=1000")
    assert header(copy, "Subject") == ["***SPAM*** pills"]

    other = send(mta, "amavis", ["relaxed@example.com"], body=GTUBE, subject="pills")
    code, text = other.data
    assert code == 554 and text.startswith(b"5.7.0 Rejected: spam, score 1000"), (code, text)
    nothing_delivered(mta, other.token)


def test_bypass_spam_checks_does_not_ask_spamd(mta, spamd):
    bypass = send(mta, "amavis", ["bypass@example.com"], body=GTUBE, subject="pills")
    assert bypass.data[0] == 250  # not SPAM for this recipient: spam was not checked
    [copy] = delivered_copies(mta, bypass.token, 1).values()
    assert spam_headers(copy) == []
    assert header(copy, "Subject") == ["pills"]
    assert len(header(copy, "X-Virus-Scanned")) == 1  # clamd was still asked
    line = milterd_line(mta, "amavis", bypass.token)
    assert "spamd:skipped/" in line and "clamav:ok/" in line, line

    control = send(mta, "amavis", ["relaxed@example.com"])
    assert control.data[0] == 250
    delivered_copies(mta, control.token, 1)
    deadline = time.monotonic() + 10
    while control.token not in spamd.log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    spamd_log = spamd.log.read_bytes()
    assert b"checking message <" + control.token in spamd_log  # spamd logs what it is asked
    assert bypass.token not in spamd_log
    assert "spamd:ok/" in milterd_line(mta, "amavis", control.token)


def test_a_blacklisted_sender_is_spam_and_refused(mta):
    sent = send(mta, "amavis", ["wbuser@example.com"], sender="bulk@mx.spammers.test")
    assert sent.code("wbuser@example.com") == 250
    code, text = sent.data
    assert code == 554 and text.startswith(b"5.7.0 Rejected: spam, sender blacklisted"), (code, text)
    nothing_delivered(mta, sent.token)
    # the list is the recipient's: another user gets the same sender's mail
    other = send(mta, "amavis", ["relaxed@example.com"], sender="bulk@mx.spammers.test")
    assert other.data[0] == 250
    delivered_copies(mta, other.token, 1)


def test_a_whitelisted_sender_passes_gtube_and_x_spam_status_says_whitelisted(mta):
    sent = send(mta, "amavis", ["wbuser@example.com"], body=GTUBE, sender="goodguy@remote.test", subject="pills")
    assert sent.data[0] == 250, sent.data
    [copy] = delivered_copies(mta, sent.token, 1).values()
    assert header(copy, "X-Spam-Flag") == ["NO"]
    status = header(copy, "X-Spam-Status")[0]
    assert status.startswith("No, score=1000") and "WHITELISTED" in status, status
    assert header(copy, "Subject") == ["pills"]


def test_recipients_with_different_sql_policies_are_split_and_each_gets_its_subject_tag(mta):
    """tagme@ has spam_subject_tag "[SQL-TAGGED] " (at tag_level); relaxed@ has no row."""
    tagme, relaxed = "tagme@example.com", "relaxed@example.com"
    token = new_token()
    with remote_smtp(mta, "amavis") as smtp:
        first = transact(smtp, [tagme, relaxed], body=DEAR_FRIEND, token=token)
        assert first.code(tagme) == 250
        code, text = first.rcpts[relaxed]
        assert code == 452 and text.startswith(b"4.5.3"), (code, text)
        assert first.data[0] == 250
        second = transact(smtp, [relaxed], body=DEAR_FRIEND, token=token)
        assert second.code(relaxed) == 250 and second.data[0] == 250
    copies = delivered_copies(mta, token, 2)
    assert header(copies[tagme], "Subject") == ["[SQL-TAGGED] test"]
    assert header(copies[relaxed], "Subject") == ["test"]
    for copy in copies.values():
        assert header(copy, "X-Spam-Status")[0].startswith("No, score=2.")


def test_hostile_addresses_match_their_amavis_users_rows_exactly(mta, mariadb):
    """The whole key is bound: each hostile address finds its own users row, and nothing else happens."""
    users = mariadb.query("SELECT COUNT(*) FROM amavis.users")
    for rcpt in HOSTILE_USERS:
        options = ["SMTPUTF8"] if not rcpt.isascii() else []
        sent = send(mta, "amavis", [rcpt], options=options)
        assert sent.rcpts[rcpt][0] == 250 and sent.data[0] == 250, (rcpt, sent)
        [copy] = delivered_copies(mta, sent.token, 1).values()
        assert header(copy, "Subject") == ["[HOSTILE] test"], rcpt
        assert "tagged_above=-999" in header(copy, "X-Spam-Status")[0], rcpt
    assert mariadb.query("SELECT COUNT(*) FROM amavis.users") == users
