"""Teaching SpamAssassin's Bayes through spamd's TELL (`spamd.tell`, `milterd report`) against a real spamd.

The session spamd runs without --allow-tell and with Bayes off; these tests start their own,
with --allow-tell and Bayes on in a database of their own (tests/daemons.SA_BAYES_CF), and read
what it learned with `sa-learn --dump magic` on that database.
"""

from __future__ import annotations

import email.utils
import random
import socket
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from milterd.checks import spamd as sa
from milterd.checks.spamd import SpamdCheck
from milterd.message import Envelope, Message, Spool
from tests import daemons
from tests.conftest import MILTERD, ROOT

WORDS = "apple river stone cloud maple tiger lemon piano quartz violet amber cedar harbor copper".split()


@pytest.fixture(scope="module")
def tell_spamd(tmp_path_factory):
    server = daemons.start_spamd(tmp_path_factory.mktemp("spamd-tell"), allow_tell=True)
    yield server
    server.stop()


def mail(subject: str = "offer") -> bytes:
    """A message Bayes has not seen: its own Message-ID and words."""
    rng = random.Random()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@remote.test", "u@example.com", subject
    msg["Date"], msg["Message-ID"] = email.utils.formatdate(), email.utils.make_msgid(domain="remote.test")
    msg.set_content("".join(f"{' '.join(rng.choices(WORDS, k=6))} {rng.randrange(10**6)}\n" for _ in range(10)))
    return msg.as_bytes()


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def log_lines(server, text: str) -> list[str]:
    return [line for line in server.log.read_text(errors="replace").splitlines() if text in line]


@pytest.mark.parametrize("spam", [True, False], ids=["spam", "ham"])
def test_tell_is_learned_by_bayes(tell_spamd, spam):
    nspam, nham = tell_spamd.bayes_counts()
    assert sa.tell(mail(), [address(tell_spamd)], 30, spam=spam) == []
    assert tell_spamd.bayes_counts() == ((nspam + 1, nham) if spam else (nspam, nham + 1))
    assert log_lines(tell_spamd, "Tell: Setting local for")


def test_telling_what_bayes_knows_already_is_no_failure_and_learns_nothing(tell_spamd):
    """spamd answers EX_OK without DidSet: spamc calls it "already learned"; not a failure."""
    raw = mail()
    assert sa.tell(raw, [address(tell_spamd)], 30, spam=True) == []
    counts = tell_spamd.bayes_counts()
    assert sa.tell(raw, [address(tell_spamd)], 30, spam=True) == []
    assert tell_spamd.bayes_counts() == counts
    nspam, nham = counts
    assert sa.tell(raw, [address(tell_spamd)], 30, spam=False) == []  # relearned: spam to ham
    assert tell_spamd.bayes_counts() == (nspam - 1, nham + 1)


def test_user_header_is_sent_with_tell_and_with_report(tell_spamd):
    assert sa.tell(mail(), [address(tell_spamd)], 30, "bayes-owner", spam=True) == []
    assert log_lines(tell_spamd, "Tell: Setting local for bayes-owner:")
    spool = Spool()
    spool.write(mail())
    message = Message(Envelope(mail_from="a@remote.test", rcpts=("u@example.com",)), spool)
    try:
        assert SpamdCheck([address(tell_spamd)], 30, 512000, "scan-owner").run(message).status == "ok"
    finally:
        message.close()
    assert any("message (" in line for line in log_lines(tell_spamd, " for scan-owner:"))


def test_a_user_with_control_characters_is_refused_not_sent():
    failures = sa.tell(mail(), ["127.0.0.1:1"], 5, "x\r\nSet: remote", spam=True)
    assert len(failures) == 1 and "control characters" in failures[0]
    with pytest.raises(sa.ConfigError):
        SpamdCheck(["127.0.0.1:1"], 5, 512000, "x\ny")


def test_spamd_without_allow_tell_says_it_needs_it(spamd):
    failures = sa.tell(mail(), [address(spamd)], 30, spam=True)
    assert len(failures) == 1
    assert failures[0].startswith(address(spamd) + ": ") and "--allow-tell" in failures[0]


def test_a_dead_address_is_unavailable_and_the_next_one_learns(tell_spamd):
    dead = f"127.0.0.1:{daemons.free_port()}"
    failures = sa.tell(mail(), [dead], 5, spam=True)
    assert len(failures) == 1 and failures[0].startswith(f"{dead}: unavailable")
    nspam, nham = tell_spamd.bayes_counts()
    assert sa.tell(mail(), [dead, address(tell_spamd)], 30, spam=True) == []
    assert tell_spamd.bayes_counts() == (nspam + 1, nham)


def test_a_spamd_refusing_tell_fails_over_to_one_that_takes_it(spamd, tell_spamd):
    nspam, nham = tell_spamd.bayes_counts()
    assert sa.tell(mail(), [address(spamd), address(tell_spamd)], 30, spam=False) == []
    assert tell_spamd.bayes_counts() == (nspam, nham + 1)


def test_a_silent_spamd_is_bounded_by_the_timeout():
    with socket.socket() as silent:  # accepts (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        failures = sa.tell(mail(), [where, where], 1.0, spam=True)
        elapsed = time.monotonic() - t0
    assert elapsed < 1.5
    assert failures[0] == f"{where}: no answer in 1s"
    assert len(failures) == 2  # the second got no time: said so, not silently dropped


def config(directory: Path, spamd_address: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "milterd.toml"
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "pyzor", "razor", "dkim", "spf", "dmarc"))
    milter = f'[milter]\nrules = "{ROOT / "rules"}"\n'
    path.write_text(f'{milter}{off}[spamd]\naddress = "{spamd_address}"\ntimeout = 30\n')
    return path


@pytest.mark.parametrize("kind", ["spam", "ham"])
def test_milterd_report_teaches_spamassassin(tell_spamd, tmp_path, kind):
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail())
    nspam, nham = tell_spamd.bayes_counts()
    done = subprocess.run(
        [MILTERD, "report", f"--{kind}", str(eml), "--config", str(config(tmp_path, address(tell_spamd)))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"m.eml: spamd: reported as {kind}" in done.stdout
    assert tell_spamd.bayes_counts() == ((nspam + 1, nham) if kind == "spam" else (nspam, nham + 1))


def test_milterd_report_to_a_spamd_without_allow_tell_fails_and_says_why(spamd, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail())
    done = subprocess.run(
        [MILTERD, "report", "--spam", str(eml), "--config", str(config(tmp_path, address(spamd)))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "m.eml: spamd: not reported as spam" in done.stdout
    assert "--allow-tell" in done.stderr
