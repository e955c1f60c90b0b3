"""Authentication-Results: what milterd writes, and which incoming copies it removes (RFC 8601)."""

from __future__ import annotations

import pytest

from milterd.authresults import claims_our_id, header_value
from milterd.findings import DkimResult, Finding, SpfResult
from milterd.policy import Policy, decide


def test_dkim_and_spf_results_in_one_header():
    value = header_value(
        "mx.example.net",
        [DkimResult("pass", "example.org", "sel", "rsa-sha256"), DkimResult("fail", "bank.example", "s2")],
        SpfResult("softfail", "mailfrom", "example.org"),
    )
    assert value == (
        "mx.example.net; dkim=pass header.d=example.org header.a=rsa-sha256 header.s=sel;"
        " dkim=fail header.d=bank.example header.s=s2; spf=softfail smtp.mailfrom=example.org"
    )


def test_no_signature_is_dkim_none_and_helo_identity():
    assert header_value("mx", [], SpfResult("pass", "helo", "client.example")) == (
        "mx; dkim=none; spf=pass smtp.helo=client.example"
    )


def test_nothing_verified_means_no_header():
    assert header_value("mx", None, None) is None


@pytest.mark.parametrize(
    "value, ours",
    [
        ("mx.example.net; dkim=pass header.d=bank.example", True),
        ("MX.Example.NET 1; spf=pass", True),
        ("(forged) mx.example.net; none", True),
        ("mx.example.net.evil; none", False),
        ("other.example; dkim=pass", False),
        ("", False),
        ("   ;;;", False),
    ],
)
def test_which_incoming_headers_claim_our_authserv_id(value, ours):
    assert claims_our_id(value, "mx.example.net") is ours


def test_the_verdict_carries_the_header_for_any_recipient():
    findings = {
        "dkim": Finding("dkim", "ok", dkim=(DkimResult("pass", "example.org", "sel"),)),
        "spf": Finding("spf", "ok", spf=SpfResult("pass", "mailfrom", "example.org")),
    }
    verdict = decide(findings, Policy(local=False), sender="a@example.org", hostname="mx.example.net")
    assert dict(verdict.headers)["Authentication-Results"] == (
        "mx.example.net; dkim=pass header.d=example.org header.s=sel; spf=pass smtp.mailfrom=example.org"
    )


def test_a_skipped_dkim_check_writes_no_dkim_result():
    findings = {"dkim": Finding("dkim", "skipped", detail="larger than max_size")}
    verdict = decide(findings, Policy(), sender="", hostname="mx")
    assert "Authentication-Results" not in dict(verdict.headers)


def test_dmarc_in_the_header_and_reject_only_when_the_policy_asks():
    from milterd.findings import DmarcResult

    findings = {"dmarc": Finding("dmarc", "ok", dmarc=DmarcResult("fail", "bank.example", "reject", "reject"))}
    passed = decide(findings, Policy(), sender="a@x.test", hostname="mx")
    assert passed.action == "accept"
    header = dict(passed.headers)["Authentication-Results"]
    assert header == "mx; dmarc=fail header.from=bank.example policy.dmarc=reject"
    refused = decide(findings, Policy(dmarc_reject=True), sender="a@x.test", hostname="mx")
    assert refused.action == "reject"
    assert str(refused.reply) == "550 5.7.1 Rejected: DMARC policy of bank.example is reject"
    quarantine = {"dmarc": Finding("dmarc", "ok", dmarc=DmarcResult("fail", "x.example", "quarantine", "quarantine"))}
    assert decide(quarantine, Policy(dmarc_reject=True), sender="", hostname="mx").action == "accept"
