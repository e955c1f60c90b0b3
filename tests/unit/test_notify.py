"""milterd.notify without a relay: settings, rendering, sanitising, the outbox, once per message,
the rate limit and its summary (with an injected clock), never to the sender, no loops.

Dispositions are built directly (Disposition/Outcome/Verdict/Summary values) and, for a banned
attachment, through a real Engine whose checks need no daemon."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from milterd.config import load_config
from milterd.engine import Disposition, Outcome, build_engine
from milterd.findings import Summary
from milterd.message import Envelope, Message, Spool
from milterd.notify import MARKER, Notifier, NotifySettings, load_templates, parse_notify, parse_via
from milterd.policy import Category, Policy, Reply, Verdict
from milterd.tomlschema import ConfigError
from tests.unit.test_milter_session import REJECT_BANNED, with_attachment

pytestmark = pytest.mark.unit

HOSTNAME = "mx.example.com"
REJECT = Reply("554", "5.7.0", "Reject, id=AbCdEf123456")
HEAD = (
    b"Received: from mail.remote.test (mail.remote.test [192.0.2.1])\r\n"
    b"\tby mx.example.com\r\n"
    b"From: Someone <someone@remote.test>\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: hello\r\n"
)
RAW = HEAD + b"Content-Type: text/plain\r\n\r\nHello.\r\n"


@dataclass(frozen=True)
class QOutcome(Outcome):
    """Outcome with the quarantine id the quarantine work adds."""

    quarantine_id: str = ""


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_disposition(
    category: Category = Category.VIRUS,
    *,
    viruses=("Eicar-Test-Signature",),
    banned=(),
    bad_headers=(),
    raw: bytes = RAW,
    queue_id: str = "4QTEST1",
    mail_from: str = "someone@remote.test",
    rcpts=("alice@example.com",),
    quarantine_id: str = "AbCdEf123456",
    reason: str = "virus found",
    action: str = "reject",
    reply: Reply | None = REJECT,
) -> Disposition:
    spool = Spool()
    spool.write(raw)
    envelope = Envelope(mail_from, tuple(rcpts), "192.0.2.1", "mail.remote.test", "mail.remote.test", queue_id)
    summary = Summary(True, tuple(viruses), tuple(banned), tuple(bad_headers), (), None, (), (), "")
    verdict = Verdict(category, (category,), action, reply, reason=reason)
    outcome = QOutcome(tuple(rcpts), Policy(), verdict, quarantine_id=quarantine_id)
    return Disposition(Message(envelope, spool), {}, summary, (outcome,))


def settings(tmp_path: Path, **overrides) -> NotifySettings:
    values = {"outbox": str(tmp_path / "outbox"), "banned_admin": "security@example.com"}
    return NotifySettings(**{**values, **overrides})


def files(notifier: Notifier) -> list[dict]:
    return [json.loads(p.read_bytes()) for p in notifier.pending()]


def parsed(record: dict) -> email.message.EmailMessage:
    """The notification as sent; its body's lines end in LF (get_content()) as the template's do."""
    raw = record["message"].encode().replace(b"\r\n", b"\n")
    return email.message_from_bytes(raw, policy=email.policy.default)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def notifier(tmp_path, clock):
    return Notifier(settings(tmp_path), HOSTNAME, None, clock=clock)


# ---------------------------------------------------------------------- settings


def test_parse_notify_maps_from_and_keeps_defaults(tmp_path):
    path = tmp_path / "milterd.toml"
    got = parse_notify({"from": "virusalert@example.com", "spam_admin": "spam@example.com"}, path)
    assert got.from_ == "virusalert@example.com"
    assert got.spam_admin == "spam@example.com"
    assert got.virus_admin == "postmaster"  # Debian's amavis
    assert (got.via, got.outbox, got.max_per_minute) == ("127.0.0.1:25", "/var/lib/milterd/outbox", 10)
    assert parse_notify({"outbox": "spool/outbox"}, path).outbox == str(tmp_path / "spool" / "outbox")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"virus_admins": "x"}, "unknown key notify.virus_admins"),
        ({"from_": "a@b.c"}, "unknown key notify.from_"),
        ({"from": 3}, "notify.from must be a string"),
        ({"from": "a@b.c\r\nBcc: x@y.z"}, "notify.from:"),
        ({"virus_admin": "<postmaster@example.com>"}, "notify.virus_admin:"),
        ({"via": "::1:25"}, "notify.via:"),
        ({"via": "relay:0"}, "notify.via:"),
        ({"max_per_minute": 0}, "notify.max_per_minute must be above zero"),
        ({"retry_interval": "soon"}, "notify.retry_interval must be a number"),
    ],
)
def test_parse_notify_errors_name_file_and_key(tmp_path, table, message):
    path = tmp_path / "milterd.toml"
    with pytest.raises(ConfigError) as e:
        parse_notify(table, path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_parse_via():
    assert parse_via("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_via("[::1]:2525") == ("::1", 2525)
    assert parse_via("[::1]") == ("::1", 25)
    assert parse_via("relay.example.com") == ("relay.example.com", 25)
    with pytest.raises(ValueError):
        parse_via("relay:smtp")


# ---------------------------------------------------------------------- rendering


def test_virus_notification_rendered(notifier):
    notifier.notify(make_disposition())
    [record] = files(notifier)
    assert (record["mail_from"], record["rcpt"]) == (f"postmaster@{HOSTNAME}", f"postmaster@{HOSTNAME}")
    msg = parsed(record)
    assert msg["From"] == f"postmaster@{HOSTNAME}"
    assert msg["To"] == f"postmaster@{HOSTNAME}"
    assert msg["Subject"] == "VIRUS (Eicar-Test-Signature) in mail FROM <someone@remote.test>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg[MARKER] == "1"
    assert msg["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert msg["Date"]
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    body = msg.get_content()
    for expected in (
        "Virus:          Eicar-Test-Signature",
        "Quarantine id:  AbCdEf123456",
        "Queue id:       4QTEST1",
        "Client:         mail.remote.test[192.0.2.1]",
        "Sender:         <someone@remote.test>",
        "Recipients:     <alice@example.com>",
        "Action:         reject (554 5.7.0 Reject, id=AbCdEf123456)",
        "Received: from mail.remote.test (mail.remote.test [192.0.2.1])\n        by mx.example.com",
        "Subject: hello",
    ):
        assert expected in body


def test_quarantine_id_optional(notifier):
    disposition = make_disposition()
    plain = Disposition(
        disposition.message,
        {},
        disposition.summary,
        (Outcome(("alice@example.com",), Policy(), disposition.outcome.verdict),),
    )
    notifier.notify(plain)
    assert "Quarantine id:  -\n" in parsed(files(notifier)[0]).get_content()


def test_hostile_names_cannot_inject_lines(notifier):
    hostile_raw = HEAD.replace(b"Subject: hello", b"Subject: hi\x1b[31m\r\nX-Evil: 1") + b"\r\nbody\r\n"
    disposition = make_disposition(
        viruses=("Evil\r\nBcc: victim@example.net\r\n\r\nbody",),
        mail_from="a\r\nBcc: x@example.net",
        rcpts=("alice@example.com\nCc: y@example.net",),
        queue_id="Q\r\nX-Injected: 1",
        quarantine_id="id\nX-Injected: 2",
        reason="reason\r\nX-Injected: 3",
        raw=hostile_raw,
    )
    notifier.notify(disposition)
    [record] = files(notifier)
    raw = record["message"]
    head = raw.split("\r\n\r\n", 1)[0]
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if not line.startswith((" ", "\t"))]
    assert sorted(names) == sorted(
        [
            "Date",
            "From",
            "To",
            "Subject",
            "Message-ID",
            "Auto-Submitted",
            MARKER,
            "Content-Type",
            "Content-Transfer-Encoding",
            "MIME-Version",
        ]
    )
    msg = parsed(record)
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]
    assert msg["Subject"].startswith("VIRUS (Evil??Bcc: victim@example.net????body) in mail FROM <a??Bcc:")
    body = msg.get_content()
    for line in body.splitlines():
        assert not line.startswith(("Bcc:", "Cc:", "X-Injected:"))
        assert "\x1b" not in line
    assert "Subject: hi?[31m" in body  # the escape shown as ?
    assert "X-Evil: 1" in body  # a header of its own in the original, a line of the listing here


def write_config(directory: Path, policy: str) -> Path:
    """milterd.toml with the checks that need a daemon or DNS off, the quarantine in `directory`, and
    rules/: the shipped banned.toml and policy.toml with example.com local and `policy` after it."""
    rules = directory / "rules"
    rules.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[2] / "rules" / "banned.toml", rules / "banned.toml")
    (rules / "policy.toml").write_text('local_domains = ["example.com"]\n' + policy)
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "dkim", "spf", "dmarc"))
    path = directory / "milterd.toml"
    path.write_text(f'[milter]\nhostname = "{HOSTNAME}"\n{off}[quarantine]\ndirectory = "{directory / "quarantine"}"\n')
    return path


def test_banned_through_the_real_engine(tmp_path):
    engine = build_engine(load_config(write_config(tmp_path / "config", REJECT_BANNED)))
    try:
        raw = with_attachment("report\x1b[2J.pdf.exe")
        spool = Spool()
        spool.write(raw)
        envelope = Envelope("someone@remote.test", ("alice@example.com",), "192.0.2.1", "remote.test", "helo", "4QB")
        disposition = engine.evaluate(Message(envelope, spool))
    finally:
        engine.close()
    assert disposition.outcome.verdict.category is Category.BANNED
    notifier = Notifier(settings(tmp_path), HOSTNAME, None)
    notifier.notify(disposition)
    [record] = files(notifier)
    assert record["rcpt"] == "security@example.com"
    msg = parsed(record)
    assert msg["Subject"].startswith("BANNED contents (")
    assert ".exe" in msg["Subject"] and "\n" not in msg["Subject"]
    assert "Banned parts:" in msg.get_content()
    assert "Queue id:       4QB" in msg.get_content()
    quarantine_id = disposition.outcome.quarantine_id  # kept: policy.toml's default quarantine has banned
    assert quarantine_id and f"Quarantine id:  {quarantine_id}\n" in msg.get_content()


def test_bad_header_lists_problems(tmp_path):
    notifier = Notifier(settings(tmp_path, bad_header_admin="hdr"), HOSTNAME, None)
    notifier.notify(make_disposition(Category.BAD_HEADER, viruses=(), bad_headers=("Subject: 8-bit", "Date\r\nX: y")))
    [record] = files(notifier)
    assert record["rcpt"] == f"hdr@{HOSTNAME}"
    body = parsed(record).get_content()
    assert "Problems:\n  Subject: 8-bit\n  Date??X: y\n" in body


@pytest.mark.parametrize("category", [Category.CLEAN, Category.SPAMMY, Category.UNCHECKED, Category.SPAM])
def test_no_admin_no_notification(notifier, category):
    notifier.notify(make_disposition(category, viruses=()))  # spam_admin is "" by default
    assert files(notifier) == []


def test_empty_virus_admin_sends_none(tmp_path):
    notifier = Notifier(settings(tmp_path, virus_admin=""), HOSTNAME, None)
    notifier.notify(make_disposition())
    assert not (tmp_path / "outbox").exists() or files(notifier) == []


# ---------------------------------------------------------------------- templates


def test_operator_template_overrides(tmp_path):
    rules = tmp_path / "rules" / "notify"
    rules.mkdir(parents=True)
    (rules / "virus.txt").write_text("Subject: Virus $viruses für $admin\n\nGefunden: $viruses ($$5)\n")
    notifier = Notifier(settings(tmp_path), HOSTNAME, rules)
    notifier.notify(make_disposition())
    msg = parsed(files(notifier)[0])
    assert msg["Subject"] == f"Virus Eicar-Test-Signature für postmaster@{HOSTNAME}"
    assert msg.get_content() == "Gefunden: Eicar-Test-Signature ($5)\n"
    assert load_templates(rules)["banned"] == load_templates(None)["banned"]


def test_template_without_subject_line(tmp_path):
    rules = tmp_path / "notify"
    rules.mkdir()
    (rules / "virus.txt").write_text("Just $category.\n")
    notifier = Notifier(settings(tmp_path), HOSTNAME, rules)
    notifier.notify(make_disposition())
    msg = parsed(files(notifier)[0])
    assert msg["Subject"] == "VIRUS in mail FROM <someone@remote.test>"
    assert msg.get_content() == "Just VIRUS.\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("virus.txt", "Hello $nobody\n", "unknown placeholder $nobody"),
        ("summary.txt", "$viruses\n", "unknown placeholder $viruses"),
        ("virus.txt", "costs 5$\n", "a $ that is not a placeholder"),
        ("virsu.txt", "x\n", "unknown notification template"),
        ("spam.txt", b"\xff\xfe", "cannot read"),
    ],
)
def test_bad_templates_are_config_errors(tmp_path, name, text, message):
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_templates(tmp_path)
    assert str(e.value).startswith(str(tmp_path / name))
    assert message in str(e.value)


# ---------------------------------------------------------------------- outbox


def test_outbox_0700_files_0600_no_temp_left(notifier, tmp_path):
    notifier.notify(make_disposition())
    outbox = tmp_path / "outbox"
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
    assert stat.S_IMODE((outbox / "failed").stat().st_mode) == 0o700
    [path] = notifier.pending()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in outbox.iterdir()) == sorted([path.name, "failed"])


def test_once_per_message(notifier, tmp_path):
    disposition = make_disposition()
    notifier.notify(disposition)
    notifier.notify(disposition)
    [path] = notifier.pending()
    path.unlink()  # sent
    notifier.notify(disposition)
    assert notifier.pending() == []
    # a fresh Notifier (a restart) still finds it in the outbox or failed/
    notifier.notify(make_disposition(queue_id="4QOTHER"))
    [path] = notifier.pending()
    path.rename(tmp_path / "outbox" / "failed" / path.name)
    again = Notifier(settings(tmp_path), HOSTNAME, None)
    again.notify(make_disposition(queue_id="4QOTHER"))
    assert again.pending() == []
    # another message is another notification
    again.notify(make_disposition(queue_id="4QTHIRD"))
    assert len(again.pending()) == 1


def test_unwritable_outbox_logs_never_raises(tmp_path, caplog):
    (tmp_path / "outbox").write_text("a file, not a directory")
    notifier = Notifier(settings(tmp_path), HOSTNAME, None)
    with caplog.at_level(logging.ERROR, "milterd"):
        notifier.notify(make_disposition())
    assert "4QTEST1: notification failed" in caplog.text


def test_broken_disposition_logs_never_raises(notifier, caplog):
    class Broken:
        @property
        def outcome(self):
            raise RuntimeError("no outcome")

    with caplog.at_level(logging.ERROR, "milterd"):
        notifier.notify(Broken())
    assert "NOQUEUE: notification failed: RuntimeError: no outcome" in caplog.text


def test_full_outbox_drops_and_logs(tmp_path, caplog):
    notifier = Notifier(settings(tmp_path, max_outbox_files=2), HOSTNAME, None)
    with caplog.at_level(logging.ERROR, "milterd"):
        for i in range(3):
            notifier.notify(make_disposition(queue_id=f"Q{i}"))
    assert len(notifier.pending()) == 2
    assert "dropped: 2 files wait in" in caplog.text


# ---------------------------------------------------------------------- rate limit


def test_rate_limit_and_summary(tmp_path, clock):
    notifier = Notifier(settings(tmp_path, max_per_minute=3), HOSTNAME, None, clock=clock)
    for i in range(8):
        notifier.notify(make_disposition(queue_id=f"V{i}"))
    notifier.notify(make_disposition(Category.BANNED, banned=("a.exe",), queue_id="B1"))  # another admin
    assert [r["queue_id"] for r in files(notifier)] == ["V0", "V1", "V2", "B1"]
    clock.now += 30
    assert notifier.tick() == pytest.approx(30)
    assert len(files(notifier)) == 4  # the minute is not over
    notifier.notify(make_disposition(Category.BAD_HEADER, queue_id="H1"))  # no bad_header_admin: nothing
    clock.now += 30
    assert notifier.tick() is None
    records = files(notifier)
    [summary] = [r for r in records if r["kind"] == "summary"]
    assert summary["rcpt"] == f"postmaster@{HOSTNAME}"
    msg = parsed(summary)
    assert msg["Subject"] == "5 more notifications held back (VIRUS x 5)"
    assert msg[MARKER] == "1" and msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_content()
    assert "Queue ids:      V3, V4, V5, V6, V7" in body
    assert "V3 VIRUS from <someone@remote.test> client mail.remote.test[192.0.2.1]: Eicar-Test-Signature" in body
    # a new minute: notifications again
    notifier.notify(make_disposition(queue_id="V8"))
    assert files(notifier)[-1]["queue_id"] == "V8"


def test_summary_written_at_rollover_and_on_close(tmp_path, clock):
    notifier = Notifier(settings(tmp_path, max_per_minute=1), HOSTNAME, None, clock=clock)
    for i in range(3):
        notifier.notify(make_disposition(queue_id=f"A{i}"))
    clock.now += 61
    notifier.notify(make_disposition(queue_id="A3"))  # the next minute's first: the last minute's summary first
    kinds = [(r["kind"], r["queue_id"]) for r in files(notifier)]
    assert kinds == [("notification", "A0"), ("summary", ""), ("notification", "A3")]
    notifier.notify(make_disposition(queue_id="A4"))
    notifier.close()  # never started; the open minute's summary goes to the outbox
    summaries = [parsed(r).get_content() for r in files(notifier) if r["kind"] == "summary"]
    assert len(summaries) == 2
    assert "Queue ids:      A1, A2" in summaries[0] and "Queue ids:      A4" in summaries[1]


def test_concurrent_notify_counts_exactly(tmp_path, clock):
    notifier = Notifier(settings(tmp_path, max_per_minute=7), HOSTNAME, None, clock=clock)
    dispositions = [make_disposition(queue_id=f"T{i}") for i in range(30)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(notifier.notify, dispositions * 3))  # each three times, from many threads
    assert len(files(notifier)) == 7
    notifier.tick(force=True)
    [summary] = [r for r in files(notifier) if r["kind"] == "summary"]
    assert parsed(summary)["Subject"].startswith("23 more notifications held back")


def test_summary_items_bounded(tmp_path, clock):
    notifier = Notifier(settings(tmp_path, max_per_minute=1, summary_max_items=2), HOSTNAME, None, clock=clock)
    for i in range(6):
        notifier.notify(make_disposition(queue_id=f"Q{i}"))
    notifier.tick(force=True)
    body = parsed(files(notifier)[-1]).get_content()
    assert "Queue ids:      Q1, Q2 ..." in body
    assert "... and 3 more (summary_max_items 2)" in body


# ---------------------------------------------------------------------- no backscatter, no loops


def test_never_to_the_sender(tmp_path):
    notifier = Notifier(settings(tmp_path, virus_admin="Postmaster@Example.com"), HOSTNAME, None)
    notifier.notify(make_disposition(mail_from="postmaster@example.com"))
    notifier.notify(make_disposition(mail_from="<POSTMASTER@example.com>", queue_id="Q2"))
    assert files(notifier) == []
    bare = Notifier(settings(tmp_path), HOSTNAME, None)
    bare.notify(make_disposition(mail_from=f"postmaster@{HOSTNAME}", queue_id="Q3"))
    assert files(bare) == []


def test_recipients_and_sender_get_nothing(notifier):
    notifier.notify(make_disposition(mail_from="someone@remote.test", rcpts=("alice@example.com", "bob@example.com")))
    assert [r["rcpt"] for r in files(notifier)] == [f"postmaster@{HOSTNAME}"]


def test_no_notification_about_a_notification(tmp_path, notifier):
    marked = HEAD + b"Auto-Submitted: auto-generated\r\n" + MARKER.encode() + b": 1\r\n\r\nx\r\n"
    notifier.notify(make_disposition(raw=marked))
    assert files(notifier) == []
    # sent from our own `from` address
    notifier.notify(make_disposition(mail_from=f"postmaster@{HOSTNAME}", queue_id="Q2"))
    custom = Notifier(settings(tmp_path / "custom", from_="virusalert@example.com"), HOSTNAME, None)
    custom.notify(make_disposition(mail_from="VirusAlert@example.com", queue_id="Q3"))
    assert files(notifier) == [] and files(custom) == []
    # our notification itself, scanned again, is not notified about
    custom.notify(make_disposition(queue_id="Q4"))
    [record] = files(custom)
    assert record["mail_from"] == "virusalert@example.com"
    notifier.notify(make_disposition(raw=record["message"].encode(), queue_id="Q5", mail_from="x@remote.test"))
    assert files(notifier) == []
