"""The `mariadb` fixture itself: a private MariaDB with the seed schema, on loopback only, that a
test can stop and start again. The SQL lookups' own tests build on these guarantees."""

from __future__ import annotations

import os
import socket
import time

import pymysql
import pytest

from tests.daemons import MAIL_ADMIN

MAIL_TABLES = {"domains", "forwardings", "users", "transport"}
AMAVIS_TABLES = {"users", "policy", "mailaddr", "wblist"}
POLICY_COLUMNS = [
    "id", "policy_name",
    "virus_lover", "spam_lover", "unchecked_lover", "banned_files_lover", "bad_header_lover",
    "bypass_virus_checks", "bypass_spam_checks", "bypass_banned_checks", "bypass_header_checks",
    "virus_quarantine_to", "spam_quarantine_to", "banned_quarantine_to", "unchecked_quarantine_to",
    "bad_header_quarantine_to", "clean_quarantine_to", "archive_quarantine_to",
    "spam_tag_level", "spam_tag2_level", "spam_tag3_level", "spam_kill_level",
    "spam_dsn_cutoff_level", "spam_quarantine_cutoff_level",
    "addr_extension_virus", "addr_extension_spam", "addr_extension_banned", "addr_extension_bad_header",
    "warnvirusrecip", "warnbannedrecip", "warnbadhrecip",
    "newvirus_admin", "virus_admin", "banned_admin", "bad_header_admin", "spam_admin",
    "spam_subject_tag", "spam_subject_tag2", "spam_subject_tag3",
    "message_size_limit", "banned_rulenames", "disclaimer_options", "forward_method",
    "sa_userconf", "sa_username",
]  # fmt: skip


def mail_admin(mariadb, database: str = "mail", timeout: int = 5):
    """A connection as the seed's read-only account over TCP, as milterd will connect."""
    user, password = MAIL_ADMIN
    return pymysql.connect(
        host=mariadb.host,
        port=mariadb.port,
        user=user,
        password=password,
        database=database,
        connect_timeout=timeout,
        read_timeout=timeout,
    )


def tables(mariadb, database: str) -> set[str]:
    return {name for (name,) in mariadb.query(f"SHOW TABLES FROM {database}")}


def test_seed_schema_exists(mariadb):
    assert tables(mariadb, "mail") == MAIL_TABLES
    assert tables(mariadb, "amavis") == AMAVIS_TABLES
    assert mariadb.query("SELECT domain FROM mail.domains ORDER BY domain") == [("example.com",), ("example.org",)]
    for table in AMAVIS_TABLES:
        assert mariadb.query(f"SELECT COUNT(*) FROM amavis.{table}") == [(0,)]
    columns = mariadb.query(
        "SELECT column_name, column_type, column_default FROM information_schema.columns"
        " WHERE table_schema = 'amavis' AND table_name = 'policy' ORDER BY ordinal_position"
    )
    assert [c[0] for c in columns] == POLICY_COLUMNS
    types = {name: (ctype, default) for name, ctype, default in columns}
    assert types["spam_lover"] == ("char(1)", "NULL")
    assert types["spam_kill_level"] == ("float", "NULL")
    assert types["message_size_limit"][0] == "int(11)"


def test_the_dsn_names_mail_admin_on_loopback(mariadb):
    assert mariadb.dsn == f"mysql+pymysql://mail_admin:mail_admin_password@127.0.0.1:{mariadb.port}/mail"
    assert mariadb.url("amavis").endswith(f"@127.0.0.1:{mariadb.port}/amavis")


def test_mail_admin_can_select_but_not_write(mariadb):
    with mail_admin(mariadb) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM domains WHERE domain = %s", ("example.com",))
        assert cur.fetchall() == ((1,),)
        for sql in ("INSERT INTO domains (domain) VALUES ('evil.test')", "DELETE FROM domains"):
            with pytest.raises(pymysql.err.OperationalError) as denied:
                cur.execute(sql)
            assert denied.value.args[0] == 1142  # ER_TABLEACCESS_DENIED_ERROR
    with mail_admin(mariadb, "amavis") as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM policy")
        with pytest.raises(pymysql.err.OperationalError):
            cur.execute("INSERT INTO policy (policy_name) VALUES ('x')")
    # The grant for 'localhost' covers the unix socket.
    with pymysql.connect(unix_socket=mariadb.socket, user=MAIL_ADMIN[0], password=MAIL_ADMIN[1]) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM mail.domains")
            assert cur.fetchone() == (2,)
    assert mariadb.query("SELECT domain FROM mail.domains WHERE domain = 'evil.test'") == []


def test_root_helpers_insert_rows_that_mail_admin_reads(mariadb):
    mariadb.execute(
        "INSERT INTO amavis.policy (policy_name, spam_lover, spam_kill_level) VALUES (%s, %s, %s)",
        ("fixture-test", "Y", 12.5),
    )
    try:
        with mail_admin(mariadb, "amavis") as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT spam_lover, spam_kill_level, virus_lover FROM policy WHERE policy_name = %s", ("fixture-test",)
            )
            assert cur.fetchall() == (("Y", 12.5, None),)
    finally:
        mariadb.execute("DELETE FROM amavis.policy WHERE policy_name = %s", ("fixture-test",))


def test_stop_makes_connections_fail_fast_and_start_brings_the_data_back(mariadb):
    mariadb.execute("INSERT INTO mail.forwardings (source, destination) VALUES (%s, %s)", ("a@example.com", "b@x.test"))
    port, old_pid = mariadb.port, mariadb.pid
    try:
        mariadb.stop()
        assert not mariadb.running
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as failed:
            mail_admin(mariadb, timeout=5)
        assert failed.value.args[0] == 2003  # can't connect: refused, not a timeout
        assert time.monotonic() - started < 1
    finally:
        mariadb.start()
    assert mariadb.running and mariadb.port == port and mariadb.pid != old_pid
    try:
        with mail_admin(mariadb) as conn, conn.cursor() as cur:
            cur.execute("SELECT destination FROM forwardings WHERE source = %s", ("a@example.com",))
            assert cur.fetchall() == (("b@x.test",),)
            cur.execute("SELECT COUNT(*) FROM domains")
            assert cur.fetchone() == (2,)
    finally:
        mariadb.execute("DELETE FROM mail.forwardings WHERE source = %s", ("a@example.com",))


def listening_sockets(pid: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets pid listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    found.append(fields[1])
    return found


def test_it_listens_on_loopback_only(mariadb):
    assert listening_sockets(mariadb.pid) == [f"0100007F:{mariadb.port:04X}"]
    assert mariadb.query("SELECT @@bind_address, @@skip_networking, @@port") == [("127.0.0.1", 0, mariadb.port)]
    # Root is reachable only through the unix socket: no root account for TCP clients.
    assert mariadb.query("SELECT host FROM mysql.user WHERE user = 'root'") == [("localhost",)]
    with socket.create_connection((mariadb.host, mariadb.port), timeout=5):
        pass
