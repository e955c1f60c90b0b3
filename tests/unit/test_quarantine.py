"""The quarantine: kept before the reply, 0600 files in a 0700 directory, the id in the reply and the
log, X-Quarantine-ID on delivered copies, 451 when the copy cannot be written; the command line."""

from __future__ import annotations

import gzip
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milterd.config import load_config
from milterd.engine import build_engine, log_line
from milterd.message import Envelope, Message, Spool
from milterd.policy import Category, Policy, Verdict, kept
from milterd.quarantine import ID, DirectoryStore, Entry, QuarantineError, new_id, parse_age

pytestmark = pytest.mark.unit

MILTERD = str(Path(sys.executable).parent / "milterd")
EXE = (
    b"From: a@remote.test\r\nTo: u@example.com\r\nSubject: x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"X-Quarantine-ID: <forgedforged>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    b'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="setup.exe"\r\n\r\n'
    b"MZ\r\n--b--\r\n"
)


def config(tmp_path: Path, policy: str, quarantine: str = "") -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "policy.toml").write_text('local_domains = ["example.com"]\n' + policy)
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "dkim", "spf", "dmarc"))
    path = tmp_path / "milterd.toml"
    outbox = f'[notify]\noutbox = "{tmp_path / "outbox"}"\nvia = "127.0.0.1:1"\n'
    path.write_text(
        off + outbox + (quarantine or f'[quarantine]\ndirectory = "{tmp_path / "q"}"\nrelease_via = "127.0.0.1:1"\n')
    )
    return path


def evaluate(path: Path, raw: bytes = EXE, queue_id: str = "4QID"):
    engine = build_engine(load_config(path))
    spool = Spool()
    spool.write(raw)
    envelope = Envelope(
        "a@remote.test", ("u@example.com",), "192.0.2.1", "mail.remote.test", "mail.remote.test", queue_id
    )
    try:
        return engine, engine.evaluate(Message(envelope, spool))
    finally:
        engine.close()


def test_ids_are_twelve_url_safe_characters_never_starting_like_an_option():
    ids = {new_id() for _ in range(5000)}
    assert len(ids) == 5000 and all(ID.fullmatch(i) for i in ids)
    assert not any(i.startswith("-") for i in ids)  # 1 in 64 would, and `milterd release -x...` fails


def test_what_is_kept_is_the_blocking_category_or_the_main_one_of_delivered_mail():
    policy = Policy(quarantine=("virus", "spam"), quarantine_cutoff_level=20)
    virus = Verdict(Category.VIRUS, (Category.VIRUS,), "reject", blocked_by=Category.VIRUS)
    assert kept(policy, virus) == "virus"
    spam_passed = Verdict(Category.SPAM, (Category.SPAM, Category.SPAMMY), "accept", spam_score=12)
    assert kept(policy, spam_passed) == "spam"
    assert kept(policy, Verdict(Category.SPAM, (Category.SPAM,), "accept", spam_score=25)) == ""  # over the cutoff
    assert kept(policy, Verdict(Category.BANNED, (Category.BANNED,), "reject", blocked_by=Category.BANNED)) == ""
    assert kept(policy, Verdict(Category.VIRUS, (Category.VIRUS,), "tempfail")) == ""  # it will come again


def test_a_refused_message_is_kept_first_and_its_reply_and_log_line_carry_the_id(tmp_path):
    _, disposition = evaluate(config(tmp_path, '[destiny]\nbanned = "REJECT"\n'))
    outcome = disposition.outcome
    qid = outcome.quarantine_id
    assert ID.fullmatch(qid)
    assert str(outcome.reply) == f"554 5.7.0 Rejected: message contains banned file setup.exe, id={qid}"
    assert f"quarantine={qid}," in log_line(disposition)
    directory = tmp_path / "q"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [f"{qid}.eml.gz", f"{qid}.json"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    assert gzip.decompress((directory / f"{qid}.eml.gz").read_bytes()) == EXE
    entry = json.loads((directory / f"{qid}.json").read_text())
    assert entry | {"time": 0} == {
        "id": qid, "time": 0, "category": "banned", "reason": "message contains banned file setup.exe",
        "mail_from": "a@remote.test", "rcpts": ["u@example.com"], "size": len(EXE), "client_ip": "192.0.2.1",
        "client_name": "mail.remote.test", "helo": "mail.remote.test", "queue_id": "4QID", "released": None,
        "released_to": [],
    }  # fmt: skip


def test_a_kept_message_that_is_delivered_carries_x_quarantine_id_and_a_forged_one_is_removed(tmp_path):
    _, disposition = evaluate(config(tmp_path, '[destiny]\nbanned = "PASS"\n'))
    outcome = disposition.outcome
    assert outcome.verdict.action == "accept" and outcome.quarantine_id
    assert ("X-Quarantine-ID", f"<{outcome.quarantine_id}>") in outcome.headers
    assert any(e.op == "change" and e.name == "X-Quarantine-ID" and e.value == "" for e in outcome.edits)


def test_a_category_the_policy_does_not_keep_leaves_nothing(tmp_path):
    _, disposition = evaluate(config(tmp_path, 'quarantine = ["virus"]\n[destiny]\nbanned = "REJECT"\n'))
    assert disposition.outcome.quarantine_id == "" and not str(disposition.outcome.reply).endswith("=")
    assert not (tmp_path / "q").exists()


def test_a_copy_that_cannot_be_written_makes_the_reply_451_never_a_5xx_without_it(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    quarantine = f'[quarantine]\ndirectory = "{tmp_path / "file" / "q"}"\n'
    with caplog.at_level(logging.ERROR, logger="milterd"):
        _, disposition = evaluate(config(tmp_path, '[destiny]\nbanned = "REJECT"\n', quarantine))
    outcome = disposition.outcome
    assert (outcome.verdict.action, str(outcome.reply)) == (
        "tempfail",
        "451 4.3.0 Temporary local problem (quarantine), try again later",
    )
    assert "cannot keep a copy" in caplog.text and "reply=451 4.3.0" in log_line(disposition)


def test_quarantine_must_name_known_categories(tmp_path):
    with pytest.raises(Exception, match=r"quarantine: 'viruses' is not one of virus, banned"):
        load_config(config(tmp_path, 'quarantine = ["viruses"]\n'))


def test_the_store_lists_oldest_first_purges_by_age_and_refuses_ids_that_are_paths(tmp_path):
    store = DirectoryStore(tmp_path / "q")
    spool = Spool()
    spool.write(b"Subject: x\r\n\r\nbody\r\n")
    now = time.time()
    for age, category in ((3 * 86400, "virus"), (60, "banned")):
        entry = Entry(new_id(), now - age, category, "why", "a@b", ("c@d",), spool.size)
        store.keep(Message(Envelope(), spool), entry)
    assert [e.category for e in store.entries()] == ["virus", "banned"]
    assert store.purge(now - 86400) == 1
    assert [e.category for e in store.entries()] == ["banned"]
    with pytest.raises(QuarantineError, match="is not a quarantine id"):
        store.get("../../etc/passwd")


def test_ages_for_since():
    assert (parse_age("90s"), parse_age("30m"), parse_age("2h"), parse_age("7d"), parse_age("5")) == (
        90,
        1800,
        7200,
        604800,
        5,
    )
    with pytest.raises(ValueError):
        parse_age("yesterday")


def test_the_command_line_lists_shows_and_purges(tmp_path):
    path = config(tmp_path, '[destiny]\nbanned = "REJECT"\n')
    _, disposition = evaluate(path)
    qid = disposition.outcome.quarantine_id

    def run(*args):
        return subprocess.run([MILTERD, *args, "--config", str(path)], capture_output=True, text=True, timeout=60)

    listed = run("quarantine", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    record = json.loads(listed.stdout)
    assert set(record) == {"id", "time", "category", "mail_from", "rcpts", "size", "reason", "released"}
    assert (record["id"], record["category"], record["rcpts"]) == (qid, "banned", ["u@example.com"])
    assert run("quarantine", "list", "--category", "virus").stdout == ""
    assert qid in run("quarantine", "list", "--since", "1h").stdout
    shown = run("quarantine", "show", qid)
    assert shown.returncode == 0 and "reason: message contains banned file setup.exe" in shown.stdout
    assert "Subject: x\n" in shown.stdout and "MZ" not in shown.stdout  # the header section, not the body
    assert run("quarantine", "show", "nosuchid0000").returncode == 1
    os.utime(tmp_path / "q" / f"{qid}.json")
    assert "0 entries" in run("quarantine", "purge").stdout
    released = run("release", qid)  # release_via 127.0.0.1:1: nothing listens
    assert released.returncode == 1 and "127.0.0.1:1" in released.stderr


def test_the_sql_store_keeps_lists_shows_and_purges_in_the_database(tmp_path):
    """store = "sql" (sqlite here; tests/e2e shares one MariaDB quarantine between two milterds)."""
    db = tmp_path / "mail.db"
    sql = (
        f'[sql]\ndsn = "sqlite:///{db}"\nselect_policy = "SELECT 1 AS x WHERE 0 AND ? IN (%k)"\n'
        '[quarantine]\nstore = "sql"\nrelease_via = "127.0.0.1:1"\n'
    ).replace("? IN", "'a' IN")
    path = config(tmp_path, '[destiny]\nbanned = "REJECT"\n', sql)
    _, disposition = evaluate(path)
    qid = disposition.outcome.quarantine_id
    assert ID.fullmatch(qid) and not (tmp_path / "q").exists()
    listed = subprocess.run(
        [MILTERD, "quarantine", "list", "--json", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert json.loads(listed.stdout)["id"] == qid, listed.stderr
    shown = subprocess.run(
        [MILTERD, "quarantine", "show", qid, "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert "Subject: x" in shown.stdout
    engine = build_engine(load_config(path))
    try:
        with engine.quarantine.open(qid) as stream:
            assert stream.read() == EXE
        assert engine.quarantine.purge(time.time() + 1) == 1 and list(engine.quarantine.entries()) == []
    finally:
        engine.close()


def test_sql_store_needs_a_database(tmp_path):
    with pytest.raises(Exception, match=r'quarantine.store = "sql" needs \[sql\] dsn'):
        load_config(config(tmp_path, "", '[quarantine]\nstore = "sql"\n'))
