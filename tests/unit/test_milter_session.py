"""The pymilter adapter without Postfix: milter.Session and actions.apply driven through pymilter's
test context (Milter.testctx.TestCtx), with a real Engine whose checks need no daemon (banned and
headers run in-process; clamav, spamd, DKIM, SPF and DMARC are off).

TestCtx applies header actions to its parsed copy of the message (`_msg`) and keeps the last reply
(`_reply`), but it drops what a milter test most needs: chgheader's index (with "" it deletes every
field of that name), insheader's position (addheader appends whatever the index) and the order of
the calls. RecordingCtx keeps those too, so the calls can be compared with the Disposition's edits.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import socket
from pathlib import Path

import Milter
import mime
import pytest
from Milter import testctx

from milterd import actions, milter
from milterd.config import load_config
from milterd.edits import Edit, edited
from milterd.engine import Outcome, build_engine
from milterd.lookups import Transaction
from milterd.message import split_header_section
from milterd.policy import Category, Policy, Reply, Verdict

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "mx.example.com"
QUEUE_ID = "4QTEST1"
REJECT_BANNED = '[destiny]\nbanned = "REJECT"\n'
PASS_BANNED = '[destiny]\nbanned = "PASS"\n'

HEAD = (
    b"Received: from mail.remote.test (mail.remote.test [192.0.2.1])\r\n"
    b"From: Someone <someone@remote.test>\r\n"
    b"To: alice@example.com\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@remote.test>\r\n"
    b"Subject: hello\r\n"
)
CLEAN = HEAD + b"Content-Type: text/plain\r\n\r\nHello.\r\n"
FORGED = (
    HEAD + b"X-Spam-Flag: YES\r\n"
    b"Authentication-Results: other.example.net; spf=pass smtp.mailfrom=remote.test\r\n"
    b"Authentication-Results: " + HOSTNAME.encode() + b"; dkim=pass header.d=example.com\r\n"
    b"Content-Type: text/plain\r\n\r\nHello.\r\n"
)


def with_attachment(filename: str, head: bytes = HEAD) -> bytes:
    content = base64.b64encode(b"nothing but text\r\n")
    return (
        head + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + content + b"\r\n--b1--\r\n"
    )


def write_config(directory: Path, policy: str) -> Path:
    """milterd.toml with every check that needs a daemon or DNS off, and rules/: the shipped
    banned.toml and a policy.toml with example.com local and `policy` after it."""
    rules = directory / "rules"
    rules.mkdir(parents=True)
    shutil.copy(ROOT / "rules" / "banned.toml", rules / "banned.toml")
    (rules / "policy.toml").write_text('local_domains = ["example.com"]\n' + policy)
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "dkim", "spf", "dmarc"))
    path = directory / "milterd.toml"
    kept = f'[quarantine]\ndirectory = "{directory / "quarantine"}"\n[notify]\noutbox = "{directory / "outbox"}"\n'
    path.write_text(f'[milter]\nhostname = "{HOSTNAME}"\n{off}{kept}')
    return path


class RecordingCtx(testctx.TestCtx):
    """TestCtx that also keeps every action call, with all its arguments, in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def setreply(self, rcode, xcode, *msg):
        self.calls.append(("setreply", rcode, xcode, *msg))
        return super().setreply(rcode, xcode, *msg)

    def addheader(self, field, value, idx):
        self.calls.append(("addheader", field, value, idx))
        return super().addheader(field, value, idx)

    def chgheader(self, field, idx, value):
        self.calls.append(("chgheader", field, idx, value))
        return super().chgheader(field, idx, value)

    def edits(self) -> list[tuple]:
        return [call for call in self.calls if call[0] != "setreply"]


def expected_calls(edits) -> list[tuple]:
    """The libmilter calls an edit means: chgheader(name, index, value); insheader is addheader with
    the position; addheader without one (-1) appends."""
    calls = {
        "change": lambda e, v: ("chgheader", e.name, e.index, v),
        "insert": lambda e, v: ("addheader", e.name, v, e.index),
        "add": lambda e, v: ("addheader", e.name, v, -1),
    }
    # SMFIP_HDR_LEADSPC is negotiated: the MTA writes values as given, so ours carry their space
    return [calls[e.op](e, " " + e.value if e.value else "") for e in edits]


@pytest.fixture
def make_engine(tmp_path):
    """Real Engines from configs written to tmp_path; all closed at the end."""
    engines = []

    def make(policy: str = REJECT_BANNED):
        engine = build_engine(load_config(write_config(tmp_path / f"config{len(engines)}", policy)))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine, monkeypatch):
    """The Engine Session serves with, as serve() sets it; TestCtx creates Sessions via Milter.factory."""
    engine = make_engine()
    monkeypatch.setattr(milter.Session, "engine", engine, raising=False)
    monkeypatch.setattr(Milter, "factory", milter.Session)
    # As pymilter's own Milter.test does: a @noreply callback answers CONTINUE, which TestCtx's
    # drivers expect (they stop at any other answer).
    monkeypatch.setattr(Milter, "NOREPLY", Milter.CONTINUE)
    return engine


def decisions(engine, monkeypatch) -> list:
    """Every Disposition `engine` hands back for what follows the reply; its log line is still written."""
    seen = []
    after_reply = engine.after_reply

    def spy(disposition):
        seen.append(disposition)
        after_reply(disposition)

    monkeypatch.setattr(engine, "after_reply", spy)
    return seen


def connect(ctx, host="mail.remote.test", ip="192.0.2.1", port=40000, helo="mail.remote.test") -> milter.Session:
    """Negotiate, connect and HELO. Not TestCtx._connect: it passes the bare IP string as hostaddr,
    where libmilter passes (ip, port) for AF_INET, and Session reads both."""
    ctx._setsymval("i", QUEUE_ID)
    assert ctx._negotiate() == Milter.CONTINUE
    ctx._stage = Milter.M_CONNECT
    assert Milter.connect_callback(ctx, host, socket.AF_INET, (ip, port)) == Milter.CONTINUE
    ctx._stage = None
    assert ctx._helo(helo) == Milter.CONTINUE
    return ctx.getpriv()


def send(ctx, raw: bytes, *rcpts: str, sender="someone@remote.test", before_data=None) -> tuple[list[int], int]:
    """One transaction as Postfix drives it: MAIL FROM, every RCPT TO (a deferred recipient drops
    out, the others go on), DATA, the header fields, the body, end of message.

    Returns each RCPT's answer and end of message's. ctx._msg is the parsed message, which TestCtx's
    addheader and chgheader edit. `before_data` runs between the last RCPT and DATA.
    """
    ctx._body, ctx._reply, ctx._headerschanged = None, None, False
    ctx._msg = mime.message_from_file(io.BytesIO(raw))
    assert ctx._envfrom(f"<{sender}>") == Milter.CONTINUE
    answers = [ctx._envrcpt(f"<{rcpt}>") for rcpt in rcpts]
    if before_data:
        before_data()
    assert ctx._data() == Milter.CONTINUE
    for name, value in ctx._msg.items():  # as Postfix sends them with SMFIP_HDR_LEADSPC: space included
        assert ctx._header(name, " " + value) == Milter.CONTINUE
    assert ctx._eoh() == Milter.CONTINUE
    assert ctx._feed_body(io.BytesIO(raw.partition(b"\r\n\r\n")[2])) == Milter.CONTINUE
    return answers, ctx._eom()


def log_lines(caplog) -> list[str]:
    """The per-message log lines (Engine.after_reply's)."""
    return [r.getMessage() for r in caplog.records if r.name == "milterd" and " action=" in r.getMessage()]


@pytest.fixture
def ctx(engine):
    ctx = RecordingCtx()
    yield ctx
    if ctx.getpriv() is not None:
        ctx._close()


# Negotiation


def test_negotiation_skips_the_replies_of_noreply_callbacks_and_the_eoh_callback(ctx):
    connect(ctx)
    for step in (Milter.P_NR_CONN, Milter.P_NR_HELO, Milter.P_NR_MAIL, Milter.P_NR_HDR, Milter.P_NR_BODY):
        assert ctx._protocol & step, hex(step)
    for step in (Milter.P_NR_RCPT, Milter.P_NR_DATA):  # RCPT may defer; DATA answers (no delayed-ACK stall)
        assert not ctx._protocol & step, hex(step)
    assert ctx._protocol & Milter.P_NOEOH
    assert ctx._protocol & Milter.P_HDR_LEADSPC  # header values exactly as sent


def test_header_values_are_spooled_exactly_as_sent(ctx, engine, monkeypatch):
    """ "Subject:x" and "Subject:  two" reach the checks as they were on the wire (DKIM simple c14n)."""
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    assert ctx._envfrom("<a@remote.test>") == Milter.CONTINUE
    assert ctx._envrcpt("<alice@example.com>") == Milter.CONTINUE
    for name, value in (("From", " a@remote.test"), ("Subject", "x"), ("X-Two", "  two"), ("Date", " Mon, 1 Jan 2024")):
        ctx._header(name, value)
    ctx._feed_body(io.BytesIO(b"hi\r\n"))
    ctx._eom()
    assert seen[0].message.header_section().startswith(b"From: a@remote.test\r\nSubject:x\r\nX-Two:  two\r\n")


# 1. A clean message


def test_clean_message_for_a_local_recipient_is_accepted_with_the_engines_header_edits(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    session = connect(ctx)
    answers, result = send(ctx, FORGED, "alice@example.com")

    assert (answers, result) == ([Milter.CONTINUE], Milter.ACCEPT)
    [disposition] = seen
    outcome = disposition.outcome
    assert (outcome.verdict.action, outcome.verdict.category, outcome.reply) == ("accept", Category.CLEAN, None)
    assert outcome.recipients == ("alice@example.com",) and outcome.policy.local
    # Our forged flag goes, and the Authentication-Results that claims our hostname (the 2nd); nothing is added.
    assert outcome.edits == (
        Edit("change", "X-Spam-Flag", "", 1),
        Edit("change", "Authentication-Results", "", 2),
    )
    assert "X-Amavis-Alert" not in [name for name, _ in outcome.headers]
    assert ctx.calls == expected_calls(outcome.edits)
    assert ctx.calls == [
        ("chgheader", "X-Spam-Flag", 1, ""),
        ("chgheader", "Authentication-Results", 2, ""),
    ]
    assert ctx._reply is None and ctx._headerschanged
    assert ctx._msg["X-Spam-Flag"] is None and ctx._msg["X-Amavis-Alert"] is None
    # TestCtx's chgheader(..., "") deletes every Authentication-Results; the index says which one
    # the MTA removes, and edited() (what the DKIM signer signs) shows the one that stays.
    after = edited(split_header_section(FORGED)[0], outcome.edits)
    assert [v for n, v in after if n == "Authentication-Results"] == [
        "other.example.net; spf=pass smtp.mailfrom=remote.test"
    ]
    # The envelope the engine judged is the one the callbacks collected.
    envelope = disposition.message.envelope
    assert (envelope.mail_from, envelope.rcpts, envelope.queue_id) == (
        "someone@remote.test",
        ("alice@example.com",),
        QUEUE_ID,
    )
    assert (envelope.client_name, envelope.client_ip, envelope.helo) == (
        "mail.remote.test",
        "192.0.2.1",
        "mail.remote.test",
    )
    assert session.spool is None  # freed at end of message


def test_engine_reads_the_message_the_client_sent(ctx, engine, monkeypatch):
    spooled = []
    after_reply = engine.after_reply

    def spy(disposition):
        with disposition.message.open() as stream:
            spooled.append(stream.read())
        after_reply(disposition)

    monkeypatch.setattr(engine, "after_reply", spy)
    connect(ctx)
    send(ctx, FORGED, "alice@example.com")
    headers, body = split_header_section(spooled[0])
    assert headers == split_header_section(FORGED)[0]
    assert body == b"Hello.\r\n"


def test_clean_message_with_nothing_to_remove_is_accepted_untouched(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    assert send(ctx, CLEAN, "alice@example.com") == ([Milter.CONTINUE], Milter.ACCEPT)
    assert seen[0].outcome.edits == ()
    assert ctx.calls == [] and not ctx._headerschanged and ctx._reply is None


def test_bad_header_passes_with_x_amavis_alert_inserted_on_top(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    no_date = CLEAN.replace(b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n", b"")
    assert send(ctx, no_date, "alice@example.com") == ([Milter.CONTINUE], Milter.ACCEPT)
    outcome = seen[0].outcome
    assert outcome.verdict.category is Category.BAD_HEADER
    assert outcome.edits == (Edit("insert", "X-Amavis-Alert", outcome.edits[0].value, 0),)
    assert ctx.calls == expected_calls(outcome.edits)
    assert ctx._msg["X-Amavis-Alert"].startswith(" BAD HEADER SECTION, Missing required header field")


# 2. A banned attachment


def test_banned_attachment_is_rejected_with_554_and_no_header_edits(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    raw = with_attachment("setup.exe", HEAD + b"X-Spam-Flag: YES\r\n")  # would be removed, were it passed
    answers, result = send(ctx, raw, "alice@example.com")

    assert (answers, result) == ([Milter.CONTINUE], Milter.REJECT)
    outcome = seen[0].outcome
    assert (outcome.verdict.action, outcome.verdict.category) == ("reject", Category.BANNED)
    assert outcome.reply == Reply("554", "5.7.0", outcome.reply.text)
    assert "setup.exe" in outcome.reply.text
    assert ctx.calls == [("setreply", "554", "5.7.0", outcome.reply.text)]
    assert ctx._reply == ("554", "5.7.0", outcome.reply.text)
    assert not ctx._headerschanged and ctx._msg["X-Spam-Flag"] == "YES"


# 3. One policy per transaction


def test_recipient_with_another_policy_is_deferred_at_rcpt_and_the_first_policy_decides(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    answers, result = send(ctx, with_attachment("setup.exe"), "alice@example.com", "bob@remote.test")

    assert answers == [Milter.CONTINUE, Milter.TEMPFAIL]
    assert ctx.calls[0] == ("setreply", "452", "4.5.3", "Too many recipients: please send this one separately")
    assert result == Milter.REJECT
    outcome = seen[0].outcome
    assert outcome.recipients == ("alice@example.com",) and outcome.policy.local
    assert seen[0].message.envelope.rcpts == ("alice@example.com",)


def test_recipients_with_the_same_policy_share_the_transaction(ctx, engine, monkeypatch):
    seen = decisions(engine, monkeypatch)
    connect(ctx)
    answers, result = send(ctx, CLEAN, "alice@example.com", "carol@example.com")
    assert (answers, result) == ([Milter.CONTINUE, Milter.CONTINUE], Milter.ACCEPT)
    assert seen[0].outcome.recipients == ("alice@example.com", "carol@example.com")
    assert ctx.calls == []


def test_non_smtp_mail_is_not_deferred_and_the_first_recipients_policy_applies_to_all(ctx, engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="milterd")
    seen = decisions(engine, monkeypatch)
    session = connect(ctx, host="localhost", ip="127.0.0.1", port=0, helo="localhost")
    assert not session.smtp
    answers, result = send(ctx, CLEAN, "alice@example.com", "bob@remote.test", sender="root@example.com")

    assert (answers, result) == ([Milter.CONTINUE, Milter.CONTINUE], Milter.ACCEPT)
    assert not [call for call in ctx.calls if call[0] == "setreply"]
    outcome = seen[0].outcome
    assert outcome.recipients == ("alice@example.com", "bob@remote.test")
    assert outcome.policy == engine.recipient("alice@example.com", Transaction()).policy and outcome.policy.local
    assert f"{QUEUE_ID}: recipients require different policies; the first recipient's applies" in caplog.messages


def test_originating_smtp_mail_is_not_deferred_either_as_amavis_milter(ctx):
    """Mail clients handle 452 badly: a client in mynetworks (loopback here) keeps every recipient."""
    session = connect(ctx, host="localhost", ip="127.0.0.1", port=41000, helo="localhost")
    assert session.smtp
    answers, _ = send(ctx, CLEAN, "alice@example.com", "bob@remote.test")
    assert answers == [Milter.CONTINUE, Milter.CONTINUE]


# 4. Internal errors


def test_internal_error_in_the_engine_gives_451_tempfail_and_is_logged(ctx, engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="milterd")

    def evaluate(message, recipients=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "evaluate", evaluate)
    session = connect(ctx)
    answers, result = send(ctx, FORGED, "alice@example.com")

    assert result == Milter.TEMPFAIL
    assert ctx.calls == [("setreply", "451", "4.3.0", "Temporary local problem, try again later")]
    assert ctx._reply == ("451", "4.3.0", "Temporary local problem, try again later")
    [line] = log_lines(caplog)
    assert line.startswith(f"{QUEUE_ID}: client=mail.remote.test[192.0.2.1],")
    assert "action=tempfail, reply=451 4.3.0" in line
    assert "internal error: RuntimeError: boom" in line
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"{QUEUE_ID}: internal error: RuntimeError: boom"]
    assert errors[0].exc_info is not None
    assert session.spool is None


def test_failure_while_carrying_out_the_edits_gives_451_tempfail(ctx, engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="milterd")
    connect(ctx)

    def chgheader(field, idx, value):
        raise OSError("MTA went away")

    monkeypatch.setattr(ctx, "chgheader", chgheader)
    _, result = send(ctx, FORGED, "alice@example.com")
    assert result == Milter.TEMPFAIL
    assert ctx._reply == ("451", "4.3.0", "Temporary local problem, try again later")
    [line] = log_lines(caplog)
    assert "reply=451 4.3.0" in line and "OSError: MTA went away" in line


def test_failure_after_the_reply_does_not_change_it(ctx, engine, monkeypatch, caplog):
    def after_reply(disposition):
        raise ValueError("log sink broken")

    monkeypatch.setattr(engine, "after_reply", after_reply)
    session = connect(ctx)
    _, result = send(ctx, FORGED, "alice@example.com")
    assert result == Milter.ACCEPT
    assert ctx._reply is None and len(ctx.edits()) == 2
    assert f"{QUEUE_ID}: after the reply: ValueError: log sink broken" in caplog.messages
    assert session.spool is None


# 5. The log line


class CallLog(logging.Handler):
    """Puts the milterd log lines in the context's call list, so their order with the replies shows."""

    def __init__(self, ctx: RecordingCtx):
        super().__init__()
        self.ctx = ctx

    def emit(self, record):
        if " action=" in record.getMessage():
            self.ctx.calls.append(("log", record.getMessage()))


@pytest.fixture
def call_log(ctx, caplog):
    caplog.set_level(logging.INFO, logger="milterd")
    handler = CallLog(ctx)
    logging.getLogger("milterd").addHandler(handler)
    yield
    logging.getLogger("milterd").removeHandler(handler)


def test_log_line_of_a_reject_follows_the_reply_and_carries_it(ctx, call_log):
    connect(ctx)
    _, result = send(ctx, with_attachment("setup.exe"), "alice@example.com")
    assert result == Milter.REJECT
    [reply, (kind, line)] = ctx.calls
    assert reply[:3] == ("setreply", "554", "5.7.0") and kind == "log"
    assert line.startswith(f"{QUEUE_ID}: client=mail.remote.test[192.0.2.1], from=<someone@remote.test>,")
    assert "to=<alice@example.com>," in line
    assert re.search(
        r"category=BANNED, score=-, action=reject, reply=554 5\.7\.0, quarantine=[\w-]{12}, checks=\[", line
    )
    assert "reason=message contains banned file" in line


def test_log_line_of_an_accept_follows_the_header_edits_and_says_250(ctx, call_log):
    connect(ctx)
    _, result = send(ctx, FORGED, "alice@example.com")
    assert result == Milter.ACCEPT
    *edits, (kind, line) = ctx.calls
    assert [call[0] for call in edits] == ["chgheader", "chgheader"] and kind == "log"
    assert "category=CLEAN, score=-, action=accept, reply=250, checks=[" in line
    assert "banned:ok/" in line and "headers:ok/" in line


# 6. actions.apply on its own


def milter_at_eom(raw: bytes = CLEAN) -> tuple[Milter.Base, RecordingCtx]:
    """A plain Milter.Base on a TestCtx at end of message (header actions are allowed only then)."""
    ctx = RecordingCtx()
    ctx._msg = mime.message_from_file(io.BytesIO(raw))
    ctx._body = io.BytesIO()
    base = Milter.Base()
    base._setctx(ctx)
    return base, ctx


def outcome(action: str, reply: Reply | None = None, edits: tuple[Edit, ...] = ()) -> Outcome:
    category = Category.CLEAN if action == "accept" else Category.BANNED
    verdict = Verdict(category, (category,), action, reply)
    return Outcome(("alice@example.com",), Policy(local=True), verdict, edits=edits)


EDITS = (
    Edit("change", "X-Spam-Flag", "", 1),
    Edit("change", "Subject", "***SPAM*** hello", 1),
    Edit("insert", "X-Virus-Scanned", "milterd at mx.example.com", 0),
    Edit("add", "X-Extra", "at the end"),
)


def test_apply_reject_sets_the_reply_and_makes_no_edits():
    base, ctx = milter_at_eom(FORGED)
    reply = Reply("554", "5.7.0", "Rejected: message contains banned file setup.exe")
    assert actions.apply(base, outcome("reject", reply, EDITS)) == Milter.REJECT
    assert ctx.calls == [("setreply", "554", "5.7.0", reply.text)]
    assert not ctx._headerschanged


@pytest.mark.parametrize(
    "action, reply, result",
    [
        ("tempfail", Reply("451", "4.7.1", "Try again later: clamav unavailable"), Milter.TEMPFAIL),
        ("discard", None, Milter.DISCARD),
    ],
)
def test_apply_tempfail_and_discard_make_no_edits(action, reply, result):
    base, ctx = milter_at_eom(FORGED)
    assert actions.apply(base, outcome(action, reply, EDITS)) == result
    assert ctx.calls == ([("setreply", reply.code, reply.xcode, reply.text)] if reply else [])
    assert ctx._reply == ((reply.code, reply.xcode, reply.text) if reply else None)


def test_apply_accept_makes_change_insert_and_add_edits_in_order():
    base, ctx = milter_at_eom(FORGED)
    assert actions.apply(base, outcome("accept", edits=EDITS), leading_space=True) == Milter.ACCEPT
    assert ctx.calls == [  # SMFIP_HDR_LEADSPC: the MTA writes values as given, so each has its space
        ("chgheader", "X-Spam-Flag", 1, ""),
        ("chgheader", "Subject", 1, " ***SPAM*** hello"),
        ("addheader", "X-Virus-Scanned", " milterd at mx.example.com", 0),
        ("addheader", "X-Extra", " at the end", -1),
    ]
    assert ctx.calls == expected_calls(EDITS)
    # What TestCtx itself made of them: the flag gone; the rest appended in call order (it ignores
    # indexes, and a chgheader with a value appends rather than replaces).
    assert ctx._headerschanged and ctx._msg["X-Spam-Flag"] is None
    assert ctx._msg.items()[-3:] == [
        ("Subject", " ***SPAM*** hello"),
        ("X-Virus-Scanned", " milterd at mx.example.com"),
        ("X-Extra", " at the end"),
    ]


def test_apply_accept_with_no_edits_calls_nothing():
    base, ctx = milter_at_eom()
    assert actions.apply(base, outcome("accept")) == Milter.ACCEPT
    assert ctx.calls == [] and ctx._reply is None


# 7. A reload during a transaction


def test_transaction_keeps_the_engine_it_started_with(ctx, engine, make_engine, monkeypatch):
    reloaded = make_engine(PASS_BANNED)
    first, second = decisions(engine, monkeypatch), decisions(reloaded, monkeypatch)
    connect(ctx)

    def reload():
        monkeypatch.setattr(milter.Session, "engine", reloaded)

    _, result = send(ctx, with_attachment("setup.exe"), "alice@example.com", before_data=reload)
    assert result == Milter.REJECT  # the first engine's [destiny] banned = "REJECT"
    assert len(first) == 1 and second == []
    assert ctx.calls[0][:3] == ("setreply", "554", "5.7.0")

    # The next transaction on the same connection starts with the engine now current.
    ctx.calls.clear()
    _, result = send(ctx, with_attachment("setup.exe"), "alice@example.com")
    assert result == Milter.ACCEPT  # banned = "PASS": delivered, with the alert
    assert len(first) == 1 and len(second) == 1
    assert second[0].outcome.verdict.category is Category.BANNED
    assert ctx.calls == expected_calls(second[0].outcome.edits)
    assert ctx._msg["X-Amavis-Alert"].startswith(" BANNED, message contains")
