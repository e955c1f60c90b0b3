"""milterd.sql.SqlLookups and milterd.lookups.PolicyLookups against a real MariaDB (the `mariadb`
fixture: the seed's `mail` database and amavis' lookup tables in `amavis`), no Postfix.

The seed's own `$sql_select_policy` and amavis' default queries, verbatim; hostile addresses as
bound parameters; the database stopped, frozen, or refusing the password; the cache; one pool
shared by many threads; `milterd check-config --show`; and the cost of a lookup.
tests/unit/test_lookups.py covers the same on sqlite.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from milterd.lookups import LookupFailed, PolicyLookups, Transaction
from milterd.rules import load_rules
from milterd.sql import SqlLookups, SqlSettings

MILTERD = str(Path(sys.executable).parent / "milterd")
PASSWORD = "mail_admin_password"

# The seed's $sql_select_policy, exactly as in its amavis configuration (double-quoted strings).
SEED = 'SELECT "Y" as local FROM domains WHERE CONCAT("@",domain) IN (%k)'
# amavis' defaults ($sql_select_policy, $sql_select_white_black_list), exactly as amavis ships them.
AMAVIS = (
    "SELECT *, users.id FROM users LEFT JOIN policy ON users.policy_id=policy.id"
    " WHERE users.email IN (%k) ORDER BY users.priority DESC"
)
WBLIST = (
    "SELECT wb FROM wblist JOIN mailaddr ON wblist.sid=mailaddr.id"
    " WHERE wblist.rid=? AND mailaddr.email IN (%k) ORDER BY mailaddr.priority DESC"
)

REMOTE = Transaction(mail_from="someone@remote.test", client_ip="192.0.2.1")
# policy.toml of these tests: no local_domains (SQL says who is local), levels to fall back on.
POLICY = """
recipient_delimiter = "+"
tag_level = 1.5
tag2_level = 4.5
kill_level = 5.5
[subject_tags]
spammy = "[SPAM] "
tagged = "[maybe] "
"""

HOSTILE_LOCAL_PARTS = [
    "o'brien",
    'a"b',
    "back\\slash",
    "50%_off",
    "under_score",
    "jörg",
    "x'; drop table domains; --",
    "%k",
    "?",
    "a) or (1=1",
    "x\\'; delete from users; --",
]


# ------------------------------------------------------------------------------------ helpers


def rules_dir(tmp_path: Path, policy: str = POLICY) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "policy.toml").write_text(policy)
    return directory


def chain(tmp_path: Path, dsn: str, policy: str = POLICY, **sql) -> PolicyLookups:
    settings = SqlSettings(dsn=dsn, **{"timeout": 2.0, **sql})
    return PolicyLookups(load_rules(rules_dir(tmp_path, policy)), ["127.0.0.0/8"], SqlLookups(settings, dsn))


class Amavis:
    """Rows in the `amavis` database, inserted as root; every row is deleted after the test."""

    def __init__(self, mariadb):
        self.db = mariadb
        self.inserted: list[tuple[str, int]] = []

    def _insert(self, table: str, values: dict) -> int:
        columns = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        with self.db.connect("amavis") as conn, conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))
            row_id = values.get("id") or cur.lastrowid
        self.inserted.append((table, row_id))
        return row_id

    def user(self, email: str, priority: int = 7, **policy) -> int:
        """A users row with a policy row of its own; users.id is policy.id + 1000, so a lookup
        that used the policy's id for the white/blacklist would find nothing."""
        policy_id = self._insert("policy", {"policy_name": f"test {email}"[:32], **policy})
        return self._insert(
            "users", {"id": policy_id + 1000, "priority": priority, "policy_id": policy_id, "email": email}
        )

    def sender(self, recipient_id: int, email: str, wb: str, priority: int = 7) -> None:
        sid = self._insert("mailaddr", {"priority": priority, "email": email})
        with self.db.connect("amavis") as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO wblist (rid, sid, wb) VALUES (%s, %s, %s)", (recipient_id, sid, wb))
        self.inserted.append(("wblist", sid))

    def clean(self) -> None:
        for table, row_id in reversed(self.inserted):
            column = "sid" if table == "wblist" else "id"
            self.db.execute(f"DELETE FROM amavis.{table} WHERE {column} = %s", (row_id,))


@pytest.fixture
def amavis(mariadb):
    rows = Amavis(mariadb)
    yield rows
    rows.clean()


@pytest.fixture
def domains(mariadb):
    """Domains a test adds to mail.domains, deleted after it."""
    added: list[str] = []

    def add(domain: str) -> None:
        mariadb.execute("INSERT INTO mail.domains (domain) VALUES (%s)", (domain,))
        added.append(domain)

    yield add
    for domain in added:
        mariadb.execute("DELETE FROM mail.domains WHERE domain = %s", (domain,))


def policy_of(lookups: PolicyLookups, address: str, sender: str = "someone@remote.test"):
    return lookups.recipient(address, Transaction(mail_from=sender, client_ip="192.0.2.1")).policy


def seed_tables(mariadb) -> dict:
    return {
        "mail": sorted(r[0] for r in mariadb.query("SHOW TABLES FROM mail")),
        "amavis": sorted(r[0] for r in mariadb.query("SHOW TABLES FROM amavis")),
        "domains": mariadb.query("SELECT domain FROM mail.domains ORDER BY domain"),
    }


# ------------------------------------------------------------------ 1. the seed's own query


def test_the_seed_query_verbatim_makes_the_domains_table_local_and_nothing_else(tmp_path, mariadb):
    assert mariadb.query("SELECT @@sql_mode NOT LIKE '%ANSI_QUOTES%'") == [(1,)]  # "Y" is a string here
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED)
    try:
        for address in ("joe@example.com", "user+ext@example.com", "JOE@Example.COM", "a@example.org"):
            policy = policy_of(lookups, address)
            assert (policy.local, policy.source) == (True, "sql"), address
            assert (policy.kill_level, policy.tag2_level) == (5.5, 4.5)  # no level columns: policy.toml
        for address in ("joe@example.net", "joe@sub.example.com", "example.com@remote.test", "joe@example.com.evil"):
            policy = policy_of(lookups, address)
            assert (policy.local, policy.source) == (False, "policy.toml"), address
        # %k is amavis' keys: the extension form, the user form and the domain forms all bound
        keys = lookups.keys("user+ext@example.com")
        assert keys[:2] == ["user+ext@example.com", "user@example.com"] and "@example.com" in keys
        assert lookups.sql.policy(keys) == {"local": "Y"}
    finally:
        lookups.close()


def test_a_percent_sign_or_colon_in_the_query_text_is_sql_not_a_parameter(tmp_path, mariadb):
    query = 'SELECT "Y" as local, "a:b%c" AS note FROM domains WHERE domain LIKE "%" AND CONCAT("@",domain) IN (%k)'
    lookups = chain(tmp_path, mariadb.dsn, select_policy=query)
    try:
        assert lookups.sql.policy(lookups.keys("a@example.com")) == {"local": "Y", "note": "a:b%c"}
        assert not policy_of(lookups, "a@example.net").local
    finally:
        lookups.close()


# ---------------------------------------------------------------- 2. amavis' default queries


def test_amavis_users_and_policy_priorities_nulls_flags_levels_and_tags(tmp_path, mariadb, amavis):
    amavis.user(
        "boss@example.com",
        priority=10,
        spam_kill_level=12.5,
        spam_tag2_level=9.25,
        spam_lover="Y",
        bypass_spam_checks="N",
        spam_subject_tag2="[BOSS-SPAM] ",
    )
    amavis.user("@example.com", priority=5, spam_kill_level=8.0, spam_lover="N", bypass_virus_checks="Y")
    amavis.user("@.", priority=0, spam_tag_level=-999.0, spam_subject_tag="[catch-all] ")
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS)
    try:
        # boss: its own row (priority 10) before @example.com's (5) and @.'s (0); NULLs fall through
        # to policy.toml, not to the lower-priority rows (amavis: the first row wins)
        boss = policy_of(lookups, "boss@example.com")
        assert (boss.kill_level, boss.tag2_level, boss.tag_level) == (12.5, 9.25, 1.5)
        assert (boss.spam_lover, boss.bypass_spam_checks, boss.bypass_virus_checks) == (True, False, False)
        assert (boss.subject_tags.spammy, boss.subject_tags.tagged) == ("[BOSS-SPAM] ", "[maybe] ")
        assert (boss.local, boss.source) == (True, "sql")
        # the delimiter: boss+news finds boss's row through the key boss@example.com
        assert policy_of(lookups, "Boss+News@Example.com") == boss
        # someone else in example.com: the @example.com row
        other = policy_of(lookups, "other@example.com")
        assert (other.kill_level, other.tag2_level, other.spam_lover, other.bypass_virus_checks) == (
            8.0,
            4.5,
            False,
            True,
        )
        assert (other.subject_tags.spammy, other.local) == ("[SPAM] ", True)
        # anyone else: @. (a matching row makes the recipient local, as amavis)
        anyone = policy_of(lookups, "x@remote.test")
        assert (anyone.tag_level, anyone.kill_level, anyone.subject_tags.tagged, anyone.local) == (
            -999.0,
            5.5,
            "[catch-all] ",
            True,
        )
        # VARBINARY emails come back as bytes, the levels as floats, the flags as strings
        row = lookups.sql.policy(lookups.keys("boss@example.com"))
        assert row["email"] == b"boss@example.com" and isinstance(row["spam_kill_level"], float)
        assert row["spam_lover"] == "Y" and row["virus_lover"] is None
    finally:
        lookups.close()


def test_a_priority_decides_even_when_the_domain_row_is_the_more_specific_in_key_order(tmp_path, mariadb, amavis):
    """amavis orders by users.priority in the query, not by key order: the row the query returns first wins."""
    amavis.user("ann@example.org", priority=1, spam_kill_level=3.0)
    amavis.user("@example.org", priority=9, spam_kill_level=30.0)
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS)
    try:
        assert policy_of(lookups, "ann@example.org").kill_level == 30.0
    finally:
        lookups.close()


def test_a_user_without_a_policy_row_is_local_with_every_setting_from_the_rules(tmp_path, mariadb, amavis):
    """LEFT JOIN: policy's columns all NULL (policy.id too); `users.id` at the end still gives the id."""
    policy_id = amavis._insert("policy", {"policy_name": "no user points here"})
    amavis._insert("users", {"id": 4242, "priority": 7, "policy_id": policy_id + 999_999, "email": "lone@example.net"})
    amavis.sender(4242, "friend@remote.test", "W")
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS, select_white_black_list=WBLIST)
    try:
        row = lookups.sql.policy(lookups.keys("lone@example.net"))
        assert row["id"] == 4242 and row["spam_kill_level"] is None
        lone = policy_of(lookups, "lone@example.net", sender="friend@remote.test")
        assert (lone.local, lone.kill_level, lone.source, lone.sender_list) == (True, 5.5, "sql", "W")
    finally:
        lookups.close()


def test_amavis_wblist_white_black_and_soft_by_the_users_id(tmp_path, mariadb, amavis):
    joe = amavis.user("joe@example.com", spam_kill_level=7.0)
    ann = amavis.user("ann@example.com")
    amavis.sender(joe, "friend@remote.test", "W", priority=10)
    amavis.sender(joe, "@remote.test", "B", priority=5)  # the domain, below the friend
    amavis.sender(joe, "@.bulk.test", "3.5", priority=1)
    amavis.sender(joe, "@.nice.test", "-2", priority=1)
    amavis.sender(ann, "@spam.test", "B")
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS, select_white_black_list=WBLIST, cache_ttl=0)
    try:

        def listed(rcpt: str, sender: str):
            policy = policy_of(lookups, rcpt, sender=sender)
            return policy.sender_list, policy.sender_score

        assert listed("joe@example.com", "Friend@Remote.TEST") == ("W", 0.0)
        assert listed("joe+list@example.com", "friend@remote.test") == ("W", 0.0)
        assert listed("joe@example.com", "stranger@remote.test") == ("B", 0.0)
        assert listed("joe@example.com", "news@mail.bulk.test") == ("", 3.5)
        assert listed("joe@example.com", "x@nice.test") == ("", -2.0)
        assert listed("joe@example.com", "nobody@else.test") == ("", 0.0)
        assert listed("joe@example.com", "") == ("", 0.0)  # the null sender
        # lists are per recipient (wblist.rid = users.id)
        assert listed("ann@example.com", "x@spam.test") == ("B", 0.0)
        assert listed("joe@example.com", "x@spam.test") == ("", 0.0)
        assert listed("ann@example.com", "friend@remote.test") == ("", 0.0)
        # straight from SqlLookups: ? is the users.id (policy.id + 1000 here)
        row = lookups.sql.policy(lookups.keys("joe@example.com"))
        assert row["id"] == joe and row["policy_id"] == joe - 1000
        assert lookups.sql.white_black(joe, lookups.keys("friend@remote.test")) == "W"
        assert lookups.sql.white_black(joe - 1000, lookups.keys("friend@remote.test")) is None
    finally:
        lookups.close()


# ------------------------------------------------------------------------- 3. hostile keys


def quoted(local_part: str) -> str:
    """The local part as RFC 5321 sends it when it needs quoting: "a\\"b" for a"b."""
    return '"' + local_part.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize("local_part", HOSTILE_LOCAL_PARTS)
def test_hostile_addresses_are_bound_parameters_and_found_by_their_exact_key(tmp_path, mariadb, amavis, local_part):
    """The key of "x'; drop table domains; --"@example.com is x'; drop table domains; --@example.com
    (amavis unquotes the local part): a row with exactly that email is found, nothing else is."""
    before = seed_tables(mariadb)
    key = f"{local_part}@example.com"
    address = f"{quoted(local_part)}@example.com"
    uid = amavis.user(key, spam_kill_level=42.0, spam_subject_tag2=f"[{local_part}] ")
    amavis.sender(uid, f"{local_part}@remote.test", "B")
    # a decoy the wildcards in the local part would match: LIKE-style matching would mix them up
    decoy = local_part.replace("%", "x").replace("_", "y") + "@example.com"
    if decoy != key:
        amavis.user(decoy, spam_kill_level=1.0)

    seed = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0)
    users = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS, select_white_black_list=WBLIST, cache_ttl=0)
    try:
        assert users.keys(address)[0] == key
        for hostile in (key, address, f"{quoted(local_part + '+ext')}@example.com", f"{local_part}@example.net"):
            policy = policy_of(seed, hostile, sender=hostile)
            assert policy.local == hostile.endswith("@example.com"), hostile
            policy_of(users, hostile, sender=hostile)  # unquoted, as an attacker may send it: no error
        found = policy_of(users, address, sender=f"{quoted(local_part)}@remote.test")
        assert (found.kill_level, found.subject_tags.spammy, found.source) == (42.0, f"[{local_part}] ", "sql")
        assert found.sender_list == "B"
        assert policy_of(users, f"{quoted(local_part + '+ext')}@example.com").kill_level == 42.0
        assert policy_of(users, address, sender="someone@remote.test").sender_list == ""
        # nearly the same address is not the same key
        near = policy_of(users, f"{quoted(local_part + 'x')}@example.com")
        assert (near.kill_level, near.source) == (5.5, "policy.toml")
        if decoy != key:
            assert policy_of(users, decoy).kill_level == 1.0
    finally:
        seed.close()
        users.close()
    assert seed_tables(mariadb) == before


def test_octets_that_are_not_utf8_answer_by_the_other_keys_without_an_error(tmp_path, mariadb, amavis):
    """pymilter decodes envelope addresses with surrogateescape: b"j\\xf6rg" (Latin-1) arrives as
    "j\\udcf6rg", which no driver can encode. That key matches nothing; the domain's keys still answer."""
    amavis.user(b"j\xf6rg@example.com", spam_kill_level=33.0)
    amavis.user("@example.com", spam_kill_level=11.0)
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS, select_white_black_list=WBLIST, cache_ttl=0)
    seed = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0)
    try:
        latin1 = b"j\xf6rg@example.com".decode("utf-8", "surrogateescape")
        sender = b"m\xfcller@remote.test".decode("utf-8", "surrogateescape")
        found = policy_of(lookups, latin1, sender=sender)
        assert (found.kill_level, found.source, found.local) == (11.0, "sql", True)
        assert policy_of(seed, latin1, sender=sender).local
        assert not policy_of(seed, "a@ex\udce4mple.com", sender="\ud800@x.test").local
        assert policy_of(lookups, "jörg@example.com").kill_level == 11.0  # UTF-8 ö: other octets
    finally:
        lookups.close()
        seed.close()


def test_hostile_text_everywhere_at_once_leaves_the_database_intact(tmp_path, mariadb):
    before = seed_tables(mariadb)
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0)
    try:
        for local_part in HOSTILE_LOCAL_PARTS:
            for domain in ("example.com", "exämple.com", "example.com'; --", "%", "_"):
                policy_of(lookups, f"{local_part}@{domain}", sender=f"{local_part}@{domain}")
        policy_of(lookups, "@")
        policy_of(lookups, "")
    finally:
        lookups.close()
    assert seed_tables(mariadb) == before
    assert mariadb.query("SELECT COUNT(*) FROM mail.domains") == [(2,)]


# ---------------------------------------------------------------------- 4. failure paths


def test_a_stopped_database_is_a_quick_lookup_failure_without_the_password_and_comes_back(tmp_path, mariadb):
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0, timeout=2.0)
    try:
        assert policy_of(lookups, "a@example.com").local  # a connection now sits in the pool
        mariadb.stop()
        try:
            started = time.monotonic()
            with pytest.raises(LookupFailed) as failure:
                policy_of(lookups, "a@example.com")
            elapsed = time.monotonic() - started
            text = str(failure.value)
            assert elapsed < 2.0, f"{elapsed:.2f} s"
            assert "select_policy" in text, text
            assert f"mysql+pymysql://mail_admin:***@127.0.0.1:{mariadb.port}/mail" in text, text
            assert PASSWORD not in text and PASSWORD not in repr(failure.value)
            assert failure.value.__cause__ is None and failure.value.__suppress_context__
        finally:
            mariadb.start()
        # the same PolicyLookups answers again: the dead connections are replaced
        assert policy_of(lookups, "a@example.com").local
        assert not policy_of(lookups, "a@example.net").local
    finally:
        lookups.close()


def test_a_restart_between_lookups_is_not_noticed(tmp_path, mariadb):
    """pool_pre_ping: a pooled connection the server dropped is replaced, not failed."""
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0)
    try:
        assert policy_of(lookups, "a@example.com").local
        pooled = lookups.sql.engine.pool.checkedin()
        assert pooled >= 1
        mariadb.stop()
        mariadb.start()
        assert policy_of(lookups, "a@example.com").local
        assert not policy_of(lookups, "a@example.net").local
    finally:
        if not mariadb.running:
            mariadb.start()
        lookups.close()


def test_a_frozen_database_fails_within_the_timeout(tmp_path, mariadb):
    """The server accepts TCP but never answers (SIGSTOP): the [sql] timeout bounds the lookup.
    With a pooled connection: its ping (read timeout), then a new connection (connect timeout)."""
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0, timeout=1.0)
    try:
        assert policy_of(lookups, "a@example.com").local
        os.kill(mariadb.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(LookupFailed) as failure:
                policy_of(lookups, "a@example.com")
            elapsed = time.monotonic() - started
        finally:
            os.kill(mariadb.pid, signal.SIGCONT)
        print(f"\nfrozen MariaDB, timeout = 1 s: LookupFailed after {elapsed:.2f} s: {failure.value}")
        assert PASSWORD not in str(failure.value) and "select_policy" in str(failure.value)
        assert elapsed < 2 * 1.0 + 1.0, f"{elapsed:.2f} s"  # connect + one read, at most, with slack
        assert policy_of(lookups, "a@example.com").local
    finally:
        lookups.close()


def test_a_wrong_password_is_a_lookup_failure_that_does_not_show_it(tmp_path, mariadb):
    wrong = "Wr0ngPassw0rd-s3cr3t"
    dsn = mariadb.url("mail", password=wrong)
    lookups = chain(tmp_path, dsn, select_policy=SEED)
    try:
        with pytest.raises(LookupFailed) as failure:
            policy_of(lookups, "a@example.com")
        text = str(failure.value)
        assert wrong not in text and PASSWORD not in text, text
        assert "***" in text and "select_policy" in text and "1045" in text, text  # ER_ACCESS_DENIED_ERROR
    finally:
        lookups.close()


def test_an_sql_error_in_select_policy_is_a_lookup_failure(tmp_path, mariadb):
    for query, code in (
        ("SELECT local FROM domains WHERE domain IN (%k) AND", "1064"),  # syntax
        ("SELECT local FROM no_such_table WHERE domain IN (%k)", "1146"),  # no table
        ("SELECT no_such_column FROM domains WHERE domain IN (%k)", "1054"),  # no column
    ):
        lookups = chain(tmp_path, mariadb.dsn, select_policy=query)
        try:
            with pytest.raises(LookupFailed) as failure:
                policy_of(lookups, "a@example.com")
            text = str(failure.value)
            assert "select_policy" in text and code in text and PASSWORD not in text, text
        finally:
            lookups.close()


def test_an_sql_error_in_the_white_black_list_is_a_lookup_failure(tmp_path, mariadb, amavis):
    amavis.user("joe@example.com")
    broken = "SELECT wb FROM wblist WHERE rid=? AND nope IN (%k)"
    lookups = chain(tmp_path, mariadb.url("amavis"), select_policy=AMAVIS, select_white_black_list=broken)
    try:
        with pytest.raises(LookupFailed, match="select_white_black_list") as failure:
            policy_of(lookups, "joe@example.com")
        assert PASSWORD not in str(failure.value)
    finally:
        lookups.close()


# -------------------------------------------------------------------------------- 5. cache


def test_answers_are_reused_within_cache_ttl_and_refreshed_after_it(tmp_path, mariadb, domains):
    ttl = 1.5
    lookups = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=ttl)
    try:
        asked = time.monotonic()
        assert not policy_of(lookups, "a@new.example").local
        domains("new.example")
        assert not policy_of(lookups, "a@new.example").local  # the cached "no row"
        assert policy_of(lookups, "b@new.example").local  # other keys: asked now
        assert time.monotonic() - asked < ttl, "too slow to test the cache"
        time.sleep(ttl + 0.2)
        assert policy_of(lookups, "a@new.example").local
    finally:
        lookups.close()


def test_a_positive_answer_is_kept_too_and_cache_ttl_0_asks_every_time(tmp_path, mariadb, domains):
    domains("gone.example")
    cached = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=60)
    uncached = chain(tmp_path, mariadb.dsn, select_policy=SEED, cache_ttl=0)
    try:
        assert policy_of(cached, "a@gone.example").local and policy_of(uncached, "a@gone.example").local
        mariadb.execute("DELETE FROM mail.domains WHERE domain = %s", ("gone.example",))
        assert policy_of(cached, "a@gone.example").local
        assert not policy_of(uncached, "a@gone.example").local
        domains("fresh.example")
        assert policy_of(uncached, "a@fresh.example").local
        mariadb.execute("DELETE FROM mail.domains WHERE domain = %s", ("fresh.example",))
        assert not policy_of(uncached, "a@fresh.example").local
    finally:
        cached.close()
        uncached.close()


# -------------------------------------------------------------------------- 6. concurrency


def test_32_threads_through_one_pool_of_4_all_get_their_own_answers(tmp_path, mariadb, amavis):
    users = {f"user{i}@example.com": float(10 + i) for i in range(32)}
    for email, level in users.items():
        amavis.user(email, spam_kill_level=level)
    lookups = chain(
        tmp_path,
        mariadb.url("amavis"),
        select_policy=AMAVIS,
        select_white_black_list=WBLIST,
        cache_ttl=0,
        pool_size=4,
        timeout=5.0,
    )
    barrier = threading.Barrier(len(users))
    answers: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def work(email: str) -> None:
        try:
            barrier.wait(10)
            answers[email] = [policy_of(lookups, email).kill_level for _ in range(10)]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(email,)) for email in users]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert answers == {email: [level] * 10 for email, level in users.items()}
        pool = lookups.sql.engine.pool
        assert pool.size() == 4 and pool.checkedout() == 0
        assert pool.checkedin() <= 4 + 4  # pool_size plus as many more under load, at most
    finally:
        lookups.close()


# ----------------------------------------------------------------- 7. check-config --show


def config_dir(tmp_path: Path, sql: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "policy.toml").write_text('local_domains = ["example.com"]\nrecipient_delimiter = "+"\n')
    path = tmp_path / "milterd.toml"
    path.write_text(f"[milter]\n[dkim]\nenabled = false\n[spf]\nenabled = false\n[dmarc]\nenabled = false\n{sql}")
    return path


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MILTERD, "check-config", "--show", "--config", str(path)], capture_output=True, text=True, timeout=60
    )


def toml_string(text: str) -> str:
    return "'" + text + "'"


def test_check_config_show_names_every_column_of_select_policy_and_hides_the_password(tmp_path, mariadb, amavis):
    amavis.user("@example.com", spam_kill_level=9.0, spam_lover="Y")
    path = config_dir(
        tmp_path,
        f"[sql]\ndsn = {toml_string(mariadb.url('amavis'))}\nselect_policy = {toml_string(AMAVIS)}\n"
        f"select_white_black_list = {toml_string(WBLIST)}\n",
    )
    result = check_config(path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert PASSWORD not in out
    assert f"mysql+pymysql://mail_admin:***@127.0.0.1:{mariadb.port}/amavis" in out
    columns = [r[0] for r in mariadb.query("SHOW COLUMNS FROM amavis.users")]
    columns += [r[0] for r in mariadb.query("SHOW COLUMNS FROM amavis.policy")]
    known = {
        "local": "sets local",
        "id": "sets the recipient's id",
        "spam_tag_level": "sets tag_level",
        "spam_tag2_level": "sets tag2_level",
        "spam_kill_level": "sets kill_level",
        "spam_dsn_cutoff_level": "sets dsn_cutoff_level",
        "spam_quarantine_cutoff_level": "sets quarantine_cutoff_level",
        "spam_subject_tag": "sets subject_tags.tagged",
        "spam_subject_tag2": "sets subject_tags.spammy",
        **{
            f"{kind}_lover": f"sets {kind}_lover"
            for kind in ("virus", "spam", "banned_files", "bad_header", "unchecked")
        },
        **{f"bypass_{kind}_checks": f"sets bypass_{kind}_checks" for kind in ("virus", "spam", "banned", "header")},
    }
    for column in columns:
        line = next((line for line in out.splitlines() if line.startswith(f"#   {column}: ")), None)
        assert line is not None, f"{column} not named:\n{out}"
        assert known.get(column, "unknown to milterd: ignored") in line, line
    for ignored in ("policy_name", "priority", "email", "fullname", "spam_tag3_level", "message_size_limit"):
        assert f"#   {ignored}: unknown to milterd: ignored" in out
    assert "select_white_black_list: runs" in out
    assert '"spam_kill_level": "9.0"' in out  # postmaster@example.com's row, through @example.com


def test_check_config_show_with_the_seed_query(tmp_path, mariadb):
    path = config_dir(tmp_path, f"[sql]\ndsn = {toml_string(mariadb.dsn)}\nselect_policy = {toml_string(SEED)}\n")
    result = check_config(path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "#   local: sets local" in out and '"local": "Y"' in out
    assert PASSWORD not in out


def test_check_config_show_with_the_database_down_says_so_without_the_password(tmp_path, mariadb):
    path = config_dir(
        tmp_path, f"[sql]\ndsn = {toml_string(mariadb.dsn)}\nselect_policy = {toml_string(SEED)}\ntimeout = 2\n"
    )
    mariadb.stop()
    try:
        result = check_config(path)
    finally:
        mariadb.start()
    out = result.stdout + result.stderr
    print(f"\ncheck-config --show, MariaDB stopped: exit {result.returncode}: {out.splitlines()[-1]}")
    assert "FAILED" in out and "select_policy" in out, out
    assert PASSWORD not in out


@pytest.mark.parametrize("mode", [0o644, 0o604])
def test_a_dsn_file_others_can_read_is_refused(tmp_path, mariadb, mode):
    dsn_file = tmp_path / "sql.dsn"
    dsn_file.write_text(mariadb.dsn + "\n")
    dsn_file.chmod(mode)
    path = config_dir(tmp_path, f'[sql]\ndsn_file = "sql.dsn"\nselect_policy = {toml_string(SEED)}\n')
    result = check_config(path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert str(dsn_file) in out and "chmod 600" in out, out
    assert PASSWORD not in out


def test_a_dsn_file_of_mode_0600_works_and_its_password_is_never_shown(tmp_path, mariadb):
    dsn_file = tmp_path / "sql.dsn"
    dsn_file.write_text(mariadb.dsn + "\n")
    dsn_file.chmod(0o600)
    path = config_dir(tmp_path, f'[sql]\ndsn_file = "sql.dsn"\nselect_policy = {toml_string(SEED)}\n')
    result = check_config(path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert '"local": "Y"' in out and f"127.0.0.1:{mariadb.port}/mail" in out, out
    assert PASSWORD not in out


# ------------------------------------------------------------------------------ 8. the cost


def per_lookup_us(lookups: PolicyLookups, addresses: list[str], rounds: int) -> float:
    """Median over rounds of the mean time per recipient lookup, in microseconds."""
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for address in addresses:
            lookups.recipient(address, REMOTE)
        means.append((time.perf_counter() - started) / len(addresses) * 1e6)
    return statistics.median(means)


def test_the_cost_of_a_lookup_per_recipient(tmp_path, mariadb, amavis):
    for i in range(50):
        amavis.user(f"user{i}@example.com", spam_kill_level=float(i))
    amavis.user("@example.com", spam_kill_level=7.0)
    addresses = [f"user{i % 50}@example.com" if i % 2 else f"nobody{i}@example.com" for i in range(500)]
    results = {}
    for name, query, wblist in (
        ("seed select_policy", SEED, ""),
        ("amavis select_policy", AMAVIS, ""),
        ("amavis select_policy + wblist", AMAVIS, WBLIST),
    ):
        dsn = mariadb.dsn if query == SEED else mariadb.url("amavis")
        cold = chain(tmp_path, dsn, select_policy=query, select_white_black_list=wblist, cache_ttl=0)
        warm = chain(tmp_path, dsn, select_policy=query, select_white_black_list=wblist, cache_ttl=600)
        try:
            per_lookup_us(cold, addresses[:20], 1)  # connections opened
            per_lookup_us(warm, addresses, 1)  # every answer cached
            results[name] = (per_lookup_us(cold, addresses, 3), per_lookup_us(warm, addresses, 3))
        finally:
            cold.close()
            warm.close()
    print("\nlookup cost per recipient (500 lookups, median of 3 runs), PolicyLookups.recipient:")
    for name, (cold_us, warm_us) in results.items():
        print(f"  {name:32} cold (cache_ttl=0) {cold_us:8.1f} us   warm (cached) {warm_us:6.1f} us")
    for cold_us, warm_us in results.values():
        assert cold_us < 20_000 and warm_us < 500
