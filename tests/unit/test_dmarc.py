"""DMARC against a stubbed resolver: From parsing, record parsing, policy discovery, alignment, results."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from milterd.checks import Check, build_checks
from milterd.checks.dkim import UNSIGNED, DkimResult
from milterd.checks.dmarc import (
    MAX_FROM_DOMAINS,
    DmarcCheck,
    DmarcResult,
    DmarcSettings,
    FromError,
    Record,
    RecordError,
    Skipped,
    from_domains,
    parse_record,
    strictest,
)
from milterd.checks.spf import SpfResult
from milterd.config import load_config
from milterd.dns import DnsError
from milterd.findings import Finding
from milterd.message import Envelope, Message, Spool
from milterd.pipeline import Pipeline


class Zone:
    """Resolver.lookup as a stub: TXT records by name ([] for any other), DnsError for names in `failing`."""

    def __init__(self, records: dict[str, list[str]], failing: tuple[str, ...] = ()):
        self.records, self.failing = records, failing
        self.asked: list[str] = []

    def __call__(self, name: str, rdtype: str, timeout: float | None = None) -> list:
        assert rdtype == "TXT" and name.endswith(".")
        self.asked.append(name)
        if name in self.failing:
            raise DnsError(f"{name} TXT: SERVFAIL")
        if timeout is not None and timeout <= 0:
            raise DnsError("no time left for the lookup")
        return [
            SimpleNamespace(strings=(value[:255].encode(), value[255:].encode()))
            for value in self.records.get(name, [])
        ]


def message(headers: str, **envelope) -> Message:
    data = headers.replace("\n", "\r\n").encode() + b"\r\nbody\r\n"
    return Message(Envelope(**{"client_ip": "192.0.2.1", **envelope}), Spool.copy_of(io.BytesIO(data)))


def dkim(*signatures: tuple[str, str]) -> Finding:
    """A DKIM finding as DkimCheck makes it: the results as `data`, and as `authentication` (dkim=none unsigned)."""
    results = tuple(DkimResult(result, domain, "sel") for result, domain in signatures)
    return Finding("dkim", "ok", authentication=results or (UNSIGNED,), data=results)


def spf(result: str, domain: str, identity: str = "mailfrom") -> Finding:
    spf_result = SpfResult(result, identity, domain)
    return Finding("spf", "ok", authentication=(spf_result,), data=spf_result)


def evaluate(records: dict[str, list[str]], sender: str, dkim_finding=None, spf_finding=None, failing=(), **envelope):
    """The check's finding for a message from `sender`, given the DKIM and SPF findings."""
    check = DmarcCheck(Zone(records, failing), timeout=2)
    earlier = {"dkim": dkim_finding or dkim(), "spf": spf_finding or spf("none", "bounce.example")}
    finding = check.run_after(message(f"From: {sender}\nSubject: hi\n"), earlier)
    assert finding.name == "dmarc" and not finding.critical
    return finding


def result(*args, **kwargs) -> tuple[str, str, str, str]:
    finding = evaluate(*args, **kwargs)
    assert finding.status == "ok", finding.detail
    d = finding.data
    return d.result, d.domain, d.policy, d.disposition


REJECT = {"_dmarc.example.com.": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.com"]}


# --------------------------------------------------------------------------- From


@pytest.mark.parametrize(
    "headers,domain",
    [
        ("From: alice@Example.COM\n", "example.com"),
        ('From: "Alice, the boss" <alice@example.com>\n', "example.com"),
        ('From: "bob@bank.example" <alice@example.com>\n', "example.com"),  # a display name is not the address
        ("From: =?utf-8?q?Smith=2C_J=C3=BCrgen?= <jurgen@example.com>\n", "example.com"),
        ("From: Alice\n <alice@example.com>\n", "example.com"),  # folded
        ("from: alice@example.com (Alice <alice@evil.example>)\n", "example.com"),  # a comment
        ("From: alice@example.com, bob@EXAMPLE.com\n", "example.com"),  # several authors, one domain
        ("From: alice@example.com.\n", "example.com"),
        ("From: J\u00fcrgen <j@b\u00fccher.example>\n", "xn--bcher-kva.example"),  # raw UTF-8 (RFC 6532)
    ],
)
def test_from_domain(headers, domain):
    assert from_domains(message(headers + "To: bob@example.net\n")) == ((domain,), ())


@pytest.mark.parametrize(
    "headers,problem",
    [
        ("To: bob@example.net\n", "no From field"),
        ("From: alice@example.com\nFrom: mallory@evil.example\n", "2 From fields"),
        ("From: undisclosed\n", "no address with a domain in From"),
        ("From: undisclosed-recipients:;\n", "no address with a domain in From"),
        (
            "From: " + ", ".join(f"a@d{n}.example" for n in range(MAX_FROM_DOMAINS + 1)) + "\n",
            f"From names {MAX_FROM_DOMAINS + 1} domains: more than {MAX_FROM_DOMAINS} are not evaluated",
        ),
        ("From: alice@[192.0.2.1]\n", "[192.0.2.1] is not a domain name"),
        ("From: alice@example..com\n", "example..com is not a domain name"),
        ("From: alice@-bad.example\n", "-bad.example is not a domain name"),
    ],
)
def test_from_problems_are_permerror(headers, problem):
    with pytest.raises(FromError, match=problem.replace("[", r"\[").replace(".", r"\.")):
        from_domains(message(headers))
    finding = DmarcCheck(Zone({}), 1).run_after(message(headers), {})
    assert finding.data.result == "permerror" and problem in finding.data.detail


def test_from_in_the_body_is_not_the_from_field():
    got = from_domains(message("From: alice@example.com\nSubject: x\n\nFrom: mallory@evil.example\n"))
    assert got == (("example.com",), ())


# --------------------------------------------------------------------------- several From domains


def test_from_domains_in_order_each_once_with_the_addresses_that_are_not_domains():
    got = from_domains(message("From: a@B.example, b@a.example, c@b.example, d@[192.0.2.1], e@x..example\n"))
    assert got == (("b.example", "a.example"), ("[192.0.2.1] is not a domain name", "x..example is not a domain name"))


FAILING = {  # nothing aligned passes for these (the default DKIM and SPF findings): each fails with its policy
    "_dmarc.bank.example.": ["v=DMARC1; p=reject"],
    "_dmarc.shop.example.": ["v=DMARC1; p=quarantine"],
    "_dmarc.news.example.": ["v=DMARC1; p=none"],
}


def test_two_from_domains_one_failing_under_reject_is_a_reject():
    finding = evaluate({**FAILING, **REJECT}, "alice@news.example, ceo@bank.example", dkim(("pass", "news.example")))
    d = finding.data
    assert (d.result, d.domain, d.policy, d.disposition) == ("fail", "bank.example", "reject", "reject")
    assert finding.policy_reject == "DMARC policy of bank.example is reject"
    assert [s for s, _ in finding.symbols] == ["DMARC_REJECT"]  # no DKIM_VALID_AU: bank.example did not sign
    assert (
        d.detail
        == "no aligned DKIM or SPF pass: dkim pass d=news.example (not aligned), spf none bounce.example (not aligned)"
        "; other From domains: news.example pass"
    )
    assert [r.authres().header_from for r in finding.authentication] == ["bank.example"]


@pytest.mark.parametrize(
    "sender, expected",
    [
        ("a@news.example, b@shop.example", ("fail", "shop.example", "quarantine")),  # quarantine beats none
        ("a@shop.example, b@bank.example", ("fail", "bank.example", "reject")),
        ("a@bank.example, b@shop.example", ("fail", "bank.example", "reject")),  # whatever the order
        ("a@norecord.example, b@news.example", ("fail", "news.example", "none")),  # any fail beats none
        ("a@bank.example, b@[192.0.2.1]", ("fail", "bank.example", "reject")),  # a bad address hides no fail
        ("a@norecord.example, b@[192.0.2.1]", ("permerror", "", "")),  # permerror beats none
        ("a@norecord.example, b@other.example", ("none", "norecord.example", "")),  # equals: the first
    ],
)
def test_the_strictest_result_applies(sender, expected):
    finding = evaluate(FAILING, sender)
    assert (finding.data.result, finding.data.domain, finding.data.policy) == expected
    assert bool(finding.policy_reject) is (expected[2] == "reject")


def test_a_pass_needs_every_from_domain_to_pass():
    records = {**FAILING, "_dmarc.example.com.": ["v=DMARC1; p=reject"], "_dmarc.example.org.": ["v=DMARC1; p=none"]}
    both = dkim(("pass", "example.com"), ("pass", "example.org"))
    got = evaluate(records, "a@example.com, b@example.org", both)
    assert (got.data.result, got.data.domain) == ("pass", "example.com")
    assert [s for s, _ in got.symbols] == ["DKIM_VALID_AU", "DMARC_PASS"]
    got = evaluate(records, "a@example.com, b@norecord.example", both)
    assert (got.data.result, got.data.domain) == ("none", "norecord.example")
    assert got.data.detail.endswith("; other From domains: example.com pass")


def test_temperror_when_one_is_temperror_and_none_fails():
    records = {**FAILING, "_dmarc.example.com.": ["v=DMARC1; p=reject"]}
    signed = dkim(("pass", "example.com"))
    got = evaluate(records, "a@example.com, b@broken.example", signed, failing=("_dmarc.broken.example.",))
    assert (got.data.result, got.data.domain) == ("temperror", "broken.example")
    got = evaluate(records, "a@bank.example, b@broken.example", signed, failing=("_dmarc.broken.example.",))
    assert (got.data.result, got.data.domain, got.data.disposition) == ("fail", "bank.example", "reject")


def test_a_skipped_domain_beats_a_pass_and_none_but_not_a_fail_or_temperror():
    records = {**FAILING, "_dmarc.example.com.": ["v=DMARC1; p=reject"]}
    skipped = Finding("spf", "skipped", detail="no client address")
    got = evaluate(records, "a@example.com, b@bank.example", dkim(("pass", "example.com")), skipped)
    assert got.status == "skipped" and got.data is None
    assert got.detail == "no aligned pass, and SPF skipped; other From domains: example.com pass"
    outcomes = [Skipped("a.example", "x"), DmarcResult("temperror", "b.example"), DmarcResult("none", "c.example")]
    assert strictest(outcomes) is outcomes[1]
    fail = DmarcResult("fail", "d.example", "none", "none")
    assert strictest([*outcomes, fail]) is fail


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    "text,record",
    [
        ("v=DMARC1; p=reject", Record("reject")),
        ("v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=S;pct=20", Record("quarantine", "none", "s", "s", 20)),
        ("v=DMARC1 ; p = none ;; fo=1; unknown=tag; rua=mailto:a@example.com;", Record("none")),
        ("v=DMARC1; p=reject; adkim=x; aspf=; pct=101", Record("reject")),  # invalid values: defaults
        ("v=DMARC1; p=reject; pct=abc", Record("reject")),
        ("v=DMARC1; p=reject; p=none", Record("reject")),  # the first of repeated tags
        ("v=DMARC1; p=bogus; rua=mailto:dmarc@example.com", Record("none", note="invalid p=bogus with a rua=")),
        ("v=DMARC1; rua=mailto:dmarc@example.com!10m", Record("none", note="no p= with a rua=")),
        ("v=DMARC1; p=reject; sp=never; rua=mailto:d@example.com", Record("none", note="invalid sp=never with")),
    ],
)
def test_parse_record(text, record):
    got = parse_record(text)
    assert got.note.startswith(record.note) and got == Record(got.p, got.sp, got.adkim, got.aspf, got.pct, got.note)
    assert (got.p, got.sp, got.adkim, got.aspf, got.pct) == (record.p, record.sp, record.adkim, record.aspf, record.pct)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("v=DMARC1", "no p= and no valid rua="),
        ("v=DMARC1; p=bogus", "invalid p=bogus and no valid rua="),
        ("v=DMARC1; p=bogus; rua=not a uri", "invalid p=bogus and no valid rua="),
        ("v=DMARC1; p=reject; sp=bogus", "invalid sp=bogus and no valid rua="),
    ],
)
def test_unusable_records(text, problem):
    with pytest.raises(RecordError, match=problem):
        parse_record(text)


def test_an_unusable_record_is_permerror_and_p_none_with_a_rua():
    records = {"_dmarc.example.com.": ["v=DMARC1; p=rejectt"]}
    assert result(records, "alice@example.com")[0] == "permerror"
    records = {"_dmarc.example.com.": ["v=DMARC1; p=rejectt; rua=mailto:d@example.com"]}
    assert result(records, "alice@example.com") == ("fail", "example.com", "none", "none")


# --------------------------------------------------------------------------- discovery


def test_no_record_is_none_after_asking_the_from_and_the_organizational_domain():
    zone = Zone({"_dmarc.example.com.": ["v=spf1 -all"], "_dmarc.mail.example.com.": ["google-site-verification=x"]})
    finding = DmarcCheck(zone, 2).run_after(message("From: a@mail.example.com\n"), {})
    assert finding.data.result == "none" and finding.data.policy == ""
    assert finding.data.detail == "no DMARC record at _dmarc.mail.example.com nor at _dmarc.example.com"
    assert zone.asked == ["_dmarc.mail.example.com.", "_dmarc.example.com."]


def test_the_from_domains_own_record_wins_over_the_organizational_domains():
    records = {**REJECT, "_dmarc.news.example.com.": ["v=DMARC1; p=quarantine; sp=none"]}
    assert result(records, "a@news.example.com") == ("fail", "news.example.com", "quarantine", "quarantine")


def test_sp_applies_to_a_subdomain_through_the_organizational_domain():
    records = {"_dmarc.example.com.": ["v=DMARC1; p=reject; sp=quarantine"]}
    assert result(records, "a@news.example.com") == ("fail", "news.example.com", "quarantine", "quarantine")
    assert result(records, "a@example.com") == ("fail", "example.com", "reject", "reject")
    assert result(REJECT, "a@deep.news.example.com") == ("fail", "deep.news.example.com", "reject", "reject")


def test_several_dmarc_records_are_none_and_there_is_no_fallback():
    records = {**REJECT, "_dmarc.news.example.com.": ["v=DMARC1; p=none", "v=DMARC1; p=reject", "other"]}
    finding = evaluate(records, "a@news.example.com")
    assert finding.data.result == "none" and finding.data.detail == "2 DMARC records at _dmarc.news.example.com"


@pytest.mark.parametrize("failing", ["_dmarc.news.example.com.", "_dmarc.example.com."])
def test_a_dns_failure_is_temperror(failing):
    finding = evaluate(REJECT, "a@news.example.com", failing=(failing,))
    assert finding.data.result == "temperror" and "SERVFAIL" in finding.data.detail


def test_v_must_come_first_and_dmarc1_is_case_sensitive():
    for text in ("p=reject; v=DMARC1", "v=dmarc1; p=reject", "v=DMARC10; p=reject"):
        assert result({"_dmarc.example.com.": [text]}, "a@example.com")[0] == "none"


def test_a_record_split_over_txt_strings_is_joined():
    long = "v=DMARC1; p=reject; rua=" + ",".join(f"mailto:r{n}@example.com" for n in range(20))
    assert len(long) > 255 and result({"_dmarc.example.com.": [long]}, "a@example.com")[0] == "fail"


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    "from_domain,d,mode,aligned",
    [
        ("example.com", "example.com", "r", True),
        ("example.com", "EXAMPLE.com.", "s", True),
        ("news.example.com", "example.com", "r", True),
        ("example.com", "mail.example.com", "r", True),
        ("news.example.com", "mail.example.com", "r", True),  # siblings: the same organizational domain
        ("news.example.com", "example.com", "s", False),
        ("example.com", "example.net", "r", False),
        ("example.com", "badexample.com", "r", False),
        ("example.co.uk", "co.uk", "r", False),  # a public suffix is nobody's organizational domain
        ("example.co.uk", "other.co.uk", "r", False),
        ("news.example.co.uk", "mail.example.co.uk", "r", True),
        ("alice.github.io", "github.io", "r", False),  # PSL private section
        ("alice.github.io", "bob.github.io", "r", False),
        ("a.b.example.test", "c.example.test", "r", True),  # unknown TLD: a one-label public suffix
        ("example.com", "", "r", False),
    ],
)
def test_alignment(from_domain, d, mode, aligned):
    assert DmarcCheck(Zone({}), 1).aligned(from_domain, d, mode) is aligned


def test_aligned_dkim_pass_passes():
    records = {"_dmarc.example.co.uk.": ["v=DMARC1; p=reject"]}
    got = evaluate(records, "a@news.example.co.uk", dkim(("fail", "example.co.uk"), ("pass", "mail.example.co.uk")))
    assert (got.data.result, got.data.policy, got.data.disposition) == ("pass", "reject", "none")
    assert got.data.detail == "aligned: dkim d=mail.example.co.uk"


def test_aligned_spf_pass_passes():
    assert result(REJECT, "a@example.com", spf_finding=spf("pass", "bounces.example.com"))[0] == "pass"


def test_strict_alignment_needs_the_same_name():
    records = {"_dmarc.example.com.": ["v=DMARC1; p=reject; adkim=s; aspf=s"]}
    relaxed = dict(dkim_finding=dkim(("pass", "mail.example.com")), spf_finding=spf("pass", "bounces.example.com"))
    assert result(records, "a@example.com", **relaxed)[0] == "fail"
    assert result(records, "a@example.com", dkim(("pass", "example.com")))[0] == "pass"
    assert result(records, "a@example.com", spf_finding=spf("pass", "example.com"))[0] == "pass"


def test_unaligned_passes_and_aligned_failures_fail_with_the_policy():
    finding = evaluate(
        REJECT,
        "a@example.com",
        dkim(("pass", "esp.example"), ("fail", "example.com"), ("permerror", "example.com")),
        spf("softfail", "example.com"),
    )
    d = finding.data
    assert (d.result, d.domain, d.policy, d.disposition) == ("fail", "example.com", "reject", "reject")
    assert d.detail.startswith("no aligned DKIM or SPF pass: dkim pass d=esp.example (not aligned), dkim fail")


def test_pct_is_not_applied_but_said():
    records = {"_dmarc.example.com.": ["v=DMARC1; p=quarantine; pct=10"]}
    finding = evaluate(records, "a@example.com")
    assert (finding.data.result, finding.data.disposition) == ("fail", "quarantine")
    assert finding.data.detail.endswith("; pct=10 not applied")


def test_spf_helo_counts_only_for_a_null_sender():
    finding = spf("pass", "mx.example.com", identity="helo")
    assert result(REJECT, "a@example.com", spf_finding=finding)[0] == "pass"  # Envelope's mail_from is ""
    check = DmarcCheck(Zone(REJECT), 1)
    got = check.run_after(
        message("From: a@example.com\n", mail_from="x@other.example"), {"dkim": dkim(), "spf": finding}
    )
    assert got.data.result == "fail"


def test_an_aligned_temperror_is_temperror_not_fail():
    assert result(REJECT, "a@example.com", dkim(("temperror", "example.com")))[:3] == (
        "temperror",
        "example.com",
        "reject",
    )
    assert result(REJECT, "a@example.com", spf_finding=spf("temperror", "example.com"))[0] == "temperror"
    assert result(REJECT, "a@example.com", dkim(("temperror", "other.example")))[0] == "fail"  # could never align
    # an aligned pass is enough, whatever else is pending
    assert result(REJECT, "a@example.com", dkim(("temperror", "example.com"), ("pass", "example.com")))[0] == "pass"


@pytest.mark.parametrize("status", ["timeout", "error", "unavailable"])
def test_a_failed_dkim_or_spf_check_is_temperror(status):
    failed = Finding("dkim", status, detail="no answer")
    assert result(REJECT, "a@example.com", failed)[0] == "temperror"
    assert result(REJECT, "a@example.com", spf_finding=Finding("spf", status))[0] == "temperror"


def test_a_skipped_dkim_or_spf_check_skips_dmarc_unless_the_other_passes_aligned():
    skipped = Finding("spf", "skipped", detail="no client address")
    finding = evaluate(REJECT, "a@example.com", spf_finding=skipped)
    assert (finding.status, finding.data, finding.detail) == ("skipped", None, "no aligned pass, and SPF skipped")
    assert result(REJECT, "a@example.com", dkim(("pass", "example.com")), skipped)[0] == "pass"
    assert DmarcCheck(Zone(REJECT), 1).run(message("From: a@example.com\n")).status == "skipped"


def test_domain_and_detail_are_sanitised():
    records = {"_dmarc.example.com.": ["v=DMARC1; p=reject"]}
    finding = evaluate(records, "a@example.com", dkim(("pass", "evil\x1b.example")))
    assert "\x1b" not in finding.data.detail


@pytest.mark.parametrize(
    "envelope,reason",
    [({"auth_user": "alice"}, "SASL-authenticated client"), ({"client_ip": "::1"}, "client on loopback")],
)
def test_our_own_mail_is_skipped(envelope, reason):
    assert DmarcCheck(Zone({}), 1).skip_reason(message("From: a@example.com\n", **envelope), {}) == reason
    assert DmarcCheck(Zone({}), 1).skip_reason(message("From: a@example.com\n"), {}) is None


# --------------------------------------------------------------------------- pipeline and config


class Stub(Check):
    def __init__(self, name: str, finding: Finding, delay: float = 0.0):
        self.name, self._finding, self._delay = name, finding, delay

    def run(self, message: Message) -> Finding:
        time.sleep(self._delay)
        return self._finding


def test_the_pipeline_gives_each_message_its_own_dkim_and_spf_findings():
    """One check object, concurrent messages: each DMARC run sees its own message's earlier findings."""

    class PerMessageDkim(Check):
        name = "dkim"

        def run(self, message: Message) -> Finding:
            domain = from_domains(message)[0][0]
            time.sleep(0.05 if domain == "example.com" else 0)
            return dkim(("pass", domain))

    records = {f"_dmarc.{d}.": ["v=DMARC1; p=reject"] for d in ("example.com", "example.org")}
    pipeline = Pipeline([PerMessageDkim(), Stub("spf", spf("none", "x.example")), DmarcCheck(Zone(records), 2)], 4)
    got: dict[str, str] = {}

    def scan(sender: str) -> None:
        findings = pipeline.run(message(f"From: {sender}\n"))
        got[sender] = findings["dmarc"].data.result + " " + findings["dmarc"].data.detail

    threads = [threading.Thread(target=scan, args=(s,)) for s in ("a@example.com", "b@example.org")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipeline.shutdown()
    assert got == {
        "a@example.com": "pass aligned: dkim d=example.com",
        "b@example.org": "pass aligned: dkim d=example.org",
    }


def config(tmp_path: Path, text: str):
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "milterd.toml").write_text(text)
    return load_config(tmp_path / "milterd.toml")


@pytest.mark.parametrize(
    "text,built",
    [
        ("[dmarc]\ntimeout = 3\n", True),
        ("[dmarc]\nenabled = false\n", False),
        ("[spf]\nenabled = false\n", False),  # DMARC judges both results: without one it is not built
        ("[dkim]\nenabled = false\n", False),
    ],
)
def test_dmarc_is_built_after_dkim_and_spf_only_when_both_are_on(tmp_path, text, built):
    checks = [
        c.name for c in build_checks(config(tmp_path, "[clamav]\nenabled = false\n[spamd]\nenabled = false\n" + text))
    ]
    assert ("dmarc" in checks) is built
    if built:
        assert checks[-3:] == ["dkim", "spf", "dmarc"]
        assert build_checks(config(tmp_path, text))[-1].timeout == 4  # the pipeline waits past the DNS budget


def test_dmarc_section_defaults_and_the_example_config():
    shipped = load_config(Path(__file__).resolve().parents[2] / "systemd" / "milterd.toml")
    assert shipped.dmarc == DmarcSettings() == DmarcSettings(enabled=True, timeout=10.0)
