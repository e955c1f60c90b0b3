"""Per-recipient policy: amavis' lookup keys, %k as bound parameters, the chain SQL -> rules maps ->
banks over policy.toml -> built-in defaults, and sender white/blacklists. SQL runs on sqlite here;
tests/integration/test_sql_lookups.py runs the same against a real MariaDB."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from milterd.lookups import LookupFailed, PolicyLookups, Transaction, lookup_keys
from milterd.policy import Category, Destiny, decide
from milterd.rules import load_rules
from milterd.sql import SqlLookups, SqlSettings, bind
from milterd.tomlschema import ConfigError

pytestmark = pytest.mark.unit

HOSTILE = [
    "o'brien@example.com",
    'a"b@example.com',
    "back\\slash@example.com",
    "50%_off@example.com",
    "jörg@exämple.com",
    "x'; DROP TABLE domains; --@example.com",
    "@",
    "%k@example.com",
    "?@example.com",
]


def test_lookup_keys_are_amavis_order_most_specific_first():
    assert lookup_keys("User+Ext@Sub.Example.COM", "+") == [
        "user+ext@sub.example.com",
        "user@sub.example.com",
        "user+ext",
        "user",
        "@sub.example.com",
        "@.sub.example.com",
        "@.example.com",
        "@.com",
        "@.",
    ]


def test_bare_local_parts_are_keys_for_local_domains_only_and_case_can_be_kept():
    assert lookup_keys("Joe@Remote.Test", local=False) == [
        "joe@remote.test",
        "@remote.test",
        "@.remote.test",
        "@.test",
        "@.",
    ]
    assert lookup_keys("Joe@Example.com", case_sensitive=True)[:2] == ["Joe@example.com", "Joe"]


def test_without_a_delimiter_the_extension_stays_and_a_leading_delimiter_is_not_one():
    assert lookup_keys("a+b@x.test", "")[:2] == ["a+b@x.test", "a+b"]
    assert lookup_keys("+b@x.test", "+")[:2] == ["+b@x.test", "+b"]
    assert lookup_keys("a-b+c@x.test", "+-")[:3] == ["a-b+c@x.test", "a@x.test", "a-b+c"]


def test_the_null_sender_has_its_own_keys():
    assert lookup_keys("") == ["", "@."]
    assert lookup_keys("<>") == ["", "@."]


def test_percent_k_becomes_one_bound_parameter_per_key_and_nothing_else_is_a_parameter():
    sql, names = bind("SELECT \"Y\" as local FROM d WHERE CONCAT('@:x?', domain) IN (%k) AND id = ? AND t > :now", 3)
    assert names == ["k0", "k1", "k2"]
    assert (
        sql
        == "SELECT \"Y\" as local FROM d WHERE CONCAT('@\\:x?', domain) IN (:k0, :k1, :k2) AND id = :rid AND t > \\:now"
    )


# ------------------------------------------------------------------------------ on a database


@pytest.fixture
def database(tmp_path) -> Path:
    path = tmp_path / "mail.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE domains (domain TEXT PRIMARY KEY);
            INSERT INTO domains VALUES ('example.com');
            CREATE TABLE users (id INTEGER PRIMARY KEY, priority INTEGER, policy_id INTEGER, email TEXT);
            CREATE TABLE policy (id INTEGER PRIMARY KEY, spam_kill_level REAL, spam_tag2_level REAL,
                                 spam_lover CHAR(1), bypass_spam_checks CHAR(1), spam_subject_tag2 TEXT);
            CREATE TABLE mailaddr (id INTEGER PRIMARY KEY, priority INTEGER, email TEXT);
            CREATE TABLE wblist (rid INTEGER, sid INTEGER, wb TEXT);
            """
        )
    return path


def settings(database: Path, **more) -> SqlSettings:
    return SqlSettings(dsn=f"sqlite:///{database}", **more)


SEED = "SELECT 'Y' AS local FROM domains WHERE '@' || domain IN (%k)"
AMAVIS = (
    "SELECT users.*, policy.*, users.id FROM users LEFT JOIN policy ON users.policy_id=policy.id"
    " WHERE users.email IN (%k) ORDER BY users.priority DESC"
)
WBLIST = (
    "SELECT wb FROM wblist JOIN mailaddr ON wblist.sid=mailaddr.id"
    " WHERE wblist.rid=? AND mailaddr.email IN (%k) ORDER BY mailaddr.priority DESC"
)


def rules_dir(tmp_path: Path, policy: str = "", **files: str) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "policy.toml").write_text(policy)
    for name, text in files.items():
        (directory / f"{name}.toml").write_text(text)
    return directory


def chain(tmp_path, sql: SqlSettings | None = None, policy: str = "", **files) -> PolicyLookups:
    rules = load_rules(rules_dir(tmp_path, policy, **files))
    return PolicyLookups(rules, ["127.0.0.0/8"], SqlLookups(sql, sql.dsn) if sql else None)


REMOTE = Transaction(mail_from="someone@remote.test", client_ip="192.0.2.1")


def test_the_seed_servers_query_makes_its_domains_local_and_nothing_else(tmp_path, database):
    lookups = chain(tmp_path, settings(database, select_policy=SEED))
    joe = lookups.recipient("joe+news@example.com", REMOTE)
    assert (joe.policy.local, joe.policy.source) == (True, "sql")
    stranger = lookups.recipient("joe@example.net", REMOTE)
    assert (stranger.policy.local, stranger.policy.source) == (False, "built-in")
    assert joe.policy.kill_level == stranger.policy.kill_level == 6.31  # no policy columns: the defaults


def test_a_domain_added_to_the_database_is_local_once_the_cache_has_expired(tmp_path, database):
    lookups = chain(tmp_path, settings(database, select_policy=SEED, cache_ttl=0))
    assert not lookups.recipient("a@new.example", REMOTE).policy.local
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO domains VALUES ('new.example')")
    assert lookups.recipient("a@new.example", REMOTE).policy.local


def test_answers_are_kept_for_cache_ttl(tmp_path, database):
    lookups = chain(tmp_path, settings(database, select_policy=SEED, cache_ttl=60))
    assert not lookups.recipient("a@new.example", REMOTE).policy.local
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO domains VALUES ('new.example')")
    assert not lookups.recipient("a@new.example", REMOTE).policy.local


@pytest.mark.parametrize("address", HOSTILE)
def test_hostile_addresses_are_bound_parameters_never_sql(tmp_path, database, address):
    lookups = chain(tmp_path, settings(database, select_policy=SEED, select_white_black_list=WBLIST))
    lookups.recipient(address, Transaction(mail_from=address))
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT domain FROM domains").fetchall() == [("example.com",)]


def amavis_user(database: Path, email: str, uid: int, **policy) -> None:
    """A users row with its own policy row; `local` goes to users (amavis' optional users.local)."""
    local = policy.pop("local", "absent")
    with sqlite3.connect(database) as db:
        columns = ", ".join(["id", *policy])
        db.execute(
            f"INSERT INTO policy ({columns}) VALUES ({', '.join('?' * (len(policy) + 1))})", (uid, *policy.values())
        )
        db.execute("INSERT INTO users (id, priority, policy_id, email) VALUES (?, 0, ?, ?)", (uid, uid, email))
        if local != "absent":
            if "local" not in [column[1] for column in db.execute("PRAGMA table_info(users)")]:
                db.execute("ALTER TABLE users ADD COLUMN local CHAR(1)")
            db.execute("UPDATE users SET local = ? WHERE id = ?", (local, uid))


def test_the_first_row_wins_null_falls_through_and_a_row_without_local_is_local(tmp_path, database):
    amavis_user(database, "boss@example.com", 1, spam_kill_level=12.0, spam_lover="Y")
    amavis_user(database, "@example.com", 2, spam_kill_level=8.0, spam_tag2_level=5.0)
    with sqlite3.connect(database) as db:
        db.execute("UPDATE users SET priority = 7 WHERE id = 1")
    lookups = chain(tmp_path, settings(database, select_policy=AMAVIS), policy="tag2_level = 4.5\n")
    boss = lookups.recipient("boss@example.com", REMOTE).policy
    assert (boss.kill_level, boss.spam_lover, boss.tag2_level, boss.local) == (12.0, True, 4.5, True)
    other = lookups.recipient("other@example.com", REMOTE).policy
    assert (other.kill_level, other.spam_lover, other.tag2_level) == (8.0, False, 5.0)


def test_a_null_local_falls_through_to_local_domains(tmp_path, database):
    amavis_user(database, "@example.org", 3, local=None, spam_kill_level=9.0)
    lookups = chain(tmp_path, settings(database, select_policy=AMAVIS), policy='local_domains = ["example.org"]\n')
    assert lookups.recipient("x@example.org", REMOTE).policy.local
    amavis_user(database, "@example.net", 4, local="N")
    assert not chain(tmp_path, settings(database, select_policy=AMAVIS)).recipient("x@example.net", REMOTE).policy.local


def test_sql_wblist_white_black_and_soft_by_the_recipients_id(tmp_path, database):
    amavis_user(database, "joe@example.com", 5)
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO mailaddr VALUES (?, ?, ?)",
            [(1, 5, "friend@remote.test"), (2, 3, "@spam.test"), (3, 1, "@.bulk.test")],
        )
        db.executemany("INSERT INTO wblist VALUES (5, ?, ?)", [(1, "W"), (2, "B"), (3, "2.5")])
    lookups = chain(tmp_path, settings(database, select_policy=AMAVIS, select_white_black_list=WBLIST))

    def listed(sender: str):
        policy = lookups.recipient("joe@example.com", Transaction(mail_from=sender)).policy
        return policy.sender_list, policy.sender_score

    assert listed("Friend@REMOTE.test") == ("W", 0.0)
    assert listed("x@spam.test") == ("B", 0.0)
    assert listed("news@mail.bulk.test") == ("", 2.5)
    assert listed("nobody@else.test") == ("", 0.0)


def test_a_database_that_cannot_answer_is_a_lookup_failure_without_the_password(tmp_path):
    lookups = chain(
        tmp_path, SqlSettings(dsn="mysql+pymysql://u:s3cr3t@127.0.0.1:1/mail", select_policy=SEED, timeout=1)
    )
    with pytest.raises(LookupFailed) as failure:
        lookups.recipient("a@example.com", REMOTE)
    assert "s3cr3t" not in str(failure.value) and "select_policy" in str(failure.value)
    assert "mysql+pymysql://u:***@127.0.0.1:1/mail" in str(failure.value)


def test_a_bad_query_is_a_lookup_failure(tmp_path, database):
    lookups = chain(tmp_path, settings(database, select_policy="SELECT nothing FROM nowhere WHERE x IN (%k)"))
    with pytest.raises(LookupFailed, match="select_policy"):
        lookups.recipient("a@example.com", REMOTE)


# -------------------------------------------------------------------------------- rules maps


def test_recipients_toml_sets_per_recipient_values_by_lookup_key_under_sql(tmp_path, database):
    amavis_user(database, "joe@example.com", 6, spam_kill_level=15.0)
    recipients = (
        '["joe@example.com"]\nspam_kill_level = 3.0\nspam_tag2_level = 2.5\n'
        '["@example.com"]\nbypass_spam_checks = true\n'
    )
    lookups = chain(tmp_path, settings(database, select_policy=AMAVIS), recipients=recipients)
    joe = lookups.recipient("joe@example.com", REMOTE).policy
    assert (joe.kill_level, joe.tag2_level, joe.bypass_spam_checks, joe.source) == (15.0, 2.5, True, "sql")
    ann = chain(tmp_path, recipients=recipients).recipient("ann@example.com", REMOTE).policy
    assert (ann.bypass_spam_checks, ann.kill_level, ann.source) == (True, 6.31, "recipients.toml")


def test_recipients_toml_mistakes_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"recipients.toml: unknown key joe@x.test.spam_kil_level"):
        chain(tmp_path, recipients='["joe@x.test"]\nspam_kil_level = 3\n')
    with pytest.raises(ConfigError, match=r"recipients.toml: joe@x.test.spam_lover has the wrong type"):
        chain(tmp_path, recipients='["joe@x.test"]\nspam_lover = "Y"\n')


def test_senders_toml_per_recipient_first_then_global(tmp_path):
    senders = (
        'whitelist = ["@partner.test"]\nblacklist = ["@spam.test"]\n[score]\n"@bulk.test" = -1.5\n'
        '[recipient."joe@example.com"]\nblacklist = ["@partner.test"]\n'
    )
    lookups = chain(tmp_path, senders=senders)

    def listed(rcpt: str, sender: str):
        policy = lookups.recipient(rcpt, Transaction(mail_from=sender)).policy
        return policy.sender_list, policy.sender_score

    assert listed("ann@example.com", "a@partner.test") == ("W", 0.0)
    assert listed("joe@example.com", "a@partner.test") == ("B", 0.0)
    assert listed("ann@example.com", "x@spam.test") == ("B", 0.0)
    assert listed("ann@example.com", "x@bulk.test") == ("", -1.5)


# -------------------------------------------------------------------------------- policy banks

BANKS = """
local_domains = ["example.com"]
kill_level = 6.0
[[bank]]
name = "SUBMISSION"
daemon_name = "submission"
kill_level = 20.0
[bank.destiny]
spam = "REJECT"
[[bank]]
name = "PARTNERS"
client_networks = ["198.51.100.0/24"]
tag_level = -999
"""


def test_banks_match_daemon_name_originating_and_client_networks_and_override_policy_toml(tmp_path):
    lookups = chain(tmp_path, policy=BANKS)
    plain = lookups.recipient("a@example.com", REMOTE)
    assert (plain.policy.bank, plain.policy.kill_level, plain.originating) == ("", 6.0, False)
    submission = lookups.recipient(
        "a@example.com", Transaction(client_ip="192.0.2.9", auth_user="joe", daemon_name="submission")
    )
    assert submission.originating and submission.policy.bank == "ORIGINATING/SUBMISSION"
    assert (submission.policy.kill_level, submission.policy.destiny.spam, submission.policy.tag_level) == (
        20.0,
        Destiny.REJECT,
        2.0,
    )
    partner = lookups.recipient("a@example.com", Transaction(client_ip="198.51.100.7")).policy
    assert (partner.bank, partner.tag_level, partner.kill_level) == ("PARTNERS", -999, 6.0)
    assert lookups.recipient("a@example.com", Transaction(client_ip="127.0.0.1")).policy.bank == "ORIGINATING"


def test_an_originating_bank_can_be_configured_and_a_bank_must_match_something(tmp_path):
    lookups = chain(tmp_path, policy='[[bank]]\nname = "ORIGINATING"\n[bank.destiny]\nvirus = "REJECT"\n')
    policy = lookups.recipient("a@example.com", Transaction(auth_user="joe")).policy
    assert (policy.bank, policy.destiny.virus) == ("ORIGINATING", Destiny.REJECT)
    with pytest.raises(ConfigError, match=r"bank\[0\] matches everything"):
        chain(tmp_path, policy='[[bank]]\nname = "ALL"\ntag_level = 1\n')
    with pytest.raises(ConfigError, match=r"bank\[0\].kill_levl"):
        chain(tmp_path, policy='[[bank]]\nname = "X"\ndaemon_name = "smtpd"\nkill_levl = 1\n')


def test_equal_settings_from_different_sources_are_one_policy(tmp_path):
    lookups = chain(
        tmp_path, policy='local_domains = ["example.com"]\n', recipients='["ann@example.com"]\nlocal = true\n'
    )
    ann, bob = lookups.recipient("ann@example.com", REMOTE), lookups.recipient("bob@example.com", REMOTE)
    assert ann.policy.source != bob.policy.source and ann.policy == bob.policy


# -------------------------------------------------------------------------- what they change


def test_a_spam_lover_gets_spam_delivered_and_tagged(tmp_path):
    from milterd.findings import Finding

    lookups = chain(
        tmp_path,
        policy='local_domains = ["example.com"]\n[destiny]\nspam = "REJECT"\n',
        recipients='["lover@example.com"]\nspam_lover = true\n',
    )
    spam = {"spamd": Finding("spamd", "ok", score=20.0, symbols=(("BAYES_99", 20.0),))}
    assert decide(spam, lookups.recipient("other@example.com", REMOTE).policy).action == "reject"
    loved = decide(spam, lookups.recipient("lover@example.com", REMOTE).policy)
    assert (loved.action, loved.category) == ("accept", Category.SPAM)


def test_whitelisted_senders_are_never_spam_and_blacklisted_always(tmp_path):
    from milterd.findings import Finding

    lookups = chain(
        tmp_path,
        policy='local_domains = ["example.com"]\n',
        senders='whitelist = ["@friend.test"]\nblacklist = ["@foe.test"]\n',
    )
    spam = {"spamd": Finding("spamd", "ok", score=20.0)}
    ham = {"spamd": Finding("spamd", "ok", score=0.5)}
    friend = lookups.recipient("a@example.com", Transaction(mail_from="x@friend.test")).policy
    foe = lookups.recipient("a@example.com", Transaction(mail_from="x@foe.test")).policy
    assert Category.SPAM not in decide(spam, friend).categories
    assert {Category.SPAM, Category.SPAMMY} <= set(decide(ham, foe).categories)


def test_a_value_of_the_wrong_kind_in_the_database_is_a_lookup_failure_not_a_guess(tmp_path, database):
    amavis_user(database, "joe@example.com", 9, spam_kill_level="lots")
    lookups = chain(tmp_path, settings(database, select_policy=AMAVIS))
    with pytest.raises(LookupFailed, match="column spam_kill_level is 'lots'"):
        lookups.recipient("joe@example.com", REMOTE)
