"""The Razor check with Debian's real razor-check, and its parsing of recorded razor-check output.

No Razor server is reachable from the tests: the homedir points discovery and the catalogue at
127.0.0.1 on a closed port, so razor-check fails in milliseconds without touching the network.

razor_output/ is real `razor-check -d -dl=9` output of Razor-Agents 2.84: `discovery_failed`
and `no_dns` as it failed here; `hit`, `lowcf`, `miss` and `nocf` against a stand-in catalogue
server on loopback answering `p=1&cf=93`, `p=1&cf=30`, `p=0` and `p=1` (with min_cf 50), its
rediscovery chatter cut out.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from milterd.checks.razor import Answer, RazorCheck, RazorError, parse_output, report
from milterd.message import Envelope, Message, Spool
from milterd.scores import default_scores

OUTPUT = Path(__file__).parent / "razor_output"
SCORING = default_scores()["razor"]
MAIL = b"From: a@remote.test\r\nTo: u@example.com\r\nSubject: hi\r\n\r\nHello there, a test message body.\r\n"


def message(raw: bytes = MAIL) -> Message:
    spool = Spool()
    spool.write(raw)
    return Message(Envelope(mail_from="a@remote.test", rcpts=("u@example.com",)), spool)


def recorded(name: str) -> bytes:
    return (OUTPUT / name).read_bytes()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def razor_home(tmp_path) -> Path:
    """A Razor homedir whose every server is 127.0.0.1 on a closed port."""
    home = tmp_path / "razor"
    home.mkdir()
    (home / "razor-agent.conf").write_text("razordiscovery = 127.0.0.1\nturn_off_discovery = 1\n")
    (home / "servers.catalogue.lst").write_text(f"127.0.0.1:{closed_port()}\n")
    return home


def test_parses_recorded_razor_output():
    assert parse_output(0, recorded("hit.out"), b"") == Answer(spam=True, cf=93)
    assert parse_output(1, recorded("lowcf.out"), b"") == Answer(spam=False, cf=30)
    assert parse_output(1, recorded("miss.out"), b"") == Answer(spam=False, cf=None)
    assert parse_output(0, recorded("nocf.out"), b"") == Answer(spam=True, cf=None)
    with pytest.raises(RazorError, match=r"exit 2: connect1: nextserver: Bootstrap discovery failed"):
        parse_output(2, recorded("discovery_failed.out"), recorded("discovery_failed.err"))
    with pytest.raises(RazorError, match=r"exit 2: nextserver: Bootstrap discovery failed"):
        parse_output(2, recorded("no_dns.out"), recorded("no_dns.err"))
    # stderr lost: the reason comes from the debug log's error line
    with pytest.raises(RazorError, match=r"exit 2: connect1: nextserver"):
        parse_output(2, recorded("discovery_failed.out"), b"")
    with pytest.raises(RazorError, match="killed by signal 9"):
        parse_output(-9, b"", b"")


def test_contention_parts_do_not_count():
    """Hand-made from check_resp and logic method 4's log lines: part 1.1 is in contention."""
    out = (
        b"Nov 25 09:06:52.419927 check[1484]: [ 6] mail 1.0 e=4 sig=AAAA: Not spam: cf 20 < min_cf 50\n"
        b"Nov 25 09:06:52.419930 check[1484]: [ 6] mail 1.1 e=4 sig=BBBB: Is spam: cf 99 >= min_cf 50\n"
        b"Nov 25 09:06:52.419939 check[1484]: [ 7] method 4: mail 1.0: no-contention part, spam=0\n"
        b"Nov 25 09:06:52.419941 check[1484]: [ 7] method 4: mail 1.1: contention part, skipping\n"
    )
    assert parse_output(1, out, b"") == Answer(spam=False, cf=20)


def test_scoring():
    check = RazorCheck("razor-check", "", 3.0, SCORING)
    hit = check.score(Answer(spam=True, cf=93))
    assert dict(hit.symbols) == {"RAZOR2_CHECK": 1.729, "RAZOR2_CF_RANGE_51_100": 2.430}
    assert hit.score == 4.159
    assert check.score(Answer(spam=True, cf=None)).symbols == (("RAZOR2_CHECK", 1.729),)
    # razor's own min_cf said no, but SpamAssassin scores the cf range on its own
    assert check.score(Answer(spam=False, cf=60)).symbols == (("RAZOR2_CF_RANGE_51_100", 2.430),)
    miss = check.score(Answer(spam=False, cf=30))
    assert miss.status == "ok" and miss.score is None and miss.detail == "not spam, cf 30"


def test_real_razor_check_without_a_server_is_unavailable_in_time(razor_home):
    check = RazorCheck("razor-check", str(razor_home), 3.0, SCORING)
    t0 = time.monotonic()
    finding = check.run(message())
    elapsed = time.monotonic() - t0
    assert elapsed < check.timeout + 1
    assert finding.status in ("unavailable", "timeout"), finding
    assert finding.score is None and not finding.critical
    assert "Bootstrap discovery failed" in finding.detail or finding.status == "timeout"


def test_answers_are_cached_by_message(tmp_path):
    script = tmp_path / "fake-razor"
    calls = tmp_path / "calls"
    script.write_text(
        f"#!/bin/sh\ncat >/dev/null\necho x >> {calls}\n"
        f"echo '[ 6] mail 1.0 e=4 sig=AAAA: Is spam: cf 93 >= min_cf 50'\nexit 0\n"
    )
    script.chmod(0o755)
    check = RazorCheck(str(script), "", 3.0, SCORING)
    first, second = check.run(message()), check.run(message())
    assert first.score == second.score == 4.159
    assert second.detail.endswith("cached")
    assert calls.read_text().count("x") == 1
    assert check.run(message(MAIL + b"more\r\n")).score == 4.159
    assert calls.read_text().count("x") == 2


def test_a_hanging_command_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "slow-razor"
    # the shell starts a child that would outlive it, and both ignore stdin
    script.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    check = RazorCheck(str(script), "", 0.5, SCORING)
    t0 = time.monotonic()
    finding = check.run(message(MAIL * 20000))  # over a pipe buffer: the writer must not block
    assert time.monotonic() - t0 < check.timeout + 1
    assert finding.status == "timeout"
    child = int(pidfile.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; the orphan is reaped by init shortly after
        if not _alive(child):
            break
        time.sleep(0.02)
    assert not _alive(child)


def test_a_missing_command_is_unavailable():
    finding = RazorCheck("/nonexistent/razor-check", "", 3.0, SCORING).run(message())
    assert finding.status == "unavailable" and "No such file" in finding.detail


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if sys.platform == "linux":  # a zombie waiting for init is dead for our purposes
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False
    return True


def test_report_without_an_identity_fails_and_says_why(razor_home):
    t0 = time.monotonic()
    for spam in (True, False):
        failures = report(MAIL, "/usr/bin/razor-check", str(razor_home), 3.0, spam=spam)
        assert len(failures) == 1 and "identity was not found" in failures[0], failures
        assert failures[0].startswith("razor-report exit 2" if spam else "razor-revoke exit 2")
    assert time.monotonic() - t0 < 3


def test_over_max_size_razor_check_gets_the_header_section_and_the_body_cut_at_a_line_end(tmp_path):
    """As amavis hands SpamAssassin's Razor2 plugin a truncated message; [razor] max_size."""
    script, got = tmp_path / "fake-razor", tmp_path / "stdin"
    script.write_text(f"#!/bin/sh\ncat > {got}\necho '[ 6] mail 1.0 e=4 sig=AAAA: Is spam: cf 93 >= min_cf 50'\n")
    script.chmod(0o755)
    head = b"From: a@remote.test\r\nSubject: big\r\n\r\n"
    raw = head + b"".join(b"body line %05d\r\n" % n for n in range(10000))  # 17 bytes a line
    finding = RazorCheck(str(script), "", 3.0, SCORING, max_size=1000).run(message(raw))
    assert got.read_bytes() == head + raw[len(head) : len(head) + 1000 // 17 * 17]
    assert finding.score == 4.159
    assert finding.detail == f"spam, cf 93; truncated: first {len(head) + 986} of {len(raw)} bytes checked"
    small = RazorCheck(str(script), "", 3.0, SCORING, max_size=len(raw)).run(message(raw + b"x\r\n"))
    assert got.read_bytes() == raw + b"x\r\n" and "truncated" not in small.detail
