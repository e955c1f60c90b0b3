"""DKIM signing through a real Postfix: the DELIVERED message is verified with dkimpy against keys
published in the test DNS server, so the signature covers the message as it leaves, milterd's own
header changes (X-Spam-* removed and added, Subject tag) included.
"""

from __future__ import annotations

import smtplib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import pytest

from milterd.dkimsign import generate_key
from milterd.dns import Resolver
from tests import daemons
from tests.conftest import GTUBE, start_milterd, stop_milterd, write_config
from tests.e2e.test_postfix import new_token
from tests.e2e.test_postfix import send as submit

DOMAIN = "milterd.test"  # the From domain that has keys
SELECTORS = {"e2e-rsa": "rsa", "e2e-ed": "ed25519"}
# listener -> (policy, spamd alive, mynetworks or None for the default)
LISTENERS = {
    "signing": ({"tag_level": -999}, True, None),
    "unchecked": ({"scanner_failure": "unchecked"}, False, None),
    "outside": ({"tag_level": -999}, True, ["192.0.2.0/24"]),  # 127.0.0.1 is not originating here
}


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd, dns):
    """A private Postfix with one listener per signing milterd; sendmail(1) mail goes to "signing"."""
    base = tmp_path_factory.mktemp("signing")
    daemons.make_traversable(base)
    (base / "keys").mkdir()
    keys = ""
    for selector, kind in SELECTORS.items():
        path, record = generate_key(base / "keys", DOMAIN, selector, kind)
        dns.update({f"{selector}._domainkey.{DOMAIN}.": [["TXT", record]]})
        keys += f'[[signing.key]]\ndomain = "{DOMAIN}"\nselector = "{selector}"\nkey = "{path}"\n'
    dead = f"127.0.0.1:{daemons.free_port()}"

    def start(name):
        policy, alive, mynetworks = LISTENERS[name]
        config = write_config(
            base / name,
            clamav=str(clamd.socket_path),
            spamd=f"127.0.0.1:{spamd.port}" if alive else dead,
            policy=policy,
            dns=dns.nameserver,
            spamd_critical=not alive,  # a dead spamd that counts: the message is UNCHECKED
        )
        networks = f"mynetworks = {mynetworks!r}\n".replace("'", '"') if mynetworks else ""
        text = config.read_text().replace("[milter]\n", f"[milter]\n{networks}", 1)
        config.write_text(text + f"[signing]\nenabled = true\n{keys}")
        return start_milterd(config)

    with ThreadPoolExecutor(len(LISTENERS)) as pool:
        milterds = dict(zip(LISTENERS, pool.map(start, LISTENERS), strict=True))
    postfix = daemons.start_postfix(
        base / "postfix",
        {name: m.socket for name, m in milterds.items()},
        extra_main_cf={"non_smtpd_milters": milterds["signing"].socket},
    )
    yield postfix, milterds, Resolver([dns.nameserver], timeout=5)
    postfix.stop()
    stop_milterd(*milterds.values())


def send(mta, listener: str, body: bytes = b"Hello Bob, lunch on Thursday?", subject="report", extra=b"") -> bytes:
    sender = f"alice@{DOMAIN}"
    token = submit(mta, listener, body, subject=subject, extra=extra, sender=sender, from_header=f"Alice <{sender}>")
    return mta[0].wait_delivered(token)


def names(delivered: bytes) -> list[str]:
    head = delivered.split(b"\n\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.splitlines() if line[:1] not in (" ", "\t")]


def value(delivered: bytes, name: str) -> list[str]:
    head = delivered.split(b"\n\n", 1)[0].decode().replace("\n\t", " ").replace("\n ", " ")
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith(name.lower() + ":")]


def verify(mta, delivered: bytes) -> list[tuple[str, bool]]:
    """(selector, verified) for each DKIM-Signature of the delivered message, top first."""
    _, _, resolver = mta
    verifier = dkim.DKIM(delivered, minkey=1024)
    signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    return [
        (dkim.util.parse_tag_value(v)[b"s"].decode(), verifier.verify(idx=i, dnsfunc=resolver.dkim_txt))
        for i, v in enumerate(signatures)
    ]


def test_originating_mail_gets_rsa_and_ed25519_signatures_that_verify_as_delivered(mta):
    _, milterds, _ = mta
    delivered = send(mta, "signing", extra=b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, forged\r\n")
    assert verify(mta, delivered) == [("e2e-rsa", True), ("e2e-ed", True)]
    order = names(delivered)
    assert order.index("DKIM-Signature") < order.index("X-Spam-Flag")  # on top of milterd's headers
    assert value(delivered, "X-Spam-Flag") == ["NO"]  # the forged YES is gone, ours is there: both after signing
    [rsa, ed] = value(delivered, "DKIM-Signature")
    assert "a=rsa-sha256;" in rsa and "a=ed25519-sha256;" in ed and "c=relaxed/simple;" in rsa
    assert f"d={DOMAIN};" in rsa
    log = milterds["signing"].log.read_text()
    assert f"DKIM-signed: d={DOMAIN} s=e2e-rsa a=rsa-sha256, d={DOMAIN} s=e2e-ed a=ed25519-sha256" in log
    tampered = delivered.replace(b"Subject: report", b"Subject: invoice")
    assert [ok for _, ok in verify(mta, tampered)] == [False, False]


def test_the_subject_tag_is_made_before_signing(mta):
    delivered = send(mta, "unchecked", subject="quarterly report")
    assert value(delivered, "Subject") == ["***UNCHECKED*** quarterly report"]
    assert verify(mta, delivered) == [("e2e-rsa", True), ("e2e-ed", True)]


def test_mail_submitted_with_sendmail_is_originating_and_signed(mta):
    postfix, _, _ = mta
    token = new_token()
    subprocess.run(
        ["/usr/sbin/sendmail", "-C", str(postfix.config_directory), "-f", f"alice@{DOMAIN}", "user@example.com"],
        input=f"From: alice@{DOMAIN}\nTo: user@example.com\nSubject: cron\n\n".encode() + token + b"\n",
        check=True,
        timeout=30,
    )
    delivered = postfix.wait_delivered(token)
    assert verify(mta, delivered) == [("e2e-rsa", True), ("e2e-ed", True)]


def test_a_client_outside_mynetworks_is_not_signed(mta):
    delivered = send(mta, "outside")
    assert value(delivered, "DKIM-Signature") == [] and value(delivered, "X-Spam-Flag") == ["NO"]


def test_spam_is_delivered_tagged_but_never_signed(mta):
    delivered = send(mta, "signing", body=GTUBE, subject="cheap pills")
    assert value(delivered, "Subject") == ["***SPAM*** cheap pills"]
    assert value(delivered, "DKIM-Signature") == []


def test_simple_canonicalization_over_headers_as_sent_verifies(mta):
    """SMFIP_HDR_LEADSPC: "Subject:x" and a header with two spaces reach the verifier exactly as sent,
    so a simple/simple signature over them passes (milterd used to rebuild them as "Subject: x")."""
    postfix, milterds, _ = mta
    sender = f"bob@{DOMAIN}"
    token = new_token()
    raw = (
        (
            f"From: Bob <{sender}>\r\nTo: user@example.com\r\nSubject:x\r\nX-Two:  two spaces\r\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{token.decode()}@{DOMAIN}>\r\n\r\n"
        ).encode()
        + b"Hello.\r\n"
        + token
        + b"\r\n"
    )
    key = (Path(postfix.config_directory).parents[1] / "keys" / f"{DOMAIN}.e2e-rsa.key").read_bytes()
    signature = dkim.sign(
        raw, b"e2e-rsa", DOMAIN.encode(), key, canonicalize=(b"simple", b"simple"),
        include_headers=[b"from", b"to", b"subject", b"x-two", b"date", b"message-id"],
    )  # fmt: skip
    with smtplib.SMTP("127.0.0.1", postfix.ports["outside"], timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.docmd("XCLIENT", "ADDR=198.51.100.1 NAME=mail.remote.test")[0] == 220  # not originating
        smtp.ehlo("mail.remote.test")
        smtp.sendmail(sender, ["user@example.com"], signature + raw)
    delivered = postfix.wait_delivered(token)
    results = " ".join(value(delivered, "Authentication-Results"))
    assert f"dkim=pass header.d={DOMAIN}" in results and "header.s=e2e-rsa" in results
    assert b"\nSubject:x\n" in delivered.replace(b"\r\n", b"\n") and b"X-Two:  two spaces" in delivered
