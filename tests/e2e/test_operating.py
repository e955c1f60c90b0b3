"""Operating milterd through a real Postfix (issue 13, "How it is tested"): reload by SIGHUP and by
`milterd reload`, reloads under load, a clean stop with mail in flight, the metrics and
`milterd status`, and a stalled backend bounded by message_timeout.

Every milterd here is this module's own (one per test, each behind its own Postfix listener), so
signalling, stopping or starving one disturbs no other test.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from milterd.config import MilterSettings
from tests import daemons
from tests.conftest import GTUBE, MILTERD, Milterd, start_milterd, stop_milterd, write_config
from tests.e2e.test_postfix import attachment_message, compose, header
from tests.integration.test_message_timeout import Stalled

CLEAN = b"Hello Bob, lunch on Thursday at noon?"
MIME = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
IN_FLIGHT = 10  # messages in flight at SIGTERM
LOAD_SESSIONS, LOAD_MESSAGES = 10, 300
SPAMD_STALL = 3  # [spamd] timeout of the milterd whose spamd never answers
MESSAGE_TIMEOUT = 5  # [milter] message_timeout of the milterd whose clamd never answers


@dataclass
class Rig:
    base: Path
    postfix: daemons.Postfix
    milterds: dict[str, Milterd]
    configs: dict[str, Path]
    clamd: daemons.Clamd  # the metrics milterd's own: test_metrics stops it
    spamd_stall: Stalled  # the "stop" milterd's spamd
    clamd_stall: Stalled  # the "slow" milterd's clamd
    metrics_listen: str


def _add(config: Path, section: str, lines: str) -> None:
    """Put `lines` at the top of [section] in the milterd.toml write_config made (a new section at the end)."""
    text = config.read_text()
    if f"[{section}]\n" in text:
        text = text.replace(f"[{section}]\n", f"[{section}]\n{lines}", 1)
    else:
        text += f"[{section}]\n{lines}"
    config.write_text(text)


def _write(path: Path, text: str) -> None:
    """Replace a file at once (a reload never reads half of it); the temporary file is in the
    parent of the parent, so no rules/*.toml glob sees it."""
    tmp = path.parent.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def rig(tmp_path_factory, clamd, spamd):
    base = tmp_path_factory.mktemp("operating")
    daemons.make_traversable(base)
    spamd_addr = f"127.0.0.1:{spamd.port}"
    clamd_sock = str(clamd.socket_path)
    spamd_stall, clamd_stall = Stalled(), Stalled()
    private_clamd = daemons.start_clamd(base / "clamd")
    metrics_listen = f"127.0.0.1:{daemons.free_port()}"
    configs = {
        "reload": write_config(
            base / "reload", clamav=clamd_sock, spamd=spamd_addr, policy={"destiny": {"spam": "PASS"}}
        ),
        "load": write_config(base / "load", clamav=clamd_sock, spamd=spamd_addr, policy=POLICY_A),
        "stop": write_config(base / "stop", clamav=clamd_sock, spamd=f"127.0.0.1:{spamd_stall.port}"),
        "metrics": write_config(base / "metrics", clamav=str(private_clamd.socket_path), spamd=spamd_addr),
        "slow": write_config(base / "slow", clamav=f"tcp:127.0.0.1:{clamd_stall.port}", spamd=spamd_addr),
    }
    _add(configs["reload"], "milter", f'pidfile = "{base / "reload" / "milterd.pid"}"\n')
    # "load": two whole configurations, each a milterd.toml naming its own hostname and rules directory
    write_config(base / "load_b", clamav=clamd_sock, spamd=spamd_addr, policy=POLICY_B)
    shutil.copytree(base / "load" / "rules", base / "load" / "rules_a")
    shutil.copytree(base / "load_b" / "rules", base / "load" / "rules_b")
    _add(configs["load"], "milter", 'hostname = "a.reload.test"\nrules = "rules_a"\n')
    _add(configs["stop"], "spamd", f"timeout = {SPAMD_STALL}\ncritical = false\n")
    _add(configs["metrics"], "metrics", f'listen = "{metrics_listen}"\n')
    _add(configs["slow"], "milter", f"message_timeout = {MESSAGE_TIMEOUT}\n")
    milterds: dict[str, Milterd] = {}
    postfix = None
    try:
        with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
            started = {name: pool.submit(start_milterd, path) for name, path in configs.items()}
            for name, future in started.items():
                milterds[name] = future.result()
        postfix = daemons.start_postfix(base / "postfix", {name: m.socket for name, m in milterds.items()})
        yield Rig(base, postfix, milterds, configs, private_clamd, spamd_stall, clamd_stall, metrics_listen)
    finally:
        if postfix is not None:
            postfix.stop()
        stop_milterd(*milterds.values())
        private_clamd.stop()
        spamd_stall.close()
        clamd_stall.close()


def submit(
    rig: Rig, listener: str, body: bytes, subject: str = "test", extra: bytes = b"", smtp: smtplib.SMTP | None = None
) -> tuple[int, bytes, bytes]:
    """One message with a unique token: (SMTP code of the end of DATA, or of the command refused; text; token)."""
    token, raw = compose(body, subject, extra)
    try:
        if smtp is not None:
            smtp.sendmail("sender@remote.test", ["user@example.com"], raw)
        else:
            with smtplib.SMTP("127.0.0.1", rig.postfix.ports[listener], timeout=60) as conn:
                conn.sendmail("sender@remote.test", ["user@example.com"], raw)
    except smtplib.SMTPRecipientsRefused as e:
        code, text = next(iter(e.recipients.values()))
        return code, text, token
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error, token
    return 250, b"", token


def log_lines(milterd: Milterd, text: str) -> list[str]:
    return [line for line in milterd.log.read_text(errors="replace").splitlines() if text in line]


def wait_log(milterd: Milterd, text: str, count: int = 1, timeout: float = 2.0) -> list[str]:
    """The log lines containing text once there are `count` of them; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while len(lines := log_lines(milterd, text)) < count:
        assert time.monotonic() < deadline, f"{count} x {text!r} not logged in {timeout} s:\n" + "".join(
            milterd.log.read_text(errors="replace").splitlines(keepends=True)[-20:]
        )
        time.sleep(0.02)
    return lines


# ---------------------------------------------------------------------------------------- reload


def test_a_reload_changes_the_verdict_and_a_broken_policy_is_refused(rig):
    postfix, milterd = rig.postfix, rig.milterds["reload"]
    policy = rig.configs["reload"].parent / "rules" / "policy.toml"
    passing = policy.read_text()
    assert re.search(r'^spam = "PASS"$', passing, re.M)

    code, _, token = submit(rig, "reload", GTUBE)
    assert code == 250
    assert header(postfix.wait_delivered(token), "X-Spam-Flag") == ["YES"]

    _write(policy, re.sub(r'^spam = "PASS"$', 'spam = "REJECT"', passing, flags=re.M))
    signalled = time.monotonic()
    milterd.proc.send_signal(signal.SIGHUP)
    wait_log(milterd, "reloaded ", 1, timeout=2.0)
    assert time.monotonic() - signalled < 2.0  # the next message, sent now, meets the new rules
    code, text, _ = submit(rig, "reload", GTUBE)
    assert code == 554, (code, text)
    assert b"5.7.0 Rejected: spam" in text
    assert milterd.proc.poll() is None  # SIGHUP is a reload, not libmilter's "stop"

    # a broken rules file: refused, named with its key; the REJECT rules keep serving
    rejecting = policy.read_text()
    _write(policy, re.sub(r"^tag_level = .*$", 'tag_level = "x"', rejecting, flags=re.M))
    milterd.proc.send_signal(signal.SIGHUP)
    [refused] = wait_log(milterd, "reload refused", 1, timeout=2.0)
    assert str(policy) in refused and "tag_level" in refused, refused
    assert milterd.proc.poll() is None
    code, text, _ = submit(rig, "reload", GTUBE)
    assert code == 554 and b"5.7.0 Rejected: spam" in text
    code, _, token = submit(rig, "reload", CLEAN)
    assert code == 250
    postfix.wait_delivered(token)
    assert len(log_lines(milterd, "reloaded ")) == 1

    # `milterd reload` signals the pidfile's process: back to PASS
    _write(policy, passing)
    done = subprocess.run(
        [MILTERD, "reload", "--config", str(rig.configs["reload"])], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert f"reload sent to {milterd.proc.pid}" in done.stdout
    wait_log(milterd, "reloaded ", 2, timeout=2.0)
    code, _, token = submit(rig, "reload", GTUBE)
    assert code == 250
    assert header(postfix.wait_delivered(token), "X-Spam-Flag") == ["YES"]
    assert len(log_lines(milterd, "reload refused")) == 1


# Two whole configurations that differ in two files: milterd.toml's hostname (X-Virus-Scanned) and
# the rules directory it names, whose tag_level decides the X-Spam-* headers and whose Subject tag
# at tag_level marks the Subject. A message with parts of both would show a mix.
POLICY_A = {"tag_level": -999, "subject_tags": {"tagged": "[A] "}}
POLICY_B = {"tag_level": 1000, "subject_tags": {"tagged": "[B] "}}


def _configuration(raw: bytes) -> str:
    """'A' or 'B': the one whole configuration a delivered message's headers come from; else a description."""
    seen = (header(raw, "X-Virus-Scanned"), len(header(raw, "X-Spam-Status")), header(raw, "Subject"))
    if seen == (["milterd at a.reload.test"], 1, ["[A] load"]):
        return "A"
    if seen == (["milterd at b.reload.test"], 0, ["load"]):
        return "B"
    return f"mixed: {seen}"


def test_300_messages_over_10_sessions_with_a_reload_every_half_second(rig):
    postfix, milterd, config = rig.postfix, rig.milterds["load"], rig.configs["load"]
    text_a = config.read_text()
    assert 'hostname = "a.reload.test"' in text_a and 'rules = "rules_a"' in text_a
    text_b = text_a.replace("a.reload.test", "b.reload.test").replace('"rules_a"', '"rules_b"')
    reloads_before = len(log_lines(milterd, "reloaded "))
    stop = threading.Event()
    signals = 0

    def reloader():
        nonlocal signals
        while not stop.wait(0.5):
            _write(config, text_b if signals % 2 == 0 else text_a)
            milterd.proc.send_signal(signal.SIGHUP)
            signals += 1

    def session(n: int) -> tuple[list[bytes], list[str]]:
        tokens, errors = [], []
        smtp = smtplib.SMTP("127.0.0.1", postfix.ports["load"], timeout=60)
        try:
            for _ in range(LOAD_MESSAGES // LOAD_SESSIONS):
                code, text, token = submit(rig, "load", CLEAN, subject="load", smtp=smtp)
                if code == 250:
                    tokens.append(token)
                else:
                    errors.append(f"session {n}: {code} {text!r}")
                    smtp.close()
                    smtp = smtplib.SMTP("127.0.0.1", postfix.ports["load"], timeout=60)
        finally:
            smtp.close()
        return tokens, errors

    started = time.monotonic()
    signaller = threading.Thread(target=reloader)
    signaller.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(LOAD_SESSIONS) as pool:
            results = list(pool.map(session, range(LOAD_SESSIONS)))
    finally:
        stop.set()
        signaller.join()
    took = time.monotonic() - started
    errors = [e for _, errs in results for e in errs]
    tokens = [t for toks, _ in results for t in toks]
    assert errors == [], errors[:5]
    assert len(set(tokens)) == LOAD_MESSAGES

    deadline = time.monotonic() + 60
    while True:
        delivered = {}
        for raw in postfix.delivered():
            found = re.findall(rb"mtok_[0-9a-f]{32}", raw.split(b"\n\n", 1)[-1])
            for token in found:
                delivered.setdefault(token, []).append(raw)
        if all(t in delivered for t in tokens) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    missing = [t for t in tokens if t not in delivered]
    assert missing == [], f"{len(missing)} of {len(tokens)} never delivered"
    assert all(len(delivered[t]) == 1 for t in tokens), "a message was delivered twice"
    kinds = [_configuration(delivered[t][0]) for t in tokens]
    mixed = [k for k in kinds if k not in ("A", "B")]
    assert mixed == [], mixed[:5]
    assert kinds.count("A") > 0 and kinds.count("B") > 0, (kinds.count("A"), kinds.count("B"))

    # every SIGHUP made one reload (none refused, none lost), and milterd kept running
    time.sleep(0.5)
    assert signals >= 4, (signals, took)
    assert len(log_lines(milterd, "reloaded ")) - reloads_before == signals
    assert log_lines(milterd, "reload refused") == []
    assert milterd.proc.poll() is None
    print(
        f"\n{LOAD_MESSAGES} messages in {took:.1f} s with {signals} reloads: A {kinds.count('A')}, B {kinds.count('B')}"
    )


# ------------------------------------------------------------------------------------------- stop


def test_sigterm_lets_the_messages_in_flight_finish_then_postfix_defers(rig):
    postfix, milterd, stalled = rig.postfix, rig.milterds["stop"], rig.spamd_stall
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        sent = [pool.submit(submit, rig, "stop", CLEAN) for _ in range(IN_FLIGHT)]
        deadline = time.monotonic() + 20
        while len(stalled.open) < IN_FLIGHT:  # each message is at end of message, waiting on spamd
            assert time.monotonic() < deadline, f"only {len(stalled.open)} messages reached spamd"
            assert all(not f.done() for f in sent), [f.result() for f in sent if f.done()]
            time.sleep(0.02)
        signalled = time.monotonic()
        milterd.proc.send_signal(signal.SIGTERM)
        replies = [f.result(timeout=60) for f in sent]
        replied = time.monotonic() - signalled
    assert [code for code, _, _ in replies] == [250] * IN_FLIGHT, replies
    assert replied < SPAMD_STALL + 2, replied  # they finished as they would have, no stop_timeout wait
    exit_code = milterd.proc.wait(20)
    assert exit_code == 0
    log = milterd.log.read_text(errors="replace")
    assert "milterd stopped" in log
    assert re.search(rf"stopping: {IN_FLIGHT} transactions in flight", log), log[-2000:]
    assert "unfinished" not in log
    for _, _, token in replies:
        postfix.wait_delivered(token)
    assert len(log_lines(milterd, "reply=250")) == IN_FLIGHT

    # milterd is gone: milter_default_action = tempfail defers new mail, nothing is accepted
    code, text, token = submit(rig, "stop", CLEAN)
    assert 400 <= code < 500, (code, text)
    time.sleep(0.5)
    assert not any(token in m for m in postfix.delivered())
    assert not any(token in p.read_bytes() for p in postfix.queue_files() if p.is_file())


# ---------------------------------------------------------------------------------------- metrics


def scrape(rig: Rig) -> dict[tuple[str, frozenset], float]:
    """/metrics parsed by prometheus-client: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://{rig.metrics_listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    """The sum over the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_metrics_count_what_was_sent_and_a_stopped_clamd_is_down(rig):
    milterd, clean, banned = rig.milterds["metrics"], 3, 2
    for _ in range(clean):
        assert submit(rig, "metrics", CLEAN)[0] == 250
    for i in range(banned):
        code, text, _ = submit(
            rig, "metrics", attachment_message(f"invoice{i}.pdf.exe", b"MZ not really\r\n"), extra=MIME
        )
        assert code == 554 and b"banned file" in text, text
    samples = scrape(rig)
    assert value(samples, "milterd_messages_total", category="CLEAN", action="accept") == clean
    assert value(samples, "milterd_messages_total", category="BANNED", action="reject") == banned
    assert value(samples, "milterd_messages_total") == clean + banned
    assert value(samples, "milterd_check_results_total", check="clamav", status="ok") == clean + banned
    assert value(samples, "milterd_check_duration_seconds_count", check="clamav") == clean + banned
    assert value(samples, "milterd_backend_up", check="clamav") == 1
    assert value(samples, "milterd_sessions_limit") == MilterSettings().max_concurrent
    assert value(samples, "milterd_reloads_total", result="success") == 0

    milterd.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 2
    while value(scrape(rig), "milterd_reloads_total", result="success") != 1:
        assert time.monotonic() < deadline, "milterd_reloads_total{result=success} did not become 1"
        time.sleep(0.05)
    assert value(scrape(rig), "milterd_config_last_reload_success_timestamp_seconds") > time.time() - 10

    rig.clamd.stop()
    code, text, _ = submit(rig, "metrics", CLEAN)
    assert code == 451, (code, text)  # clamav is critical; scanner_failure is tempfail
    samples = scrape(rig)
    assert [dict(ls) for (n, ls), v in samples.items() if n == "milterd_backend_up" and ("check", "clamav") in ls] == [
        {"check": "clamav", "address": str(rig.clamd.socket_path)}
    ]
    assert value(samples, "milterd_backend_up", check="clamav") == 0
    assert value(samples, "milterd_backend_up", check="spamd") == 1
    assert value(samples, "milterd_messages_total", category="UNCHECKED", action="tempfail") == 1
    assert value(samples, "milterd_check_results_total", check="clamav", status="unavailable") == 1

    # `milterd status`: a session held open after RCPT TO, and clamav DOWN. (Postfix holds back the
    # events milterd needs not answer, connect, HELO and MAIL FROM, until the next one it must: RCPT.)
    with smtplib.SMTP("127.0.0.1", rig.postfix.ports["metrics"], timeout=30) as smtp:
        smtp.ehlo("client.remote.test")
        assert smtp.mail("sender@remote.test")[0] == 250
        assert smtp.rcpt("user@example.com")[0] == 250
        deadline = time.monotonic() + 5
        while True:
            done = subprocess.run(
                [MILTERD, "status", "--config", str(rig.configs["metrics"])], capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, done.stderr
            if re.search(r"^\s+\d+\s+\S+\s+rcpt\s", done.stdout, re.M) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    out = done.stdout
    assert f"pid {milterd.proc.pid}," in out and f"sessions 1/{MilterSettings().max_concurrent}" in out, out
    assert re.search(r"^\s+\d+\s+\S+\s+rcpt\s", out, re.M), out
    [clamav] = [line for line in out.splitlines() if line.startswith("clamav ")]
    assert str(rig.clamd.socket_path) in clamav and " DOWN " in clamav and clamav.endswith("unavailable"), clamav
    [spamd] = [line for line in out.splitlines() if line.startswith("spamd ")]
    assert " up " in spamd, spamd


# ------------------------------------------------------------------------------------ slow backend


def test_a_stalled_clamd_costs_message_timeout_then_451_and_its_socket_is_closed(rig):
    milterd, stalled = rig.milterds["slow"], rig.clamd_stall
    started = time.monotonic()
    code, text, token = submit(rig, "slow", CLEAN)
    took = time.monotonic() - started
    assert code == 451, (code, text)
    assert MESSAGE_TIMEOUT - 0.5 <= took <= MESSAGE_TIMEOUT + 2, took
    assert len(stalled.open) >= 1  # it did ask the stalled clamd
    time.sleep(0.3)
    assert stalled.still_open() == 0  # no thread keeps the socket after the reply
    [line] = wait_log(milterd, "reply=451", 1, timeout=2)
    assert "clamav:timeout" in line, line
    assert not any(token in m for m in rig.postfix.delivered())
