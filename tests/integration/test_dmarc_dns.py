"""DMARC through the pipeline (DKIM, SPF, then DMARC on their findings) against the real test DNS server.

Every domain is under a top-level label unique to this run: an unknown TLD is a one-label public
suffix, so <name>.<TLD> is an organizational domain of this module's own, and no answer is another
module's record. Failures use SERVFAIL (immediate), never timeouts.
"""

from __future__ import annotations

import uuid

import pytest

from milterd.checks.dkim import DkimCheck
from milterd.checks.dmarc import DmarcCheck
from milterd.checks.spf import SpfCheck
from milterd.dns import Resolver
from milterd.pipeline import Pipeline
from tests import dkimkeys
from tests.conftest import write_config
from tests.integration.test_auth_dns import message, scan

TLD = f"t{uuid.uuid4().hex[:12]}"
ORG = f"org.{TLD}"  # p=reject; sp=quarantine, SPF for 192.0.2.0/24
PLAIN = f"plain.{TLD}"  # p=reject, no sp
OTHER = f"other.{TLD}"  # a third party that signs and has no DMARC record
CLIENT, STRANGER = "192.0.2.1", "198.51.100.1"


@pytest.fixture(scope="module")
def nameserver(dns) -> str:
    rsa = dkimkeys.rsa().record
    dns.update(
        {
            f"_dmarc.{ORG}.": [["TXT", "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@org.example"]],
            f"_dmarc.own.{ORG}.": [["TXT", "v=DMARC1; p=none"], ["TXT", "some other text"]],
            f"_dmarc.{PLAIN}.": [["TXT", "v=DMARC1; p=reject"]],
            f"_dmarc.broken.{TLD}.": [["SERVFAIL", ""]],
            f"{ORG}.": [["TXT", "v=spf1 ip4:192.0.2.0/24 -all"]],
            f"bounces.{ORG}.": [["TXT", "v=spf1 ip4:192.0.2.0/24 -all"]],
            f"{PLAIN}.": [["TXT", "v=spf1 ip4:192.0.2.0/24 -all"]],
            f"rsa._domainkey.{ORG}.": [["TXT", rsa]],
            f"rsa._domainkey.mail.{ORG}.": [["TXT", rsa]],
            f"rsa._domainkey.{OTHER}.": [["TXT", rsa]],
            f"rsa._domainkey.norecord.{TLD}.": [["TXT", rsa]],
        }
    )
    return dns.nameserver


@pytest.fixture(scope="module")
def pipeline(nameserver):
    resolver = Resolver([nameserver], timeout=2)
    checks = [DkimCheck(resolver.dkim_txt, 5), SpfCheck(resolver.spf_lookup, 5), DmarcCheck(resolver.lookup, 5)]
    pipeline = Pipeline(checks, 4)
    yield pipeline
    pipeline.shutdown()


def dmarc(pipeline, author: str, signer: str | None = None, sender: str = "", client_ip: str = CLIENT):
    """The DMARC result of a message from `author`, signed by `signer` when given, sent from `sender`."""
    data = dkimkeys.message(sender=author)
    if signer:
        data = dkimkeys.sign(data, dkimkeys.rsa(), signer, "rsa")
    findings = pipeline.run(message(data, mail_from=sender, client_ip=client_ip, helo=f"mx.{OTHER}"))
    assert findings["dmarc"].status == "ok", findings["dmarc"].detail
    return findings["dmarc"].data


def test_aligned_dkim_passes(pipeline):
    got = dmarc(pipeline, f"alice@{ORG}", signer=f"mail.{ORG}", sender=f"bounce@{OTHER}", client_ip=STRANGER)
    assert (got.result, got.domain, got.policy, got.disposition) == ("pass", ORG, "reject", "none")
    assert got.detail == f"aligned: dkim d=mail.{ORG}"


def test_aligned_spf_passes(pipeline):
    got = dmarc(pipeline, f"alice@{ORG}", sender=f"b@bounces.{ORG}")
    assert (got.result, got.detail) == ("pass", f"aligned: spf bounces.{ORG}")


def test_unaligned_dkim_and_failing_spf_fail_with_the_reject_policy(pipeline):
    got = dmarc(pipeline, f"alice@{PLAIN}", signer=OTHER, sender=f"alice@{PLAIN}", client_ip=STRANGER)
    assert (got.result, got.domain, got.policy, got.disposition) == ("fail", PLAIN, "reject", "reject")
    assert got.detail == f"no aligned DKIM or SPF pass: dkim pass d={OTHER} (not aligned), spf fail {PLAIN}"


def test_a_subdomain_gets_sp_from_the_organizational_domain(pipeline):
    got = dmarc(pipeline, f"alice@news.{ORG}", signer=OTHER, sender=f"bounce@{OTHER}")
    assert (got.result, got.domain, got.policy, got.disposition) == ("fail", f"news.{ORG}", "quarantine", "quarantine")


def test_the_organizational_domains_record_serves_a_subdomain_and_relaxed_alignment(pipeline):
    got = dmarc(pipeline, f"alice@deep.news.{ORG}", signer=ORG, sender=f"bounce@{OTHER}")
    assert (got.result, got.policy, got.disposition) == ("pass", "quarantine", "none")


def test_a_subdomains_own_record_wins(pipeline):
    got = dmarc(pipeline, f"alice@own.{ORG}", sender=f"bounce@{OTHER}")
    assert (got.result, got.policy, got.disposition) == ("fail", "none", "none")


def test_no_record_is_none(pipeline):
    got = dmarc(pipeline, f"alice@norecord.{TLD}", signer=f"norecord.{TLD}")
    assert (got.result, got.policy, got.disposition) == ("none", "", "none")
    assert got.detail == f"no DMARC record at _dmarc.norecord.{TLD}"  # norecord.<TLD> is its own org domain


def test_servfail_at_dmarc_is_temperror(pipeline):
    got = dmarc(pipeline, f"alice@sub.broken.{TLD}", sender=f"bounce@{OTHER}")
    assert got.result == "temperror" and "SERVFAIL" in got.detail and got.domain == f"sub.broken.{TLD}"


def test_scan_reports_dmarc_in_json_and_authentication_results(nameserver, tmp_path):
    config = write_config(tmp_path, clamav="/nonexistent", spamd="127.0.0.1:1", dns=nameserver)
    signed = dkimkeys.sign(dkimkeys.message(sender=f"alice@{ORG}"), dkimkeys.rsa(), f"mail.{ORG}", "rsa")
    record, _ = scan(config, signed, CLIENT)
    assert record["checks"]["dmarc"]["status"] == "ok"
    assert record["checks"]["dmarc"]["dmarc"] == {
        "result": "pass",
        "domain": ORG,
        "policy": "reject",
        "disposition": "none",
        "detail": f"aligned: dkim d=mail.{ORG}, spf {ORG}",  # scan takes the envelope sender from From
    }
    [authentication] = [value for name, value in record["headers"] if name == "Authentication-Results"]
    assert f"dmarc=pass header.from={ORG}" in authentication


def test_two_from_domains_one_failing_under_reject_is_a_reject(pipeline):
    """RFC 7489 6.6.1: each From domain is evaluated and the strictest result applies."""
    data = dkimkeys.message(sender=f"alice@{ORG}").replace(
        f"From: Alice <alice@{ORG}>".encode(), f"From: Alice <alice@{ORG}>, CEO <ceo@{PLAIN}>".encode()
    )
    signed = dkimkeys.sign(data, dkimkeys.rsa(), f"mail.{ORG}", "rsa")  # aligned with ORG only
    findings = pipeline.run(message(signed, mail_from=f"bounce@{OTHER}", client_ip=STRANGER, helo=f"mx.{OTHER}"))
    finding = findings["dmarc"]
    got = finding.data
    assert (got.result, got.domain, got.policy, got.disposition) == ("fail", PLAIN, "reject", "reject")
    assert finding.policy_reject == f"DMARC policy of {PLAIN} is reject"
    assert got.detail.endswith(f"; other From domains: {ORG} pass")
    assert [s for s, _ in finding.symbols] == ["DMARC_REJECT"]
