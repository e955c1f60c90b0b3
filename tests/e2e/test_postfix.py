"""Through a real Postfix: smtpd_milters points at a real `milterd run`, mail lands in a Maildir.

Every assertion about delivered mail reads the copy Postfix delivered, not milterd's claims.
"""

from __future__ import annotations

import base64
import email.utils
import shutil
import smtplib
import socket
import subprocess
import uuid

import pytest

from tests import daemons
from tests.conftest import GTUBE, start_milterd, stop_milterd, write_config

# One milterd per policy under test, each behind its own Postfix listener.
POLICIES = {
    "shipped": {},
    "always": {"tag_level": -999},
    "reject": {"destiny": {"spam": "REJECT"}},
    "tempfail": {"scanner_failure": "tempfail"},
    "unchecked": {"scanner_failure": "unchecked"},
    "optional": {},
}
DEAD_SPAMD = ("tempfail", "unchecked", "optional")  # these point at a spamd that is not running
CRITICAL_SPAMD = ("tempfail", "unchecked")  # spamd made critical, as clamd is by default


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd):
    """The private Postfix with one listener per policy, and the milterds behind them."""
    base = tmp_path_factory.mktemp("e2e")
    daemons.make_traversable(base)
    dead = f"127.0.0.1:{daemons.free_port()}"
    milterds = {
        name: start_milterd(
            write_config(
                base / name,
                clamav=str(clamd.socket_path),
                spamd=dead if name in DEAD_SPAMD else f"127.0.0.1:{spamd.port}",
                policy=policy,
                spamd_critical=name in CRITICAL_SPAMD,
            )
        )
        for name, policy in POLICIES.items()
    }
    postfix = daemons.start_postfix(
        base / "postfix",
        {name: m.socket for name, m in milterds.items()},
        extra_main_cf={"non_smtpd_milters": milterds["shipped"].socket},
    )
    yield postfix, milterds
    postfix.stop()
    stop_milterd(*milterds.values())


def new_token() -> bytes:
    """Unique per message. The underscore prefix keeps SpamAssassin's Bitcoin-address rules
    (BITCOIN_SPAM_03, PDS_BTC_ID) from matching a hex string that starts with 1 or 3."""
    return b"mtok_" + uuid.uuid4().hex.encode()


def compose(
    body: bytes, subject="test", extra=b"", sender="sender@remote.test", from_header: str | None = None
) -> tuple[bytes, bytes]:
    """A message to user@example.com with a unique token after the body: (token, raw)."""
    token = new_token()
    domain = sender.rpartition("@")[2]
    raw = (
        f"From: {from_header or sender}\r\nTo: user@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{token.decode()}@{domain}>\r\nDate: {email.utils.formatdate()}\r\n".encode()
        + extra
        + b"\r\n"
        + body
        + b"\r\n"
        + token
        + b"\r\n"
    )
    return token, raw


def send(
    mta,
    listener: str,
    body: bytes,
    rcpts=("user@example.com",),
    subject="test",
    extra=b"",
    sender="sender@remote.test",
    from_header: str | None = None,
) -> bytes:
    """Submit one message with a unique token; returns the token. SMTP errors propagate."""
    postfix = mta[0]
    token, raw = compose(body, subject, extra, sender, from_header)
    with smtplib.SMTP("127.0.0.1", postfix.ports[listener], timeout=60) as smtp:
        smtp.sendmail(sender, list(rcpts), raw)
    return token


def headers(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\n\n", 1)[0].decode("utf-8", "replace").replace("\n\t", " ").replace("\n ", " ")
    return [tuple(part.strip() for part in line.split(":", 1)) for line in head.splitlines() if ":" in line]


def header(raw: bytes, name: str) -> list[str]:
    return [v for k, v in headers(raw) if k.lower() == name.lower()]


def test_eicar_is_rejected_at_end_of_data(mta):
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, "shipped", daemons.EICAR)
    assert refused.value.smtp_code == 554
    assert b"5.7.0 Rejected: virus Eicar-Test-Signature" in refused.value.smtp_error


def test_gtube_under_pass_is_delivered_flagged_and_tagged_and_forged_flags_are_gone(mta):
    postfix, _ = mta
    token = send(
        mta, "shipped", GTUBE, subject="cheap pills", extra=b"X-Spam-Flag: NO\r\nX-Spam-Status: No, forged\r\n"
    )
    delivered = postfix.wait_delivered(token)
    assert header(delivered, "X-Spam-Flag") == ["YES"]
    assert header(delivered, "Subject") == ["***SPAM*** cheap pills"]
    [status] = header(delivered, "X-Spam-Status")
    assert status.startswith("Yes, score=1000") and "GTUBE=1000" in status and "required=4" in status
    assert header(delivered, "X-Virus-Scanned") == ["milterd at " + socket.getfqdn()]


def test_gtube_under_reject_is_refused(mta):
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, "reject", GTUBE)
    assert refused.value.smtp_code == 554 and b"5.7.0 Rejected: spam" in refused.value.smtp_error


def test_clean_mail_gets_x_spam_status_no_when_tag_level_is_always(mta):
    postfix, _ = mta
    delivered = postfix.wait_delivered(send(mta, "always", b"Hello Bob, lunch on Thursday at noon?"))
    assert header(delivered, "X-Spam-Flag") == ["NO"]
    assert header(delivered, "X-Spam-Status")[0].startswith("No, score=")
    assert header(delivered, "Subject") == ["test"]


def test_clean_mail_under_tag_level_2_gets_no_spam_headers(mta):
    postfix, _ = mta
    delivered = postfix.wait_delivered(send(mta, "shipped", b"Hello Bob, lunch on Thursday at noon?"))
    assert header(delivered, "X-Spam-Flag") == []
    assert len(header(delivered, "X-Virus-Scanned")) == 1


def test_spamd_down_by_default_delivers_unscored_as_amavis_does(mta):
    """spamd is not critical by default: mail keeps flowing, without a spam score or UNCHECKED."""
    postfix, _ = mta
    delivered = postfix.wait_delivered(send(mta, "optional", b"Hello", subject="report"))
    assert header(delivered, "Subject") == ["report"]
    assert header(delivered, "X-Amavis-Alert") == [] and header(delivered, "X-Spam-Status") == []


def test_critical_spamd_down_with_tempfail_answers_4xx_and_nothing_is_delivered(mta):
    postfix, _ = mta
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(mta, "tempfail", b"Hello")
    assert deferred.value.smtp_code == 451 and b"4.7.1" in deferred.value.smtp_error
    assert b"spamd unavailable" in deferred.value.smtp_error
    postfix.wait_queue_empty(10)


def test_critical_spamd_down_with_unchecked_delivers_marked_unchecked(mta):
    postfix, _ = mta
    delivered = postfix.wait_delivered(send(mta, "unchecked", b"Hello", subject="report"))
    assert header(delivered, "Subject") == ["***UNCHECKED*** report"]
    assert any("UNCHECKED, spamd unavailable" in v for v in header(delivered, "X-Amavis-Alert"))


def test_a_recipient_with_another_policy_is_deferred_to_a_new_transaction(mta):
    """From a remote MTA (XCLIENT): originating mail keeps its recipients, as amavis' milter."""
    postfix, _ = mta
    with smtplib.SMTP("127.0.0.1", postfix.ports["shipped"], timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.docmd("XCLIENT", "ADDR=192.0.2.1 NAME=mail.remote.test")[0] == 220
        smtp.ehlo("mail.remote.test")
        smtp.mail("sender@remote.test")
        assert smtp.rcpt("user@example.com")[0] == 250
        postfix_code, text = smtp.rcpt("someone@remote.test")
        smtp.rset()
    assert postfix_code == 452 and text.startswith(b"4.5.3")


def test_local_submission_with_mixed_recipients_is_not_held(mta):
    """Postfix cannot defer one recipient of sendmail(1) mail: the first recipient's policy applies."""
    postfix, _ = mta
    token = new_token()
    subprocess.run(
        [
            "/usr/sbin/sendmail",
            "-C",
            str(postfix.config_directory),
            "-f",
            "root@example.com",
            "user@example.com",
            "someone@remote.test",
        ],
        input=b"Subject: cron\n\n" + token + b"\n",
        check=True,
        timeout=30,
    )
    postfix.wait_delivered(token)
    postfix.wait_queue_empty(20)
    assert sum(token in m for m in postfix.delivered()) == 2


def test_a_large_message_is_spooled_and_delivered_intact(mta):
    postfix, _ = mta
    body = b"\r\n".join(b"%06d " % i + b"x" * 70 for i in range(40000))  # ~3 MB, past the 1 MiB spool threshold
    token = send(mta, "shipped", body)
    delivered = postfix.wait_delivered(token, timeout=60)
    assert body.replace(b"\r\n", b"\n") in delivered  # the Maildir copy has LF line ends


def test_one_log_line_per_message_with_queue_id_and_check_times(mta):
    postfix, milterds = mta
    token = send(mta, "shipped", b"log me")
    postfix.wait_delivered(token)
    queue_id = next(
        line.split(": ")[1]
        for line in postfix.log.read_text().splitlines()
        if token.decode() in line and "message-id=" in line
    )
    lines = [line for line in milterds["shipped"].log.read_text().splitlines() if f" {queue_id}: " in line]
    assert len(lines) == 1
    assert "category=CLEAN" in lines[0] and "action=accept" in lines[0]
    assert "clamav:ok/" in lines[0] and "spamd:ok/" in lines[0] and "from=<sender@remote.test>" in lines[0]


@pytest.mark.skipif(not shutil.which("miltertest"), reason="miltertest not installed")
def test_miltertest_drives_milterd_at_the_protocol_level(mta, tmp_path):
    """miltertest (OpenDKIM's independent milter client) checks the actions at end of message."""
    _, milterds = mta
    script = tmp_path / "gtube.lua"
    script.write_text(
        MILTERTEST_SCRIPT
        % {
            "port": milterds["shipped"].port,
            "gtube": GTUBE.decode(),
            "eicar": daemons.EICAR.decode().replace("\\", "\\\\"),
        }
    )
    result = subprocess.run(["miltertest", "-v", "-s", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


MILTERTEST_SCRIPT = r"""
local function message(body, subject)
  local conn = mt.connect("inet:%(port)d@127.0.0.1")
  assert(conn, "cannot connect to milterd")
  assert(mt.conninfo(conn, "client.remote.test", "192.0.2.1") == nil)
  assert(mt.getreply(conn) == SMFIR_CONTINUE)
  assert(mt.helo(conn, "client.remote.test") == nil)
  mt.macro(conn, SMFIC_MAIL, "i", "MT0001")
  assert(mt.mailfrom(conn, "sender@remote.test") == nil)
  assert(mt.rcptto(conn, "user@example.com") == nil)
  assert(mt.getreply(conn) == SMFIR_CONTINUE)
  assert(mt.header(conn, "From", "sender@remote.test") == nil)
  assert(mt.header(conn, "Subject", subject) == nil)
  assert(mt.header(conn, "X-Spam-Flag", "NO") == nil)
  -- no mt.eoh(): milterd negotiates the end-of-headers step away (one packet less per message)
  assert(mt.bodystring(conn, body .. "\r\n") == nil)
  assert(mt.eom(conn) == nil)
  return conn
end

local conn = message("%(gtube)s", "pills")
assert(mt.getreply(conn) == SMFIR_ACCEPT, "GTUBE should be accepted under PASS")
-- miltertest offers SMFIP_HDR_LEADSPC and milterd takes it: values carry the space after the colon
assert(mt.eom_check(conn, MT_HDRINSERT, "X-Spam-Flag", " YES"), "no X-Spam-Flag: YES")
assert(mt.eom_check(conn, MT_HDRCHANGE, "Subject", " ***SPAM*** pills"), "Subject not tagged")
assert(mt.eom_check(conn, MT_HDRCHANGE, "X-Spam-Flag", ""), "forged X-Spam-Flag not removed")
mt.disconnect(conn)

conn = message("%(eicar)s", "virus")
assert(mt.getreply(conn) == SMFIR_REPLYCODE, "EICAR should be rejected with a reply code")
mt.disconnect(conn)
"""


def attachment_message(filename: str, content: bytes) -> bytes:
    part = (
        b"--b1\r\nContent-Type: text/plain\r\n\r\nThe document is attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="'
        + filename.encode()
        + b'"\r\n\r\n'
        + base64.encodebytes(content).replace(b"\n", b"\r\n")
        + b"--b1--\r\n"
    )
    return part


def test_a_banned_attachment_is_rejected_with_a_reply_naming_the_file(mta):
    extra = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, "shipped", attachment_message("invoice.pdf.exe", b"not really a program\r\n"), extra=extra)
    assert refused.value.smtp_code == 554
    assert b"5.7.0 Rejected: message contains banned file" in refused.value.smtp_error
    assert b"invoice.pdf.exe" in refused.value.smtp_error


def test_a_right_to_left_override_name_is_banned_and_never_echoed_raw(mta):
    extra = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
    # RFC 2047-free raw UTF-8 name: "invoice<U+202E>fdp.js" shows as "invoicesj.pdf"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, "shipped", attachment_message("invoice\u202efdp.js", b"alert(1)\r\n"), extra=extra)
    assert refused.value.smtp_code == 554
    assert b"invoice?fdp.js" in refused.value.smtp_error
    assert "\u202e".encode() not in refused.value.smtp_error


def test_a_bad_header_message_is_delivered_with_the_amavis_alert_under_pass(mta):
    postfix, _ = mta
    token = send(mta, "shipped", b"Hello.", extra=b"From: second@remote.test\r\n")
    delivered = postfix.wait_delivered(token)
    assert header(delivered, "X-Amavis-Alert") == ['BAD HEADER SECTION, Duplicate header field: "From"']


def test_a_forged_authentication_results_with_our_authserv_id_is_removed(mta):
    """RFC 8601 section 5: only ours may say what we verified; other servers' results stay."""
    postfix, _ = mta
    ours = socket.getfqdn()  # milterd's [milter] hostname default, its authserv-id
    forged = f"Authentication-Results: {ours}; dkim=pass header.d=bank.example\r\n".encode()
    foreign = b"Authentication-Results: relay.remote.test; spf=pass smtp.mailfrom=remote.test\r\n"
    token = send(mta, "shipped", b"Hello.", extra=forged + foreign)
    delivered = postfix.wait_delivered(token)
    assert header(delivered, "Authentication-Results") == ["relay.remote.test; spf=pass smtp.mailfrom=remote.test"]
