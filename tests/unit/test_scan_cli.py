"""`milterd scan` as an admin runs it: a generated 1,000-message mbox, checks that need no daemon."""

from __future__ import annotations

import email.utils
import json
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from milterd import sources

MILTERD = str(Path(sys.executable).parent / "milterd")
ROOT = Path(__file__).resolve().parents[2]
COUNT, EVERY = 1000, 100  # every 100th message (34, 134, ...) carries a Windows program
SPF_SKIPPED = "spf skipped: no client address (scan without --client-ip)"


def mail(i: int, program: bool = False) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = f"a{i}@remote.test", "u@example.com", f"test {i}"
    msg["Date"], msg["Message-ID"] = email.utils.formatdate(), f"<t.{i}@remote.test>"
    msg.set_content(f"Hello Bob, lunch on Thursday? ({i})\n")
    if program:
        msg.add_attachment(b"MZ" + b"\0" * 200, maintype="application", subtype="octet-stream", filename="setup.exe")
    return msg.as_bytes()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A config with no daemon behind it (clamd, spamd, DKIM, DMARC off; SPF skips without a client)
    and a 1,000-message mbox, written as mbox files are (From_ lines, >From quoting)."""
    root = tmp_path_factory.mktemp("scancli")
    (root / "rules").mkdir()
    for name in ("policy.toml", "banned.toml"):
        (root / "rules" / name).write_text((ROOT / "rules" / name).read_text())
    config = root / "milterd.toml"
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "dkim", "dmarc"))
    config.write_text("[milter]\n" + off)
    with open(root / "box", "wb") as box:
        for i in range(COUNT):
            raw = mail(i, program=i % EVERY == 33).replace(b"\nFrom ", b"\n>From ")
            box.write(b"From a@remote.test Thu Jan  1 00:00:00 2024\n" + raw + b"\n")
    return config, root / "box"


def scan(config: Path, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MILTERD, "scan", "--config", str(config), *map(str, args)], input=stdin, capture_output=True, timeout=300
    )


def test_the_mbox_is_read_one_message_at_a_time_as_mailbox_cuts_it(setup):
    import mailbox

    _, box = setup
    expected = mailbox.mbox(box, create=False)
    got = sources.iterate(box)
    assert [i.open().read() for i in got] == [expected.get_bytes(k) for k in expected.keys()]
    assert sources.count(box) == COUNT


def test_summary_counts_match_and_common_details_are_said_once(setup):
    config, box = setup
    result = scan(config, box)
    out = result.stdout.decode()
    assert result.returncode == 1, result.stderr  # the banned ones are blocked
    assert result.stderr == b""  # no progress bar in a pipe
    rows = [line for line in out.splitlines() if line.startswith(("accept", "reject"))]
    assert len(rows) == COUNT
    blocked = COUNT // EVERY
    assert "Summary: 1000 messages in " in out and " messages/s" in out
    assert f"category  CLEAN {COUNT - blocked}, BANNED {blocked}" in out
    assert f"action    accept {COUNT - blocked}, reject {blocked}" in out
    assert f"blocked   {blocked}:" in out and f"BANNED     {box}:734" in out
    assert re.search(r"\n  banned +\d+\.\d\ds +\d+\.\dms +\d+\.\dms  ok 1000\n", out)  # per-check time
    assert f"skipped {COUNT}" in out and f"ok {COUNT}" in out
    # said once, in the summary, not on each of the 1,000 messages
    assert out.count(SPF_SKIPPED) == 1
    summary = out[out.index("Summary:") :]
    assert "said of every message" in summary and SPF_SKIPPED in summary
    # what explains a verdict stays with its message
    assert f"{box}:34\n" + " " * 30 + "message contains banned file setup.exe" in out


def test_only_blocked_lists_only_the_blocked_ones(setup):
    config, box = setup
    out = scan(config, "--only", "blocked", box).stdout.decode()
    rows = [line for line in out.splitlines() if line.startswith(("accept", "reject"))]
    assert rows and all(r.startswith("reject") for r in rows)
    assert [r.split()[-1] for r in rows] == [f"{box}:{n}" for n in range(34, COUNT, EVERY)]
    assert "Summary: 1000 messages" in out  # the summary still counts them all


def test_json_is_one_object_per_message_and_the_summary_only_when_asked(setup):
    config, box = setup
    plain = scan(config, "--json", box)
    records = [json.loads(line) for line in plain.stdout.splitlines()]
    assert len(records) == COUNT and all("file" in r and "summary" not in r for r in records)
    assert records[33]["category"] == "BANNED" and records[33]["action"] == "reject"
    assert f"spf skipped: {records[0]['checks']['spf']['detail']}" == SPF_SKIPPED
    summed = scan(config, "--json", "--json-summary", box)
    lines = summed.stdout.splitlines()
    assert len(lines) == COUNT + 1
    assert [json.loads(line)["file"] for line in lines[:-1]] == [r["file"] for r in records]
    summary = json.loads(lines[-1])["summary"]
    assert summary["messages"] == COUNT
    assert summary["categories"] == {"CLEAN": COUNT - COUNT // EVERY, "BANNED": COUNT // EVERY}
    assert summary["actions"] == {"accept": COUNT - COUNT // EVERY, "reject": COUNT // EVERY}
    assert summary["blocked"] == COUNT // EVERY
    assert summary["every_message"] == [SPF_SKIPPED]
    assert summary["checks"]["banned"]["statuses"] == {"ok": COUNT}
    assert summary["messages_per_second"] > 0
    assert scan(config, "--json-summary", box).returncode == 2  # without --json: a usage error


def test_dash_reads_one_message_from_stdin(setup):
    config, _ = setup
    clean = scan(config, "-", stdin=mail(1))
    out = clean.stdout.decode()
    assert clean.returncode == 0, clean.stderr
    rows = [line for line in out.splitlines() if line.startswith(("accept", "reject"))]
    assert rows == [f"{'accept':<9} {'CLEAN':<10} {'-':>7}  -"]
    assert SPF_SKIPPED in out.split("Summary:")[0]  # one message: its own row says it
    banned = scan(config, "--json", "-", stdin=mail(2, program=True))
    assert banned.returncode == 1
    [record] = [json.loads(line) for line in banned.stdout.splitlines()]
    assert (record["file"], record["category"]) == ("-", "BANNED")


def test_progress_bar_on_a_terminal_not_in_a_pipe(setup):
    config, box = setup
    # stderr on a pseudo-terminal, stdout to a pipe: the bar goes to the terminal only
    controller, terminal = pty.openpty()
    # stdout to a file, not a pipe nobody reads while the terminal is read: 1,000 rows fill a pipe
    with tempfile.TemporaryFile() as listing:
        proc = subprocess.Popen([MILTERD, "scan", "--config", str(config), str(box)], stdout=listing, stderr=terminal)
        seen = b""
        while True:  # the terminal stays open here too, so reading it never ends early in EIO
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                seen += os.read(controller, 65536)
            elif proc.poll() is not None:
                break
        os.close(terminal)
        os.close(controller)
        listing.seek(0)
        out = listing.read()
    assert proc.returncode == 1
    assert b"1000/1000 100%" in seen and b"msg/s" in seen and b"ETA" in seen
    assert b"\r" not in out and b"msg/s" not in out and b"Summary: 1000 messages" in out
    quiet = subprocess.run(
        ["script", "-qec", f"{MILTERD} scan --quiet --config {config} {box} >/dev/null", "/dev/null"],
        capture_output=True,
        timeout=120,
    )
    assert b"msg/s" not in quiet.stdout


def test_usage_errors_exit_2(setup, tmp_path):
    config, box = setup
    assert scan(config, tmp_path / "missing").returncode == 2
    assert scan(config, "--jobs", "0", box).returncode == 2
    assert scan(config, "--only", "spam", box).returncode == 2


def _disposition(*details: str, reason: str = ""):
    """Just what the tally and the table read of a Disposition."""
    from types import SimpleNamespace

    from milterd.findings import Finding
    from milterd.policy import Category

    verdict = SimpleNamespace(
        category=Category.CLEAN, action="reject" if reason else "accept", blocked=bool(reason), reason=reason,
        spam_score=None,
    )  # fmt: skip
    findings = {d: Finding(d, "skipped", detail="why") for d in details}
    return SimpleNamespace(outcome=SimpleNamespace(verdict=verdict), findings=findings)


def test_a_detail_common_at_first_is_shown_once_it_is_not_and_the_summary_says_where_it_was_unsaid():
    from milterd import scanreport

    out: list[str] = []
    tally = scanreport.Tally()
    lister = scanreport.Lister(tally, "all", out.append)
    for n in range(1, 151):  # spf skipped on all; pyzor skipped on the first 120 (past the rows held back)
        lister.add(f"m:{n}", _disposition("spf", *(["pyzor"] if n <= 120 else [])))
    lister.add("m:151", _disposition("spf", "pyzor", reason="banned"))
    lister.flush()
    assert not any("spf skipped" in row for row in out)
    assert not any("pyzor" in row for row in out[:120])
    assert out[150].splitlines()[1:] == [" " * 30 + "banned", " " * 30 + "pyzor skipped: why"]
    assert tally.every() == {"spf skipped: why": None}
    assert lister.notes == ["  pyzor skipped: why: also of the first 120 messages (up to m:120), not repeated there"]


def test_a_detail_that_breaks_while_rows_are_held_back_is_shown_on_those_rows():
    from milterd import scanreport

    out: list[str] = []
    lister = scanreport.Lister(scanreport.Tally(), "all", out.append)
    lister.add("m:1", _disposition("spamd"))
    lister.add("m:2", _disposition())
    lister.flush()
    assert out == [
        f"{'accept':<9} {'CLEAN':<10} {'-':>7}  m:1\n" + " " * 30 + "spamd skipped: why",
        f"{'accept':<9} {'CLEAN':<10} {'-':>7}  m:2",
    ]
    assert lister.notes == []
