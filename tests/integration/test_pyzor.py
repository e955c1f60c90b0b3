"""The Pyzor check, its cache and `milterd report` against a real pyzord on loopback."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from milterd.checks.pyzor import PyzorCheck, digest
from milterd.message import Envelope, Message, Spool
from milterd.scores import default_scores
from tests.conftest import MILTERD, ROOT

TIMEOUT = 1.0
WORDS = "apple river stone cloud maple tiger lemon piano quartz violet amber cedar".split()


def spam_text() -> str:
    """A body nobody else reported: Pyzor ignores long tokens, addresses and URLs, so the
    difference is in short words, on more lines than pyzor digests whole."""
    rng = random.Random()
    return "".join(f"Offer {' '.join(rng.choices(WORDS, k=4))} today {rng.randrange(1000)}\n" for _ in range(8))


def mail(body: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@remote.test", "u@example.com", "offer"
    msg.set_content(body)
    return msg.as_bytes()


def message(raw: bytes) -> Message:
    spool = Spool()
    spool.write(raw)
    return Message(Envelope(mail_from="a@remote.test", rcpts=("u@example.com",)), spool)


def config(directory: Path, *servers: str) -> Path:
    """Only the pyzor check: the other checks are off, so a verdict depends on nothing else."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "milterd.toml"
    off = "".join(
        f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "banned", "headers", "dkim", "spf", "dmarc")
    )
    milter = f'[milter]\nrules = "{ROOT / "rules"}"\n'
    path.write_text(
        f"{milter}{off}[pyzor]\nenabled = true\nservers = {json.dumps(list(servers))}\ntimeout = {TIMEOUT}\n"
    )
    return path


def report(cfg: Path, kind: str, eml: Path, times: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MILTERD, "report", f"--{kind}", "--config", str(cfg), *[str(eml)] * times], capture_output=True, text=True
    )


def scan(cfg: Path, eml: Path) -> dict:
    out = subprocess.run([MILTERD, "scan", "--json", "--config", str(cfg), str(eml)], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def check(pyzord, *servers: str) -> PyzorCheck:
    return PyzorCheck(servers or (pyzord.address,), TIMEOUT, 512000, default_scores()["pyzor"])


def test_digest_is_pyzors_own(pyzord, tmp_path):
    raw = mail(spam_text())
    out = subprocess.run(["pyzor", "--homedir", str(pyzord.client_home), "digest"], input=raw, capture_output=True)
    assert out.stdout.decode().strip() == digest(raw)


def test_reported_count_min_times_hits(pyzord, tmp_path):
    eml = tmp_path / "spam.eml"
    eml.write_bytes(mail(spam_text()))
    cfg = config(tmp_path, pyzord.address)

    done = report(cfg, "spam", eml, 4)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("pyzor: reported as spam") == 4
    below = check(pyzord).run(message(eml.read_bytes()))
    assert (below.status, below.score, below.symbols) == ("ok", None, ())
    assert below.detail.startswith("count 4, whitelisted 0")

    assert report(cfg, "spam", eml, 1).returncode == 0
    hit = check(pyzord).run(message(eml.read_bytes()))
    assert hit.status == "ok"
    assert hit.symbols == (("PYZOR_CHECK", 1.985),) and hit.score == 1.985
    assert hit.detail.startswith("count 5, whitelisted 0")

    scanned = scan(cfg, eml)  # the same through the engine, as the milter sees it
    assert scanned["checks"]["pyzor"]["tests"] == {"PYZOR_CHECK": 1.985}
    assert scanned["spam_score"] == 1.985


def test_a_message_nobody_reported_is_not_hit(pyzord):
    finding = check(pyzord).run(message(mail(spam_text())))
    assert (finding.status, finding.symbols) == ("ok", ())
    assert finding.detail.startswith("count 0, whitelisted 0")


def test_whitelisted_enough_is_not_hit(pyzord, tmp_path):
    eml = tmp_path / "ham.eml"
    eml.write_bytes(mail(spam_text()))
    cfg = config(tmp_path, pyzord.address)
    assert report(cfg, "spam", eml, 6).returncode == 0
    assert report(cfg, "ham", eml, 9).returncode == 0
    assert check(pyzord).run(message(eml.read_bytes())).symbols == (("PYZOR_CHECK", 1.985),)  # 9 < whitelist_min
    done = report(cfg, "ham", eml, 1)
    assert done.returncode == 0 and "pyzor: reported as ham" in done.stdout
    finding = check(pyzord).run(message(eml.read_bytes()))
    assert (finding.status, finding.symbols) == ("ok", ())
    assert finding.detail.startswith("count 6, whitelisted 10")


def test_second_check_of_a_digest_is_answered_from_the_cache(pyzord):
    raw = mail(spam_text())
    key, pyzor = digest(raw), check(pyzord)
    t0 = time.monotonic()
    cold = pyzor.run(message(raw))
    t1 = time.monotonic()
    cached = pyzor.run(message(raw))
    t2 = time.monotonic()
    assert cold.detail == f"count 0, whitelisted 0 ({pyzord.address})"
    assert cached.detail == f"count 0, whitelisted 0 ({pyzord.address}, cached)"
    time.sleep(0.05)  # pyzord writes its usage log after answering
    assert len([line for line in pyzord.requests("check") if key in line]) == 1
    print(f"pyzor check: cold {1000 * (t1 - t0):.2f} ms, cached {1000 * (t2 - t1):.2f} ms")


def test_servers_are_asked_in_order_until_one_answers(pyzord):
    dead = f"127.0.0.1:{unused_udp_port()}"
    finding = check(pyzord, dead, pyzord.address).run(message(mail(spam_text())))
    assert finding.status == "ok" and finding.detail.endswith(f"({pyzord.address})")


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_listening_is_unavailable_and_mail_still_gets_a_verdict(tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail(spam_text()))
    cfg = config(tmp_path, f"127.0.0.1:{unused_udp_port()}")  # loopback refuses at once (ICMP port unreachable)
    t0 = time.monotonic()
    scanned = scan(cfg, eml)
    assert time.monotonic() - t0 < 5
    assert scanned["checks"]["pyzor"]["status"] == "unavailable"
    assert "refused" in scanned["checks"]["pyzor"]["detail"].lower()
    assert scanned["checks"]["pyzor"]["time_ms"] < 1000 * TIMEOUT
    assert scanned["category"] == "CLEAN" and scanned["action"] == "accept"
    assert report(cfg, "spam", eml, 1).returncode == 1


def test_a_silent_server_times_out_within_the_deadline(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # takes the request, never answers
        silent.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        finding = PyzorCheck((address, address), TIMEOUT, 512000, default_scores()["pyzor"]).run(
            message(mail(spam_text()))
        )
        elapsed = time.monotonic() - t0
    assert finding.status == "timeout", finding
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 0.5  # both servers share the one deadline
    assert finding.detail.count(address) == 2


@pytest.mark.parametrize("kind", ["spam", "ham"])
def test_report_without_an_enabled_reporter_is_a_usage_error(tmp_path, kind):
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("hi\n"))
    cfg = config(tmp_path, "127.0.0.1:1")
    cfg.write_text(cfg.read_text().replace("[pyzor]\nenabled = true", "[pyzor]\nenabled = false"))
    done = report(cfg, kind, eml, 1)
    assert done.returncode == 2 and "no collaborative check" in done.stderr
