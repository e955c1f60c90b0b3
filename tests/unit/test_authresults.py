"""Authentication-Results: what milterd writes, and which incoming copies it removes (RFC 8601)."""

from __future__ import annotations

import pytest

from milterd import render
from milterd.authresults import claims_our_id, header_value
from milterd.checks.dkim import DkimResult
from milterd.checks.dmarc import DmarcCheck, DmarcResult
from milterd.checks.spf import SpfResult
from milterd.findings import Finding, summarize
from milterd.policy import Category, Policy, Verdict, decide


def decided(findings: dict[str, Finding], policy: Policy, hostname: str) -> tuple[Verdict, dict[str, str]]:
    """The verdict and the headers a passed message gets (as the engine renders them)."""
    found = summarize(findings)
    verdict = decide(found, policy)
    return verdict, dict(render.rendered(found, policy, verdict, hostname)[0])


def dmarc(result: str, domain: str, policy: str, disposition: str) -> Finding:
    """The DMARC check's finding for this result (its points, and a reject asked for by p=reject)."""
    return DmarcCheck(lambda *_: [])._finding({}, DmarcResult(result, domain, policy, disposition))  # type: ignore[arg-type]


def test_dkim_and_spf_results_in_one_header():
    value = header_value(
        "mx.example.net",
        [
            DkimResult("pass", "example.org", "sel", "rsa-sha256"),
            DkimResult("fail", "bank.example", "s2"),
            SpfResult("softfail", "mailfrom", "example.org"),
        ],
    )
    assert value == (
        "mx.example.net; dkim=pass header.d=example.org header.a=rsa-sha256 header.s=sel;"
        " dkim=fail header.d=bank.example header.s=s2; spf=softfail smtp.mailfrom=example.org"
    )


def test_no_signature_is_dkim_none_and_helo_identity():
    assert header_value("mx", [DkimResult("none", "", ""), SpfResult("pass", "helo", "client.example")]) == (
        "mx; dkim=none; spf=pass smtp.helo=client.example"
    )


def test_nothing_verified_means_no_header():
    assert header_value("mx", []) is None


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
        "dkim": Finding("dkim", "ok", authentication=(DkimResult("pass", "example.org", "sel"),)),
        "spf": Finding("spf", "ok", authentication=(SpfResult("pass", "mailfrom", "example.org"),)),
    }
    _, headers = decided(findings, Policy(local=False), "mx.example.net")
    assert headers["Authentication-Results"] == (
        "mx.example.net; dkim=pass header.d=example.org header.s=sel; spf=pass smtp.mailfrom=example.org"
    )


def test_a_skipped_dkim_check_writes_no_dkim_result():
    findings = {"dkim": Finding("dkim", "skipped", detail="larger than max_size")}
    _, headers = decided(findings, Policy(), "mx")
    assert "Authentication-Results" not in headers


def test_dmarc_in_the_header_and_reject_only_when_the_policy_asks():
    findings = {"dmarc": dmarc("fail", "bank.example", "reject", "reject")}
    assert findings["dmarc"].authentication == (DmarcResult("fail", "bank.example", "reject", "reject"),)
    passed, headers = decided(findings, Policy(), "mx")
    assert passed.action == "accept"
    header = headers["Authentication-Results"]
    assert header == "mx; dmarc=fail header.from=bank.example policy.dmarc=reject"
    refused = decide(summarize(findings), Policy(dmarc_reject=True))
    assert refused.action == "reject"
    assert str(refused.reply) == "550 5.7.1 Rejected: DMARC policy of bank.example is reject"
    assert refused.category is Category.SPAM  # the domain owner's reject is a spam verdict
    quarantine = {"dmarc": dmarc("fail", "x.example", "quarantine", "quarantine")}
    assert decide(summarize(quarantine), Policy(dmarc_reject=True)).action == "accept"
