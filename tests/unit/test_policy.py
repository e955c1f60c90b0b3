"""policy.decide(): findings and one recipient's policy in, the amavis verdict out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from milterd import render
from milterd.findings import Finding, summarize
from milterd.policy import (
    Category,
    Destinies,
    Destiny,
    Policy,
    Reply,
    Verdict,
    decide,
    format_score,
    is_own_header,
)

pytestmark = pytest.mark.unit

HOST = "mx.example.com"
EICAR = "Eicar-Test-Signature"
SAFE = re.compile(r"[\x20-\x7e]*")  # printable ASCII and space, nothing else


def clamav(*viruses: str, status: str = "ok") -> Finding:
    return Finding("clamav", status, critical=True, virus_scanned=True, viruses=viruses)


def spamd(score: float, *tests: tuple[str, float]) -> Finding:
    return Finding("spamd", "ok", critical=True, score=score, symbols=tests)


def down(name: str, status: str = "unavailable") -> Finding:
    return Finding(name, status, critical=True, detail="connection refused")


def policy(destiny: dict | None = None, **settings) -> Policy:
    destinies = Destinies(**{k: Destiny(v) for k, v in (destiny or {}).items()})
    return Policy(destiny=destinies, **settings)


@dataclass(frozen=True)
class Outcome:
    """The verdict and what a passed message carries of it, as the engine renders it: nothing
    when the message is blocked."""

    verdict: Verdict
    headers: tuple[tuple[str, str], ...]
    subject_tag: str

    def __getattr__(self, name: str):
        return getattr(self.verdict, name)


def outcome(findings: Mapping[str, Finding], p: Policy, hostname: str = HOST) -> Outcome:
    found = summarize(findings)
    v = decide(found, p)
    return Outcome(v, *render.rendered(found, p, v, hostname))


def verdict(*findings: Finding, **settings) -> Outcome:
    return outcome({f.name: f for f in findings}, policy(**settings))


def header(v, name: str) -> list[str]:
    return [value for n, value in v.headers if n == name]


def names(v) -> list[str]:
    return [n for n, _ in v.headers]


# 1. Content categories


def test_a_clean_message_is_accepted_with_only_x_virus_scanned():
    v = verdict(clamav(), spamd(0.5), local=True)
    assert (v.category, v.categories, v.action) == (
        Category.CLEAN,
        (Category.CLEAN,),
        "accept",
    )
    assert v.headers == (("X-Virus-Scanned", f"milterd at {HOST}"),)
    assert (v.reply, v.subject_tag, v.reason, v.spam_score) == (None, "", "", 0.5)
    assert not v.blocked


def test_no_findings_at_all_is_clean_with_no_score_and_no_headers():
    v = verdict(local=True)
    assert (v.category, v.action, v.spam_score, v.headers) == (
        Category.CLEAN,
        "accept",
        None,
        (),
    )


def test_score_at_tag2_makes_spammy_and_at_kill_makes_spam_too():
    v = verdict(clamav(), spamd(7.0), local=True)
    assert v.categories == (Category.SPAM, Category.SPAMMY, Category.CLEAN)
    assert v.category is Category.SPAM
    assert v.action == "accept"  # final_spam_destiny defaults to D_PASS


def test_spammy_below_kill_is_passed_flagged_and_tagged():
    v = verdict(spamd(5.0), tag2_level=4.0, kill_level=8.0, local=True)
    assert v.categories == (Category.SPAMMY, Category.CLEAN)
    assert (v.action, v.subject_tag) == ("accept", "***SPAM*** ")
    assert header(v, "X-Spam-Flag") == ["YES"]


def test_virus_is_discarded_by_default():
    v = verdict(clamav(EICAR))
    assert (v.category, v.categories) == (
        Category.VIRUS,
        (Category.VIRUS, Category.CLEAN),
    )
    assert (v.action, v.reply, v.headers) == ("discard", None, ())
    assert v.reason == f"virus {EICAR} found"
    assert v.blocked


def test_a_scanner_down_is_unchecked_and_tempfails_by_default():
    v = verdict(clamav(), down("spamd"))
    assert (v.category, v.categories) == (
        Category.UNCHECKED,
        (Category.UNCHECKED, Category.CLEAN),
    )
    assert v.action == "tempfail"
    assert v.reply == Reply("451", "4.7.1", "Try again later: spamd unavailable")
    assert v.reason == "spamd unavailable"


def test_categories_are_listed_highest_first_and_the_first_is_the_main_one():
    v = verdict(
        clamav(EICAR),
        spamd(20.0),
        down("razor", "timeout"),
        scanner_failure="unchecked",
        destiny={"virus": "PASS"},
    )
    assert v.categories == (
        Category.VIRUS,
        Category.UNCHECKED,
        Category.SPAM,
        Category.SPAMMY,
        Category.CLEAN,
    )
    assert v.category is Category.VIRUS
    assert v.action == "accept"


def test_the_spam_level_is_the_sum_of_every_checks_score():
    extra = Finding("pyzor", "ok", score=2.5, symbols=(("PYZOR_CHECK", 2.5),))
    v = verdict(spamd(4.0, ("A", 4.0)), extra, local=True)
    assert v.spam_score == 6.5
    assert Category.SPAM in v.categories
    assert header(v, "X-Spam-Status") == ["Yes, score=6.5 tagged_above=2 required=6.31 tests=[A=4, PYZOR_CHECK=2.5]"]


# Precedence: the walk goes from the highest category down; the first non-PASS destiny blocks.


def test_virus_rejects_before_a_scanner_failure_can_tempfail():
    v = verdict(
        clamav(EICAR),
        down("spamd"),
        destiny={"virus": "REJECT"},
        scanner_failure="tempfail",
    )
    assert (v.category, v.action) == (Category.VIRUS, "reject")
    assert Category.UNCHECKED in v.categories
    assert v.reply == Reply("554", "5.7.0", f"Rejected: virus {EICAR} found")


def test_virus_discard_beats_a_scanner_failure_tempfail():
    v = verdict(clamav(EICAR), down("spamd", "timeout"), scanner_failure="tempfail")
    assert v.action == "discard"


def test_a_passed_virus_with_spamd_down_tempfails():
    v = verdict(
        clamav(EICAR),
        down("spamd"),
        destiny={"virus": "PASS"},
        scanner_failure="tempfail",
    )
    assert (v.category, v.action) == (Category.VIRUS, "tempfail")
    assert v.reply == Reply("451", "4.7.1", "Try again later: spamd unavailable")


def test_a_scanner_failure_tempfails_before_the_spam_destiny_applies():
    v = verdict(down("clamav", "timeout"), spamd(20.0), destiny={"spam": "REJECT"})
    assert v.action == "tempfail"
    assert v.reply.code == "451"


def test_an_unchecked_message_passed_by_its_destiny_still_meets_the_spam_destiny():
    v = verdict(
        down("clamav", "timeout"),
        spamd(20.0),
        scanner_failure="unchecked",
        destiny={"spam": "REJECT"},
    )
    assert (v.category, v.action) == (Category.UNCHECKED, "reject")
    assert v.reply == Reply("554", "5.7.0", "Rejected: spam, score 20")


def test_virus_discard_beats_spam_reject():
    v = verdict(clamav(EICAR), spamd(20.0), destiny={"spam": "REJECT"})
    assert (v.action, v.reason) == ("discard", f"virus {EICAR} found")


def test_a_dmarc_reject_is_spam_and_refused_before_the_bad_header_destiny():
    why = "DMARC policy of bank.example is reject"
    dmarc = Finding("dmarc", "ok", policy_reject=why)
    bad = Finding("headers", "ok", bad_headers=("From: no address",))
    v = verdict(clamav(), spamd(1.0), dmarc, bad, dmarc_reject=True, destiny={"bad_header": "REJECT"})
    assert v.categories == (Category.SPAM, Category.BAD_HEADER, Category.CLEAN)
    assert (v.action, v.reply, v.reason) == ("reject", Reply("550", "5.7.1", f"Rejected: {why}"), why)
    off = verdict(clamav(), spamd(1.0), dmarc, bad, destiny={"bad_header": "REJECT"})
    assert (off.categories, off.action) == ((Category.BAD_HEADER, Category.CLEAN), "reject")
    assert off.reply == Reply("554", "5.6.0", "Rejected: bad header section: From: no address")


def test_a_dmarc_reject_alone_is_refused_whatever_the_spam_destiny():
    dmarc = Finding("dmarc", "ok", policy_reject="DMARC policy of bank.example is reject")
    v = verdict(spamd(1.0), dmarc, dmarc_reject=True, destiny={"spam": "DISCARD"})
    assert (v.category, v.action, str(v.reply)) == (
        Category.SPAM,
        "reject",
        "550 5.7.1 Rejected: DMARC policy of bank.example is reject",
    )


def test_spamd_skipped_after_a_virus_is_not_a_scanner_failure():
    skipped = Finding("spamd", "skipped", critical=True, detail="virus found")
    v = verdict(
        clamav(EICAR),
        skipped,
        destiny={"virus": "PASS"},
        scanner_failure="tempfail",
        local=True,
    )
    assert (v.categories, v.action) == ((Category.VIRUS, Category.CLEAN), "accept")


# 2. Spam levels, at and around each boundary (Debian: tag 2.0, tag2 6.31, kill 6.31)


@pytest.mark.parametrize(
    ("score", "tagged"),
    [(2.0, True), (1.999, False), (2.001, True), (-5.0, False), (100.0, True)],
)
def test_x_spam_headers_appear_at_or_above_tag_level(score, tagged):
    v = verdict(clamav(), spamd(score), local=True)
    spam_headers = [n for n in names(v) if n.startswith("X-Spam-")]
    assert spam_headers == (["X-Spam-Flag", "X-Spam-Score", "X-Spam-Level", "X-Spam-Status"] if tagged else [])


@pytest.mark.parametrize(
    ("score", "spammy"),
    [(6.31, True), (6.309, False), (6.311, True), (2.0, False)],
)
def test_score_at_tag2_level_sets_x_spam_flag_yes_and_the_subject_tag(score, spammy):
    v = verdict(spamd(score), local=True)
    assert (Category.SPAMMY in v.categories) is spammy
    assert header(v, "X-Spam-Flag") == ["YES" if spammy else "NO"]
    assert header(v, "X-Spam-Status")[0].startswith("Yes, " if spammy else "No, ")
    assert v.subject_tag == ("***SPAM*** " if spammy else "")


@pytest.mark.parametrize(
    ("score", "categories", "action"),
    [
        (1.9, (Category.CLEAN,), "accept"),
        (2.0, (Category.CLEAN,), "accept"),
        (4.999, (Category.CLEAN,), "accept"),
        (5.0, (Category.SPAMMY, Category.CLEAN), "accept"),
        (7.999, (Category.SPAMMY, Category.CLEAN), "accept"),
        (8.0, (Category.SPAM, Category.SPAMMY, Category.CLEAN), "reject"),
        (8.001, (Category.SPAM, Category.SPAMMY, Category.CLEAN), "reject"),
    ],
)
def test_each_level_boundary_with_distinct_tag2_and_kill(score, categories, action):
    v = verdict(
        spamd(score),
        tag_level=2.0,
        tag2_level=5.0,
        kill_level=8.0,
        destiny={"spam": "REJECT"},
        local=True,
    )
    assert (v.categories, v.action) == (categories, action)


def test_tag_level_minus_999_means_headers_always_even_at_score_zero():
    v = verdict(spamd(0.0), tag_level=-999, local=True)
    assert header(v, "X-Spam-Flag") == ["NO"]
    assert header(v, "X-Spam-Score") == ["0"]
    assert header(v, "X-Spam-Level") == [""]
    assert header(v, "X-Spam-Status") == ["No, score=0 tagged_above=-999 required=6.31 tests=[]"]


def test_tag_level_minus_999_tags_a_negative_score_with_an_empty_level():
    v = verdict(spamd(-0.0, ("NO_RELAYS", -0.0)), tag_level=-999, local=True)
    assert header(v, "X-Spam-Score") == ["0"]
    assert header(v, "X-Spam-Status") == ["No, score=0 tagged_above=-999 required=6.31 tests=[NO_RELAYS=0]"]


def test_no_spam_headers_when_spamassassin_did_not_run():
    v = verdict(clamav(), Finding("spamd", "skipped", critical=True), tag_level=-999, local=True)
    assert names(v) == ["X-Virus-Scanned"]


# 3. Destinies


@pytest.mark.parametrize(
    ("destiny", "action", "reply"),
    [
        ("DISCARD", "discard", None),
        ("REJECT", "reject", Reply("554", "5.7.0", f"Rejected: virus {EICAR} found")),
        ("BOUNCE", "reject", Reply("554", "5.7.0", f"Rejected: virus {EICAR} found")),
    ],
)
def test_virus_destiny(destiny, action, reply):
    v = verdict(clamav(EICAR), destiny={"virus": destiny}, local=True)
    assert (v.category, v.action, v.reply) == (Category.VIRUS, action, reply)
    assert (v.headers, v.subject_tag) == ((), "")


def test_virus_destiny_pass_delivers_with_x_amavis_alert_and_infected_tag():
    v = verdict(clamav(EICAR, "Win.Test.Other"), destiny={"virus": "PASS"}, local=True)
    assert (v.category, v.action, v.reply) == (Category.VIRUS, "accept", None)
    assert v.headers == (
        ("X-Virus-Scanned", f"milterd at {HOST}"),
        (
            "X-Amavis-Alert",
            f"INFECTED, message contains virus: {EICAR}, Win.Test.Other",
        ),
    )
    assert v.subject_tag == "***INFECTED*** "


def test_virus_bounce_at_or_above_dsn_cutoff_is_a_silent_discard():
    v = verdict(clamav(EICAR), spamd(10.0), destiny={"virus": "BOUNCE"})
    assert (v.action, v.reply) == ("discard", None)


@pytest.mark.parametrize(
    ("destiny", "score", "action", "reply"),
    [
        ("DISCARD", 8.0, "discard", None),
        ("REJECT", 8.0, "reject", Reply("554", "5.7.0", "Rejected: spam, score 8")),
        (
            "REJECT",
            1000.0,
            "reject",
            Reply("554", "5.7.0", "Rejected: spam, score 1000"),
        ),
        ("BOUNCE", 8.0, "reject", Reply("554", "5.7.0", "Rejected: spam, score 8")),
        (
            "BOUNCE",
            9.999,
            "reject",
            Reply("554", "5.7.0", "Rejected: spam, score 9.999"),
        ),
        ("BOUNCE", 10.0, "discard", None),
        ("BOUNCE", 1000.0, "discard", None),
    ],
)
def test_spam_destiny(destiny, score, action, reply):
    v = verdict(clamav(), spamd(score), destiny={"spam": destiny}, local=True)
    assert (v.category, v.action, v.reply) == (Category.SPAM, action, reply)
    assert v.headers == ()


def test_spam_destiny_pass_delivers_with_spam_headers_and_spam_tag():
    v = verdict(clamav(), spamd(8.0), destiny={"spam": "PASS"}, local=True)
    assert (v.action, v.subject_tag) == ("accept", "***SPAM*** ")
    assert header(v, "X-Spam-Flag") == ["YES"]


def test_dsn_cutoff_level_is_a_setting():
    v = verdict(spamd(8.0), destiny={"spam": "BOUNCE"}, dsn_cutoff_level=7.5)
    assert v.action == "discard"


def test_reply_renders_as_an_smtp_reply_line():
    v = verdict(clamav(EICAR), destiny={"virus": "REJECT"})
    assert str(v.reply) == f"554 5.7.0 Rejected: virus {EICAR} found"


# Scanner failures (amavis section 8): tempfail, or UNCHECKED and its destiny


@pytest.mark.parametrize("name", ["clamav", "spamd"])
@pytest.mark.parametrize("status", ["timeout", "error", "unavailable"])
def test_every_kind_of_critical_failure_tempfails_naming_the_check(name, status):
    findings = [clamav(), spamd(1.0)]
    findings = [down(name, status) if f.name == name else f for f in findings]
    v = verdict(*findings, scanner_failure="tempfail")
    assert (v.category, v.action) == (Category.UNCHECKED, "tempfail")
    assert v.reply == Reply("451", "4.7.1", f"Try again later: {name} {status}")
    assert v.headers == ()


def test_every_failed_scanner_is_named_in_the_tempfail_reply():
    v = verdict(down("clamav", "timeout"), down("spamd", "unavailable"))
    assert v.reply.text == "Try again later: clamav timeout, spamd unavailable"


@pytest.mark.parametrize("status", ["ok", "skipped"])
def test_skipped_or_ok_is_not_a_failure(status):
    v = verdict(clamav(), Finding("spamd", status, critical=True))
    assert (v.category, v.action) == (Category.CLEAN, "accept")


@pytest.mark.parametrize("status", ["timeout", "error", "unavailable"])
def test_a_non_critical_failed_check_does_not_make_unchecked(status):
    v = verdict(clamav(), spamd(1.0), Finding("razor", status, critical=False))
    assert (v.categories, v.action) == ((Category.CLEAN,), "accept")


def test_unchecked_with_destiny_pass_is_delivered_tagged_and_alerted():
    v = verdict(clamav(), down("spamd", "timeout"), scanner_failure="unchecked", local=True)
    assert (v.category, v.action, v.reply) == (Category.UNCHECKED, "accept", None)
    assert v.subject_tag == "***UNCHECKED*** "
    assert v.headers == (
        ("X-Virus-Scanned", f"milterd at {HOST}"),
        ("X-Amavis-Alert", "UNCHECKED, spamd timeout"),
    )


def test_unchecked_for_a_remote_recipient_gets_the_alert_but_no_subject_tag():
    v = verdict(down("clamav", "error"), spamd(1.0), scanner_failure="unchecked", local=False)
    assert (v.action, v.subject_tag) == ("accept", "")
    assert v.headers == (("X-Amavis-Alert", "UNCHECKED, clamav error"),)


@pytest.mark.parametrize(
    ("destiny", "action", "reply"),
    [
        (
            "REJECT",
            "reject",
            Reply("554", "5.7.0", "Rejected: message could not be checked (spamd error)"),
        ),
        (
            "BOUNCE",
            "reject",
            Reply("554", "5.7.0", "Rejected: message could not be checked (spamd error)"),
        ),
        ("DISCARD", "discard", None),
    ],
)
def test_unchecked_destiny(destiny, action, reply):
    v = verdict(
        clamav(),
        down("spamd", "error"),
        scanner_failure="unchecked",
        destiny={"unchecked": destiny},
    )
    assert (v.category, v.action, v.reply) == (Category.UNCHECKED, action, reply)
    assert v.reason == "message could not be checked (spamd error)"


def test_subject_tags_come_from_the_highest_category_virus_then_unchecked_then_spammy():
    everything = {
        "scanner_failure": "unchecked",
        "destiny": {"virus": "PASS"},
        "local": True,
    }
    assert verdict(clamav(EICAR), spamd(20.0), down("razor"), **everything).subject_tag == "***INFECTED*** "
    assert verdict(clamav(), spamd(20.0), down("razor"), **everything).subject_tag == "***UNCHECKED*** "
    assert verdict(clamav(), spamd(20.0), **everything).subject_tag == "***SPAM*** "


# 4. Headers: local recipients only for spam headers and Subject tags


def test_a_remote_recipient_gets_no_spam_headers_and_no_subject_tag():
    v = verdict(clamav(), spamd(20.0), local=False)
    assert (v.action, v.subject_tag) == ("accept", "")
    assert names(v) == ["X-Virus-Scanned"]


def test_a_passed_virus_for_a_remote_recipient_keeps_the_alert_but_gets_no_tag():
    v = verdict(clamav(EICAR), destiny={"virus": "PASS"}, local=False)
    assert v.subject_tag == ""
    assert header(v, "X-Amavis-Alert") == [f"INFECTED, message contains virus: {EICAR}"]


@pytest.mark.parametrize(
    ("clam", "scanned"),
    [
        (clamav(), True),
        (clamav(EICAR), True),
        (Finding("clamav", "skipped", critical=True), False),
        (down("clamav", "timeout"), False),
        (down("clamav", "error"), False),
        (down("clamav", "unavailable"), False),
        (None, False),
    ],
)
def test_x_virus_scanned_only_when_clamav_answered(clam, scanned):
    findings = [spamd(1.0)] + ([clam] if clam else [])
    v = verdict(*findings, scanner_failure="unchecked", destiny={"virus": "PASS"})
    assert header(v, "X-Virus-Scanned") == ([f"milterd at {HOST}"] if scanned else [])


def test_spam_headers_look_exactly_like_amavis():
    v = verdict(clamav(), spamd(7.1, ("A", 1.1), ("B", 2.0)), local=True)
    assert v.headers == (
        ("X-Virus-Scanned", f"milterd at {HOST}"),
        ("X-Spam-Flag", "YES"),
        ("X-Spam-Score", "7.1"),
        ("X-Spam-Level", "*******"),
        (
            "X-Spam-Status",
            "Yes, score=7.1 tagged_above=2 required=6.31 tests=[A=1.1, B=2]",
        ),
    )


def test_x_spam_status_below_tag2_says_no():
    v = verdict(
        spamd(3.25, ("HTML_MESSAGE", 0.001), ("BAYES_50", 0.8), ("MISSING_DATE", 2.449)),
        local=True,
    )
    assert header(v, "X-Spam-Status") == [
        "No, score=3.25 tagged_above=2 required=6.31 tests=[HTML_MESSAGE=0.001, BAYES_50=0.8, MISSING_DATE=2.449]"
    ]


@pytest.mark.parametrize(
    ("score", "text"),
    [
        (7.123, "7.123"),
        (7.1, "7.1"),
        (5.0, "5"),
        (7.1239, "7.124"),
        (1000.0, "1000"),
        (2.0, "2"),
    ],
)
def test_x_spam_score_is_three_decimals_with_trailing_zeros_dropped(score, text):
    v = verdict(spamd(score), local=True)
    assert header(v, "X-Spam-Score") == [text]


@pytest.mark.parametrize(
    ("score", "stars"),
    [
        (-3.0, 0),
        (0.0, 0),
        (0.99, 0),
        (1.0, 1),
        (2.5, 2),
        (6.99, 6),
        (63.9, 63),
        (64.0, 64),
        (64.5, 64),
        (1000.0, 64),
    ],
)
def test_x_spam_level_is_one_star_per_point_capped_at_64_and_empty_below_1(score, stars):
    v = verdict(spamd(score), tag_level=-999, local=True)
    assert header(v, "X-Spam-Level") == ["*" * stars]


def test_required_and_tagged_above_are_the_recipients_levels():
    v = verdict(spamd(4.5), tag_level=1.5, tag2_level=4.0, kill_level=4.0, local=True)
    assert header(v, "X-Spam-Status") == ["Yes, score=4.5 tagged_above=1.5 required=4 tests=[]"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1000, "1000"),
        (1000.0, "1000"),
        (7.123, "7.123"),
        (2.0, "2"),
        (-0.0, "0"),
        (0.0, "0"),
        (6.31, "6.31"),
        (10.0, "10"),
        (100.5, "100.5"),
        (-1.5, "-1.5"),
        (-999, "-999"),
        (7.1239, "7.124"),
        (0.0004, "0"),
        (-0.0004, "0"),
        (0.001, "0.001"),
    ],
)
def test_format_score(value, text):
    assert format_score(value) == text


# Attacker-controlled text never reaches a reply or a header unsanitised

HOSTILE = "Evil\r\nBcc: victim@example.net\x00%s%n\u00e9\u202e\x1b[31m"


def assert_safe(text: str) -> None:
    assert SAFE.fullmatch(text), repr(text)
    assert "%" not in text


def test_a_hostile_virus_name_is_sanitised_in_the_reject_reply():
    v = verdict(clamav(HOSTILE), destiny={"virus": "REJECT"})
    assert_safe(v.reply.text)
    assert v.reply.text == "Rejected: virus Evil??Bcc: victim@example.net??s?n???[31m found"


def test_a_hostile_virus_name_is_sanitised_in_every_header():
    v = verdict(
        clamav(HOSTILE),
        spamd(7.0, ("GTUBE", 7.0)),
        destiny={"virus": "PASS"},
        local=True,
    )
    assert len(v.headers) == 6
    for name, value in v.headers:
        assert_safe(name)
        assert_safe(value)
    assert header(v, "X-Amavis-Alert") == [
        "INFECTED, message contains virus: Evil??Bcc: victim@example.net??s?n???[31m"
    ]


def test_a_hostile_hostname_is_sanitised_in_x_virus_scanned():
    v = outcome({"clamav": clamav()}, Policy(), hostname="mx\r\nX-Evil: 1%")
    assert v.headers == (("X-Virus-Scanned", "milterd at mx??X-Evil: 1?"),)


def test_a_flood_of_virus_names_is_truncated_in_the_reply_and_the_alert():
    viruses = tuple(f"Win.Trojan.Agent-{i:06d}-{'x' * 30}%\n" for i in range(100))
    rejected = verdict(clamav(*viruses), destiny={"virus": "REJECT"})
    passed = verdict(clamav(*viruses), destiny={"virus": "PASS"})
    assert_safe(rejected.reply.text)
    assert len(rejected.reply.text) <= 200
    alert = header(passed, "X-Amavis-Alert")[0]
    assert_safe(alert)
    assert len(alert) <= 900 and alert.endswith("...")


def test_the_tempfail_reply_is_safe_even_for_a_strange_check_name():
    v = verdict(Finding("evil\r\n%check", "timeout", critical=True))
    assert_safe(v.reply.text)


# Our own headers, removed from incoming mail so nobody can forge them


@pytest.mark.parametrize(
    ("name", "own"),
    [
        ("X-Spam-Flag", True),
        ("X-Spam-Score", True),
        ("X-Spam-Level", True),
        ("X-Spam-Status", True),
        ("x-spam-flag", True),
        ("X-SPAM-STATUS", True),
        ("X-Spam-Report", True),
        ("X-Amavis-Alert", True),
        ("x-amavis-alert", True),
        ("X-Virus-Scanned", False),
        ("Subject", False),
        ("X-Spam", False),
        ("X-Spamd-Result", False),
        ("X-Amavis-Hold", False),
        ("X-Amavis-Alerts", False),
    ],
)
def test_is_own_header(name, own):
    assert is_own_header(name) is own


def test_a_deliberately_uninspected_message_is_unchecked_but_never_tempfailed():
    """A size limit will not go away on retry: the UNCHECKED destiny decides, not scanner_failure."""
    findings = {"clamav": Finding("clamav", "unchecked", critical=True, detail="larger than max_size")}
    verdict = outcome(findings, Policy(scanner_failure="tempfail"), hostname="mx")
    assert verdict.category is Category.UNCHECKED
    assert verdict.action == "accept"
    assert "larger than max_size" in dict(verdict.headers)["X-Amavis-Alert"]
