"""Authentication points: SpamAssassin's names and scores, tuned in rules/scores.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd.findings import DkimResult, DmarcResult, Finding, SpfResult
from milterd.policy import Policy, decide
from milterd.rules import load_rules
from milterd.scores import Scores, authentication_points, parse_scores
from milterd.tomlschema import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "rules"


def findings(spf=None, dkim=None, dmarc=None) -> dict[str, Finding]:
    out = {}
    if dkim is not None:
        out["dkim"] = Finding("dkim", "ok", dkim=tuple(dkim))
    if spf is not None:
        out["spf"] = Finding("spf", "ok", spf=spf)
    if dmarc is not None:
        out["dmarc"] = Finding("dmarc", "ok", dmarc=dmarc)
    return out


def test_the_shipped_scores_are_the_defaults():
    assert load_rules(SHIPPED).scores == Scores()


def test_spf_softfail_and_an_author_signature():
    points = authentication_points(
        findings(
            spf=SpfResult("softfail", "mailfrom", "example.org"),
            dkim=[DkimResult("pass", "example.org", "s")],
            dmarc=DmarcResult("pass", "example.org", "reject"),
        ),
        Scores(),
    )
    assert points.symbols == (
        ("SPF_SOFTFAIL", 0.972),
        ("DKIM_SIGNED", 0.1),
        ("DKIM_VALID", -0.1),
        ("DKIM_VALID_AU", -0.1),
        ("DMARC_PASS", -0.001),
    )
    assert points.score == 0.871


def test_failed_dmarc_scores_by_disposition_and_unsigned_mail_has_no_dkim_points():
    points = authentication_points(
        findings(dkim=[], dmarc=DmarcResult("fail", "bank.example", "reject", "reject")), Scores()
    )
    assert points.symbols == (("DMARC_REJECT", 1.797),)


def test_listed_domains_and_the_helo_identity():
    scores = parse_scores({"dkim_domains": {"PayPal.com": -5}, "spf_helo": {"pass": -1}}, Path("scores.toml"))
    points = authentication_points(
        findings(spf=SpfResult("pass", "helo", "mx.paypal.com"), dkim=[DkimResult("pass", "paypal.com", "s")]),
        scores,
    )
    assert ("DKIM_DOMAIN_paypal.com", -5.0) in points.symbols and ("SPF_HELO_PASS", -1.0) in points.symbols


def test_nothing_verified_adds_nothing():
    assert authentication_points({}, Scores()) is None


def test_points_reach_x_spam_status_beside_spamassassins():
    found = findings(spf=SpfResult("fail", "mailfrom", "example.org"))
    found["spamd"] = Finding("spamd", "ok", score=1.5, symbols=(("HTML_MESSAGE", 1.5),))
    found["scores"] = authentication_points(found, Scores())
    verdict = decide(found, Policy(tag_level=-999, local=True), sender="a@example.org", hostname="mx")
    status = dict(verdict.headers)["X-Spam-Status"]
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
