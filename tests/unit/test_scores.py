"""Authentication points: SpamAssassin's names and scores, each scored by its own check, tuned in rules/scores.toml."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from milterd import render
from milterd.checks.dkim import DkimCheck, DkimResult
from milterd.checks.dmarc import DmarcCheck, DmarcResult
from milterd.checks.spf import SpfCheck, SpfResult
from milterd.findings import Finding, summarize
from milterd.policy import Policy, decide
from milterd.rules import load_rules
from milterd.scores import Scores, default_scores, parse_scores
from milterd.tomlschema import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "rules"


def no_dns(*_args, **_kwargs):
    raise AssertionError("scoring looks nothing up")


@cache
def _dmarc_check() -> DmarcCheck:
    """One DmarcCheck for the default scores: the Public Suffix List is read once."""
    return DmarcCheck(no_dns)


def findings(spf=None, dkim=None, dmarc=None, scores: Scores | None = None) -> dict[str, Finding]:
    """The DKIM, SPF and DMARC checks' findings for these results, in check order, scored by the
    checks themselves. `dmarc`: (result, From domain, policy, disposition)."""
    out = {}
    if dkim is not None:
        check = DkimCheck(no_dns, points=scores and scores["dkim"], domain_points=scores and scores["dkim_domains"])
        out["dkim"] = check._ok(tuple(dkim))
    if spf is not None:
        out["spf"] = SpfCheck(no_dns, points=scores)._ok(spf)
    if dmarc is not None:
        check = _dmarc_check() if scores is None else DmarcCheck(no_dns, points=scores)
        out["dmarc"] = check._finding(dict(out), DmarcResult(*dmarc))
    return out


def test_the_shipped_scores_are_the_defaults():
    assert load_rules(SHIPPED).scores == default_scores()


def test_spf_softfail_and_an_author_signature():
    found = summarize(
        findings(
            spf=SpfResult("softfail", "mailfrom", "example.org"),
            dkim=[DkimResult("pass", "example.org", "s")],
            dmarc=("pass", "example.org", "reject"),
        )
    )
    assert found.symbols == (
        ("DKIM_SIGNED", 0.1),
        ("DKIM_VALID", -0.1),
        ("SPF_SOFTFAIL", 0.972),
        ("DKIM_VALID_AU", -0.1),
        ("DMARC_PASS", -0.001),
    )
    assert found.score == 0.871


def test_failed_dmarc_scores_by_disposition_and_unsigned_mail_has_no_dkim_points():
    found = summarize(findings(dkim=[], dmarc=("fail", "bank.example", "reject", "reject")))
    assert found.symbols == (("DMARC_REJECT", 1.797),)


def test_listed_domains_and_the_helo_identity():
    scores = parse_scores({"dkim_domains": {"PayPal.com": -5}, "spf_helo": {"pass": -1}}, Path("scores.toml"))
    symbols = summarize(
        findings(
            spf=SpfResult("pass", "helo", "mx.paypal.com"),
            dkim=[DkimResult("pass", "paypal.com", "s")],
            scores=scores,
        )
    ).symbols
    assert ("DKIM_DOMAIN_paypal.com", -5.0) in symbols and ("SPF_HELO_PASS", -1.0) in symbols


def test_the_dmarc_check_reads_its_own_and_the_dkim_valid_author_points():
    scores = parse_scores({"dkim": {"valid_author": -2}, "dmarc": {"pass": -0.5}}, Path("scores.toml"))
    found = findings(
        dkim=[DkimResult("pass", "example.org", "s")], dmarc=("pass", "example.org", "reject"), scores=scores
    )
    assert found["dmarc"].symbols == (("DKIM_VALID_AU", -2.0), ("DMARC_PASS", -0.5))


def test_nothing_verified_adds_nothing():
    unsigned = findings(dkim=[])
    assert (unsigned["dkim"].score, unsigned["dkim"].symbols) == (None, ())
    assert summarize(unsigned).score is None


def test_points_reach_x_spam_status_beside_spamassassins():
    found = {"spamd": Finding("spamd", "ok", score=1.5, symbols=(("HTML_MESSAGE", 1.5),))}
    found |= findings(spf=SpfResult("fail", "mailfrom", "example.org"))
    summary, policy = summarize(found), Policy(tag_level=-999, local=True)
    headers = render.added_headers(summary, policy, decide(summary, policy), "mx")
    status = dict(headers)["X-Spam-Status"]
    assert "score=2.419" in status and "HTML_MESSAGE=1.5, SPF_FAIL=0.919" in status


@pytest.mark.parametrize(
    "data, message",
    [
        ({"spf": {"fial": 1}}, "unknown key spf.fial"),
        ({"spf": {"fail": "high"}}, "must be a number"),
        ({"rbl": {}}, "unknown table"),
        ({"dkim": 3}, "must be a table"),
    ],
)
def test_mistakes_name_the_file_and_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_scores(data, Path("scores.toml"))
