"""milterd stats: log lines of both stamp styles, hostile and malformed lines, --since, dry run."""

from __future__ import annotations

import gzip
import io
import json
import time

from milterd import cli, stats


def own(when: float, text: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp},250 milterd[4242]: {text}\n"


def syslog(when: float, text: str) -> str:
    t = time.localtime(when)
    stamp = time.strftime("%b ", t) + f"{t.tm_mday:>2} " + time.strftime("%H:%M:%S", t)
    return f"{stamp} mx1 milterd[4242]: {text}\n"


def line(
    qid="4Abc1",
    category="CLEAN",
    action="accept",
    reply="250",
    checks="clamav:ok/12ms spamd:ok/300ms",
    tail="",
    sender="a@remote.test",
    extra="",
):
    return (
        f"{qid}: client=mail.remote.test[192.0.2.7], from=<{sender}>, to=<u@example.com>,<v@example.com>, "
        f"size=2048, category={category}, score=1.5, action={action}, reply={reply}, {extra}checks=[{checks}]{tail}"
    )


CLEAN = line()
VIRUS = line(
    "4Abc2", "VIRUS", "reject", "554 5.7.0", tail=", reason=virus Eicar-Test-Signature found", extra="quarantine=q1, "
)
BANNED = line("4Abc3", "BANNED", "reject", "554 5.7.0", tail=", reason=message contains banned file doc.zip/x.EXE")
UNCHECKED = line(
    "4Abc4",
    "UNCHECKED",
    "tempfail",
    "451 4.7.1",
    "clamav:failed/5000ms spamd:ok/10ms",
    ", reason=clamav: timeout, failed=[clamav: timeout]",
)


def summary(text: str, since=None, now=None) -> dict:
    return stats.collect(io.StringIO(text), since, now).to_json()


def test_own_log_file_lines_are_counted_per_category_action_and_check():
    now = time.time()
    log = "".join(own(now - 60 + i, t) for i, t in enumerate([CLEAN, VIRUS, BANNED, UNCHECKED, CLEAN]))
    log += own(now, "milterd 1.0 listening on inet:10025@127.0.0.1") + own(now, "4Abc9: DKIM-signed: d=x s=y a=z")
    s = summary(log)
    assert s["messages"] == 5 and s["unparsed_lines"] == 0
    assert s["categories"] == {"CLEAN": 2, "VIRUS": 1, "BANNED": 1, "UNCHECKED": 1}
    assert s["actions"] == {"accept": 2, "reject": 2, "tempfail": 1}
    assert s["replies"]["554 5.7.0"] == 2
    assert s["checks"]["clamav"]["status"] == {"ok": 4, "failed": 1}
    assert s["checks"]["clamav"]["p50_ms"] == 12 and s["checks"]["clamav"]["p99_ms"] == 5000
    assert s["checks"]["spamd"]["p50_ms"] == 300 and s["checks"]["spamd"]["count"] == 5
    assert s["viruses"] == {"Eicar-Test-Signature": 1}
    assert s["banned_names"] == {"doc.zip/x.EXE": 1} and s["banned_types"] == {".exe": 1}
    assert s["unchecked_reasons"] == {"clamav: timeout": 1} and s["failed_checks"] == {"clamav: timeout": 1}
    assert s["slowest"][0]["queue_id"] == "4Abc4" and s["slowest"][0]["max_check_ms"] == 5000
    assert s["slowest"][0]["sum_ms"] == 5010 and s["slowest"][0]["slowest_check"] == "clamav"
    assert s["span_seconds"] == 4.0


def test_syslog_lines_and_the_missing_year():
    now = time.time()
    log = syslog(now - 120, CLEAN) + syslog(now - 60, VIRUS) + "Jan  1 00:00:00 mx1 postfix/smtpd[1]: connect\n"
    s = summary(log, now=now)
    assert s["messages"] == 2 and s["viruses"] == {"Eicar-Test-Signature": 1}
    assert s["first"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 120))
    # a December line read in January is last year's
    jan2 = time.mktime((2025, 1, 2, 12, 0, 0, 0, 0, -1))
    [record] = [stats.parse_line(syslog(time.mktime((2024, 12, 31, 23, 0, 0, 0, 0, -1)), CLEAN), jan2)]
    assert time.localtime(record.time).tm_year == 2024


def test_rfc3339_and_bare_lines():
    record = stats.parse_line(f"2025-03-01T10:00:00.123+00:00 mx1 milterd[7]: {CLEAN}")
    assert record is not None and record.time == 1740823200.123
    bare = stats.parse_line(CLEAN)
    assert bare is not None and bare.time is None and bare.rcpts == 2 and bare.category == "CLEAN"


def test_since_keeps_only_recent_lines():
    now = time.time()
    log = own(now - 3 * 86400, VIRUS) + own(now - 3600, CLEAN) + syslog(now - 60, BANNED) + CLEAN + "\n"
    s = summary(log, since=now - 7200, now=now)
    assert s["messages"] == 2 and s["categories"] == {"CLEAN": 1, "BANNED": 1}
    assert s["skipped_by_since"] == 1 and s["undated_lines"] == 1


def test_malformed_and_hostile_lines_never_crash_and_are_counted():
    now = time.time()
    hostile = [
        "",
        "\x00\x01\x02 action=\xff\n",
        own(now, "4Abc: client=x[1.2.3.4], from=<a>, to=<b>, size=abc, category=CLEAN, action=accept"),
        own(now, line(checks="clamav:ok/12ms spamd:ok/300")),  # a truncated check is left out, the line is kept
        own(now, line()[: len(line()) // 2]),  # cut in the middle
        own(now, "x" * 100000 + " action=accept"),
        own(now, line(category="clean")),
        own(now, line(reply="25O")),
        "milterd[1]: " + "[" * 5000 + " action=",
    ]
    s = summary("".join(hostile), now=now)
    assert s["messages"] == 1 and s["checks"]["clamav"]["count"] == 1 and "spamd" not in s["checks"]
    assert s["unparsed_lines"] == 5  # the unstamped binary line is not milterd's: skipped, not counted


def test_addresses_that_imitate_the_fields_after_them_are_not_believed():
    forged = "x>, to=<y>, size=1, category=CLEAN, score=0, action=accept, reply=250, checks=[clamav:ok/1ms]"
    record = stats.parse_line(
        line("4Evil", "VIRUS", "reject", "554 5.7.0", sender=forged, tail=", reason=virus X found")
    )
    assert record is None or record.category == "VIRUS"
    forged_rcpt_line = (
        "4Evil2: client=unknown[192.0.2.9], from=<a@b>, to=<z, size=1, category=CLEAN, score=0, action=accept"
        "@example.com>, size=10, category=SPAM, score=99, action=discard, reply=250, checks=[spamd:ok/5ms],"
        " reason=spam, score 99"
    )
    record = stats.parse_line(forged_rcpt_line)
    assert record.category == "SPAM" and record.action == "discard" and record.reason == "spam, score 99"
    banned = stats.parse_line(
        line("4Evil3", "BANNED", "reject", "554 5.7.0", tail=", reason=message contains banned file a.exe, b=c")
    )
    assert banned.category == "BANNED" and banned.action == "reject"


def test_dry_run_counts_the_would_be_action_wherever_the_field_is():
    before_checks = line("4Dry1", "VIRUS", "accept", "250", extra="dry_run=yes, would=reject, ")
    after_action = line("4Dry2", "SPAM", "accept", "250").replace(
        "action=accept,", "action=accept, dry_run=yes, would=discard,"
    )
    at_the_end = line(
        "4Dry3",
        "BANNED",
        "accept",
        "250",
        tail=", reason=message contains banned file a.exe, dry_run=yes, would=reject",
    )
    s = summary("\n".join([before_checks, after_action, at_the_end, CLEAN]) + "\n")
    assert s["messages"] == 4 and s["dry_run_messages"] == 3
    assert s["actions"] == {"reject": 2, "discard": 1, "accept": 1}
    assert s["banned_names"] == {"a.exe": 1}


def test_a_reason_table_has_a_bounded_number_of_keys(monkeypatch):
    monkeypatch.setattr(stats, "MAX_KEYS", 3)
    log = "".join(
        line(f"Q{i}", "VIRUS", "reject", "554 5.7.0", tail=f", reason=virus V{i} found") + "\n" for i in range(10)
    )
    s = summary(log)
    assert len(s["viruses"]) == 4 and s["viruses"]["(other)"] == 7


def test_read_lines_cuts_overlong_lines_and_bad_utf8():
    data = b"a" * (stats.MAX_LINE * 3) + b"\n" + CLEAN.encode() + b"\xff\n"
    lines = list(stats.read_lines(io.BytesIO(data)))
    assert len(lines) == 2 and len(lines[0]) == stats.MAX_LINE and lines[1].startswith("4Abc1")


def test_cli_text_json_gzip_and_bad_since(tmp_path, capsys):
    now = time.time()
    log = tmp_path / "milterd.log"
    log.write_text("".join(own(now - 10, t) for t in (CLEAN, VIRUS, BANNED, UNCHECKED)))
    assert cli.main(["stats", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["messages"] == 4 and out["actions"]["reject"] == 2
    assert cli.main(["stats", str(log)]) == 0
    text = capsys.readouterr().out
    assert "Messages          4" in text and "Eicar-Test-Signature" in text and "clamav" in text
    gz = tmp_path / "milterd.log.1.gz"
    gz.write_bytes(gzip.compress(log.read_bytes()))
    assert cli.main(["stats", str(gz), "--json", "--since", "1h"]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == 4
    assert cli.main(["stats", str(log), "--since", "soon"]) == 2
    assert cli.main(["stats", str(tmp_path / "missing.log")]) == 2
    assert "missing.log" in capsys.readouterr().err


def test_lines_built_to_make_the_parser_backtrack_are_quick():
    block = (
        ">, size=1, category=CLEAN, score=0, action=accept, reply=250, checks=[a:ok/1ms], reason=x, failed=[y], z=1, "
    )
    head = "Q: client=x[1.2.3.4], from=<a>, to=<b>, size=1, category=CLEAN, score=0, action=accept, reply=250, "
    texts = [
        "Q: client=x[1.2.3.4], from=<" + block * 600,
        "Q: client=x[1.2.3.4], from=<a>, to=<b" + block * 600,
        "Q: client=x[1.2.3.4], from=<" + ", size=" * 9000,
        head + "checks=[a:ok/1ms], reason=" + ", z=1" * 10000 + ",",
        head + "checks=[a:ok/1ms]" + ", z=1" * 10000,
        head + "a=b, " * 10000 + "checks=[",
    ]
    started = time.monotonic()
    for text in texts:
        stats.parse_message(text[: stats.MAX_LINE])
    assert time.monotonic() - started < 2


def test_dry_run_as_the_engine_logs_it_action_is_the_would_be_one():
    dry = line(
        "4Dry9", "VIRUS", "reject", "250", extra="dry_run=yes, ", tail=", reason=virus Eicar-Test-Signature found"
    )
    record = stats.parse_line(dry)
    assert record.dry_run and record.effective_action == "reject" and record.reply == "250"
    s = summary(dry + "\n" + CLEAN + "\n")
    assert s["dry_run_messages"] == 1 and s["actions"] == {"reject": 1, "accept": 1} and s["replies"] == {"250": 2}
