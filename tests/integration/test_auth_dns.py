"""DKIM and SPF through milterd's resolver against the real test DNS server (tests/dnsserver.py).

Every name is under a token unique to this run, so the session server can hold other modules' names
and no answer is ever a leftover. Failures use SERVFAIL (immediate); the one TIMEOUT test uses a
short [dns] timeout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from milterd.checks.dkim import DkimCheck
from milterd.checks.spf import SpfCheck
from milterd.dns import Resolver
from milterd.message import Envelope, Message, Spool
from tests import dkimkeys
from tests.conftest import MILTERD, write_config

RUN = uuid.uuid4().hex[:12]
SIGNER = f"{RUN}.dkim.test"  # d= of the signatures
SPF = f"{RUN}.spf.test"


def spf_domain(name: str) -> str:
    return f"{name}.{SPF}"


@pytest.fixture(scope="module")
def nameserver(dns) -> str:
    """The session DNS server with this module's names, as milterd's [dns] nameservers takes it."""
    dns.update(
        {
            f"rsa._domainkey.{SIGNER}.": [["TXT", dkimkeys.rsa().record]],
            f"ed._domainkey.{SIGNER}.": [["TXT", dkimkeys.ed25519().record]],
            f"esp._domainkey.{SIGNER}.": [["CNAME", f"key.esp.{SIGNER}."]],
            f"key.esp.{SIGNER}.": [["TXT", dkimkeys.rsa().record]],
            f"revoked._domainkey.{SIGNER}.": [["TXT", "v=DKIM1; p="]],
            f"nodata._domainkey.{SIGNER}.": [["A", "192.0.2.1"]],
            f"broken._domainkey.{SIGNER}.": [["SERVFAIL", ""]],
            f"{spf_domain('pass')}.": [
                ["TXT", f"v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 mx a:a.{SPF} -all"],
                ["MX", f"10 mx.{spf_domain('pass')}."],
            ],
            f"mx.{spf_domain('pass')}.": [["A", "198.51.100.25"]],
            f"a.{SPF}.": [["A", "198.51.100.26"]],
            f"{spf_domain('fail')}.": [["TXT", "v=spf1 ip4:192.0.2.0/24 -all"]],
            f"{spf_domain('softfail')}.": [["TXT", "v=spf1 ip4:192.0.2.0/24 ~all"]],
            f"{spf_domain('neutral')}.": [["TXT", "v=spf1 ?all"]],
            f"{spf_domain('nospf')}.": [["TXT", "google-site-verification=abc"]],
            f"{spf_domain('many')}.": [
                ["TXT", "v=spf1 " + " ".join(f"include:i{n}.{SPF}" for n in range(11)) + " -all"]
            ],
            **{f"i{n}.{SPF}.": [["TXT", "v=spf1 ip4:203.0.113.1 -all"]] for n in range(11)},
            f"{spf_domain('servfail')}.": [["SERVFAIL", ""]],
            f"{spf_domain('include-servfail')}.": [["TXT", f"v=spf1 include:{spf_domain('servfail')} -all"]],
            f"{spf_domain('timeout')}.": [["TIMEOUT", ""]],
            f"{spf_domain('helo')}.": [["TXT", "v=spf1 ip4:192.0.2.25 -all"]],
        }
    )
    return dns.nameserver


def message(data: bytes, **envelope) -> Message:
    spool = Spool()
    spool.write(data)
    return Message(Envelope(**envelope), spool)


# --------------------------------------------------------------------------- DKIM


def dkim_results(nameserver: str, data: bytes) -> list[tuple[str, str, str]]:
    finding = DkimCheck(Resolver([nameserver], timeout=2).dkim_txt, timeout=5).run(message(data))
    assert finding.status == "ok"
    return [(d.result, d.selector, d.detail) for d in finding.data]


def test_dkim_pass_with_a_2048_bit_key_split_over_txt_strings(nameserver):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), SIGNER, "rsa")
    assert dkim_results(nameserver, signed) == [("pass", "rsa", "")]


def test_dkim_pass_ed25519_and_a_key_behind_a_cname(nameserver):
    signed = dkimkeys.sign(
        dkimkeys.sign(dkimkeys.message(), dkimkeys.ed25519(), SIGNER, "ed"), dkimkeys.rsa(), SIGNER, "esp"
    )
    assert dkim_results(nameserver, signed) == [("pass", "esp", ""), ("pass", "ed", "")]


def test_dkim_fail_when_the_body_changed(nameserver):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), SIGNER, "rsa")
    assert dkim_results(nameserver, signed + b"one more line\r\n") == [("fail", "rsa", "body hash mismatch")]


@pytest.mark.parametrize(
    "selector,detail",
    [
        ("absent", f"no key record at absent._domainkey.{SIGNER}."),  # NXDOMAIN
        ("nodata", f"no key record at nodata._domainkey.{SIGNER}."),  # the name exists, without TXT
        ("revoked", f"key revoked (empty p=) at revoked._domainkey.{SIGNER}."),
    ],
)
def test_dkim_permerror_for_a_missing_or_revoked_key(nameserver, selector, detail):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), SIGNER, selector)
    assert dkim_results(nameserver, signed) == [("permerror", selector, detail)]


def test_dkim_temperror_when_the_key_lookup_gets_servfail(nameserver):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), SIGNER, "broken")
    [(result, _, detail)] = dkim_results(nameserver, signed)
    assert result == "temperror" and "SERVFAIL" in detail


# --------------------------------------------------------------------------- SPF


def spf_result(nameserver: str, sender: str, client_ip: str, helo: str = "mail.sender.test", dns_timeout=2.0):
    check = SpfCheck(Resolver([nameserver], timeout=dns_timeout).spf_lookup, timeout=5)
    finding = check.run(message(b"", mail_from=sender, client_ip=client_ip, helo=helo))
    assert finding.status == "ok"
    return finding.data


@pytest.mark.parametrize(
    "name,client_ip,result",
    [
        ("pass", "192.0.2.1", "pass"),
        ("pass", "2001:db8::25", "pass"),
        ("pass", "198.51.100.25", "pass"),  # mx: the MX host's A record
        ("pass", "198.51.100.26", "pass"),  # a:a.<domain>
        ("fail", "198.51.100.1", "fail"),
        ("softfail", "198.51.100.1", "softfail"),
        ("neutral", "198.51.100.1", "neutral"),
        ("nospf", "198.51.100.1", "none"),  # TXT records, none of them SPF
        ("nxdomain", "198.51.100.1", "none"),
        ("many", "198.51.100.1", "permerror"),  # 11 include: lookups
        ("servfail", "198.51.100.1", "temperror"),
        ("include-servfail", "198.51.100.1", "temperror"),
    ],
)
def test_spf_for_the_envelope_sender(nameserver, name, client_ip, result):
    got = spf_result(nameserver, f"user@{spf_domain(name)}", client_ip)
    assert (got.result, got.identity, got.domain) == (result, "mailfrom", spf_domain(name)), got.detail


def test_spf_null_sender_is_checked_against_the_helo_name(nameserver):
    got = spf_result(nameserver, "", "192.0.2.25", helo=spf_domain("helo"))
    assert (got.result, got.identity, got.domain) == ("pass", "helo", spf_domain("helo"))


def test_spf_a_dns_timeout_is_temperror_within_the_dns_timeout(nameserver):
    t0 = time.monotonic()
    got = spf_result(nameserver, f"user@{spf_domain('timeout')}", "192.0.2.1", dns_timeout=0.5)
    assert got.result == "temperror" and "no answer in 0.5s" in got.detail
    assert time.monotonic() - t0 < 1.5


# --------------------------------------------------------------------------- milterd scan


def scan(config: Path, data: bytes, client_ip: str) -> tuple[dict, str]:
    """`milterd scan -v --json` of one message: its record and the log line."""
    text = config.read_text().replace("[clamav]\n", "[clamav]\nenabled = false\n")
    config.write_text(text.replace("[spamd]\n", "[spamd]\nenabled = false\n"))
    (config.parent / "m.eml").write_bytes(data)
    result = subprocess.run(
        [MILTERD, "scan", "--config", str(config), "--json", "-v", "--client-ip", client_ip, config.parent / "m.eml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_scan_json_carries_dkim_spf_and_the_authentication_results_header(nameserver, tmp_path):
    config = write_config(tmp_path, clamav="/nonexistent", spamd="127.0.0.1:1", dns=nameserver)
    sender = f"alice@{spf_domain('pass')}"
    record, log = scan(
        config, dkimkeys.sign(dkimkeys.message(sender=sender), dkimkeys.rsa(), SIGNER, "rsa"), "192.0.2.1"
    )
    assert record["dkim"] == [{"result": "pass", "domain": SIGNER, "selector": "rsa", "algorithm": "rsa-sha256"}]
    assert record["spf"]["result"] == "pass" and record["spf"]["domain"] == spf_domain("pass")
    assert record["checks"]["dkim"]["status"] == record["checks"]["spf"]["status"] == "ok"
    [authentication] = [value for name, value in record["headers"] if name == "Authentication-Results"]
    assert f"dkim=pass header.d={SIGNER}" in authentication and "spf=pass" in authentication
    assert f"auth=[dkim=pass/{SIGNER} spf=pass/{spf_domain('pass')} dmarc=none/{spf_domain('pass')}]" in log


def test_scan_with_a_dead_resolver_costs_the_dns_timeout_and_says_temperror(tmp_path):
    """Nothing answers on the nameserver's port: the message waits [dns] timeout, once, and is delivered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        config = write_config(
            tmp_path, clamav="/nonexistent", spamd="127.0.0.1:1", dns=f"127.0.0.1:{silent.getsockname()[1]}"
        )
        config.write_text(config.read_text().replace("[dns]\n", "[dns]\ntimeout = 0.5\n"))
        sender = f"alice@{spf_domain('pass')}"
        signed = dkimkeys.sign(dkimkeys.message(sender=sender), dkimkeys.rsa(), SIGNER, "rsa")
        record, log = scan(config, signed, "192.0.2.1")
    assert [d["result"] for d in record["dkim"]] == ["temperror"] and record["spf"]["result"] == "temperror"
    assert record["category"] == "CLEAN" and record["action"] == "accept"
    assert record["checks"]["dkim"]["time_ms"] < 1500 and record["checks"]["spf"]["time_ms"] < 1500
    sender = spf_domain("pass")
    assert f"auth=[dkim=temperror/{SIGNER} spf=temperror/{sender} dmarc=temperror/{sender}]" in log
