"""milterd.metrics: what observe() and the per-session, per-recipient and per-configuration calls
count, scraped over HTTP and parsed with prometheus-client's own parser; /status and `milterd status`.

The Dispositions come from a real Engine whose network checks point at addresses where nothing
listens (so clamav and spamd are really `unavailable`), or have their findings replaced.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from milterd import metrics as m
from milterd.config import load_config
from milterd.engine import build_engine
from milterd.findings import Finding
from milterd.message import Envelope, Message, Spool
from milterd.quarantine import QuarantineError
from milterd.tomlschema import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAD = (
    b"From: Someone <someone@remote.test>\r\nTo: alice@example.com\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@remote.test>\r\n"
)
CLEAN = HEAD + b"Subject: hello\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
HOSTILE_NAME = 'evil"},x{y="1\\n.exe'  # would break a label if it ever reached one
NOWHERE_CLAMD = "/nonexistent/clamd.ctl"


def banned_message(filename: str = "invoice.pdf.exe") -> bytes:
    return (
        HEAD + b'Subject: {"category":"CLEAN"}\r\nMIME-Version: 1.0\r\n'
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nbm90aGluZw==\r\n--b1--\r\n"
    )


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connecting is refused


def write_config(directory: Path, network: bool = False, metrics: str = "") -> Path:
    """Daemonless: banned and headers only; `network` turns clamav and spamd on at dead addresses."""
    rules = directory / "rules"
    rules.mkdir(parents=True)
    shutil.copy(ROOT / "rules" / "banned.toml", rules / "banned.toml")
    (rules / "policy.toml").write_text('local_domains = ["example.com"]\n[destiny]\nbanned = "REJECT"\n')
    off = ("dkim", "spf", "dmarc") + (() if network else ("clamav", "spamd"))
    text = '[milter]\nhostname = "mx.example.com"\n' + "".join(f"[{n}]\nenabled = false\n" for n in off)
    if network:
        text += f'[clamav]\nsocket = ["{NOWHERE_CLAMD}"]\ntimeout = 2\n'
        text += f'[spamd]\naddress = ["127.0.0.1:{refused_port()}"]\ntimeout = 2\n'
    text += f'[quarantine]\ndirectory = "{directory / "quarantine"}"\n[notify]\noutbox = "{directory / "outbox"}"\n'
    path = directory / "milterd.toml"
    path.write_text(text)
    return path


@pytest.fixture
def make_engine(tmp_path):
    engines = []

    def make(network: bool = False):
        config = load_config(write_config(tmp_path / f"config{len(engines)}", network))
        engines.append(build_engine(config))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def evaluate(engine, raw: bytes, queue_id: str = "4QTEST1"):
    envelope = Envelope(
        "someone@remote.test", ("alice@example.com",), "192.0.2.1", "mail.remote.test", queue_id=queue_id
    )
    message = Message(envelope, Spool.copy_of(io.BytesIO(raw)))
    return engine.evaluate(message)


def samples(metrics: m.Metrics, text: str | None = None) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed with prometheus-client's parser."""
    text = generate_latest(metrics.registry).decode() if text is None else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def changes(before: dict, after: dict) -> dict[tuple, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def counted(after: dict, before: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in changes(before, after).items() if n == name}


def test_observe_counts_a_clean_and_a_banned_message_in_exactly_their_series(make_engine):
    engine = make_engine()
    metrics = m.Metrics()
    metrics.configure(engine.config)
    before = samples(metrics)

    metrics.observe(evaluate(engine, CLEAN))
    metrics.observe(evaluate(engine, banned_message()))
    after = samples(metrics)

    assert counted(after, before, "milterd_messages_total") == {
        (("action", "accept"), ("category", "CLEAN")): 1,
        (("action", "reject"), ("category", "BANNED")): 1,
    }
    assert counted(after, before, "milterd_check_results_total") == {
        (("check", "banned"), ("status", "ok")): 2,
        (("check", "headers"), ("status", "ok")): 2,
    }
    assert counted(after, before, "milterd_check_duration_seconds_count") == {
        (("check", "banned"),): 2,
        (("check", "headers"),): 2,
    }
    assert counted(after, before, "milterd_quarantined_total") == {(("category", "banned"),): 1}
    # nothing else moved: no backend, no failure, no lookup, no reload
    moved = {name for name, _ in changes(before, after)}
    assert moved == {
        "milterd_messages_total",
        "milterd_check_results_total",
        "milterd_check_duration_seconds_count",
        "milterd_check_duration_seconds_sum",
        "milterd_check_duration_seconds_bucket",
        "milterd_quarantined_total",
    }


def test_backends_that_do_not_answer_are_down_and_come_up_with_an_ok_finding(make_engine):
    engine = make_engine(network=True)
    metrics = m.Metrics()
    metrics.configure(engine.config)
    clamd, spamd = NOWHERE_CLAMD, engine.config.spamd.address[0]
    assert ("milterd_backend_up", (("address", clamd), ("check", "clamav"))) not in samples(metrics)  # unknown

    disposition = evaluate(engine, CLEAN)
    assert {n: f.status for n, f in disposition.findings.items()}["clamav"] == "unavailable"
    before = samples(metrics)
    metrics.observe(disposition)
    after = samples(metrics)

    assert after[("milterd_backend_up", (("address", clamd), ("check", "clamav")))] == 0
    assert after[("milterd_backend_up", (("address", spamd), ("check", "spamd")))] == 0
    assert counted(after, before, "milterd_messages_total") == {(("action", "tempfail"), ("category", "UNCHECKED")): 1}
    assert counted(after, before, "milterd_check_results_total")[(("check", "clamav"), ("status", "unavailable"))] == 1
    assert counted(after, before, "milterd_check_results_total")[(("check", "spamd"), ("status", "unavailable"))] == 1

    # clamd answers again; spamd is skipped (a virus): it says nothing of spamd, which stays down
    findings = dict(disposition.findings)
    findings["clamav"] = Finding("clamav", "ok", True, elapsed=0.012, virus_scanned=True)
    findings["spamd"] = Finding("spamd", "skipped", detail="virus found")
    metrics.observe(replace(disposition, findings=findings))
    after = samples(metrics)
    assert after[("milterd_backend_up", (("address", clamd), ("check", "clamav")))] == 1
    assert after[("milterd_backend_up", (("address", spamd), ("check", "spamd")))] == 0
    status = {b["check"]: b for b in metrics.status()["backends"]}
    assert status["clamav"]["state"] == "up" and status["spamd"]["state"] == "down"
    assert status["banned"]["state"] == ""  # in-process: no backend


def test_a_changed_address_drops_the_old_series_and_a_disabled_check_its_own(make_engine):
    engine = make_engine(network=True)
    metrics = m.Metrics()
    metrics.configure(engine.config)
    metrics.observe(evaluate(engine, CLEAN))
    assert any(n == "milterd_backend_up" for n, _ in samples(metrics))

    moved = replace(
        engine.config,
        checks={
            **engine.config.checks,
            "clamav": replace(engine.config.clamav, socket=("tcp:127.0.0.1:3310", "/run/clamd.ctl")),
        },
    )
    metrics.configure(moved)
    up = {labels for n, labels in samples(metrics) if n == "milterd_backend_up"}
    assert up == {(("address", engine.config.spamd.address[0]), ("check", "spamd"))}
    assert {b["check"]: b["address"] for b in metrics.status()["backends"]}[
        "clamav"
    ] == "tcp:127.0.0.1:3310,/run/clamd.ctl"

    metrics.configure(make_engine().config)  # clamav and spamd off
    assert not any(n == "milterd_backend_up" for n, _ in samples(metrics))
    assert "clamav" not in {b["check"] for b in metrics.status()["backends"]}


def test_a_copy_that_cannot_be_kept_is_a_quarantine_failure(make_engine, monkeypatch):
    engine = make_engine()
    metrics = m.Metrics()

    def broken(message, entry):
        raise QuarantineError("disk full")

    monkeypatch.setattr(engine.quarantine, "keep", broken)
    before = samples(metrics)
    metrics.observe(evaluate(engine, banned_message()))
    after = samples(metrics)
    assert counted(after, before, "milterd_quarantine_failures_total") == {(): 1}
    assert counted(after, before, "milterd_quarantined_total") == {}
    assert counted(after, before, "milterd_messages_total") == {(("action", "tempfail"), ("category", "BANNED")): 1}


def test_label_values_never_carry_message_content(make_engine):
    engine = make_engine()
    metrics = m.Metrics()
    metrics.configure(engine.config)
    disposition = evaluate(engine, banned_message(HOSTILE_NAME), queue_id='Q"{x}')
    # a check nobody registered and a status nobody defined: "other", never the text
    findings = {**disposition.findings, HOSTILE_NAME: Finding(HOSTILE_NAME, "ok", detail=HOSTILE_NAME)}
    findings["banned"] = replace(findings["banned"], status=HOSTILE_NAME)
    metrics.observe(replace(disposition, findings=findings))
    metrics.abandoned(HOSTILE_NAME)
    metrics.backend(HOSTILE_NAME, "127.0.0.1:783", False)

    text = generate_latest(metrics.registry).decode()
    assert "evil" not in text and 'Q\\"' not in text and 'CLEAN\\"' not in text
    closed = {
        "category": set(m.CATEGORIES) | set(m.QUARANTINE_CATEGORIES),
        "action": set(m.ACTIONS),
        "status": set(m.STATUSES) | {m.OTHER},
        "check": set(m._registered_checks()) | {m.OTHER},
        "result": {"ok", "failed", "success", "failure"},
        "address": {"127.0.0.1:783"},
        "le": None,
    }
    for (_name, labels), _ in samples(metrics, text).items():
        for key, value in labels:
            assert closed[key] is None or value in closed[key], (key, value)
    assert samples(metrics, text)[("milterd_check_results_total", (("check", "other"), ("status", "ok")))] == 1
    assert samples(metrics, text)[("milterd_check_results_total", (("check", "banned"), ("status", "other")))] == 1


def test_a_failed_lookup_a_452_split_reloads_sessions_and_abandoned_checks_are_counted():
    metrics = m.Metrics(clock=lambda: 1700000000.0)
    metrics.lookup(True)
    metrics.lookup(True)
    metrics.lookup(False)
    metrics.deferred()
    metrics.reload(False)
    metrics.reload(True, when=1700000123.0)
    metrics.abandoned("spamd")
    metrics.sessions_limit(100)
    first, second = metrics.sessions.start(), metrics.sessions.start()
    metrics.sessions.end(first)

    s = samples(metrics)
    assert s[("milterd_lookups_total", (("result", "ok"),))] == 2
    assert s[("milterd_lookups_total", (("result", "failed"),))] == 1
    assert s[("milterd_recipients_deferred_total", ())] == 1
    assert s[("milterd_reloads_total", (("result", "failure"),))] == 1
    assert s[("milterd_reloads_total", (("result", "success"),))] == 1
    assert s[("milterd_config_last_reload_success_timestamp_seconds", ())] == 1700000123.0
    assert s[("milterd_abandoned_checks_total", (("check", "spamd"),))] == 1
    assert s[("milterd_sessions", ())] == 1
    assert s[("milterd_sessions_limit", ())] == 100
    metrics.sessions.end(second)
    metrics.sessions.end(second)  # twice: harmless
    assert samples(metrics)[("milterd_sessions", ())] == 0


def test_observe_never_raises():
    metrics = m.Metrics()
    metrics.observe(object())  # not a Disposition: logged, not raised


@pytest.fixture
def served():
    metrics = m.Metrics()
    server = m.serve_metrics(metrics, "127.0.0.1:0")
    yield metrics, f"{server.address[0]}:{server.address[1]}"
    server.close()


def get(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_the_endpoint_serves_every_contract_name_to_prometheus_clients_parser(served, make_engine):
    metrics, listen = served
    engine = make_engine()
    metrics.configure(engine.config, when=1700000000.0)
    metrics.observe(evaluate(engine, CLEAN))
    metrics.deferred()
    metrics.lookup(False)

    code, kind, body = get(f"http://{listen}/metrics")
    assert code == 200 and kind.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {
        "milterd_messages": "counter",
        "milterd_check_duration_seconds": "histogram",
        "milterd_check_results": "counter",
        "milterd_backend_up": "gauge",
        "milterd_sessions": "gauge",
        "milterd_sessions_limit": "gauge",
        "milterd_recipients_deferred": "counter",
        "milterd_reloads": "counter",
        "milterd_config_last_reload_success_timestamp_seconds": "gauge",
        "milterd_abandoned_checks": "counter",
        "milterd_lookups": "counter",
        "milterd_quarantined": "counter",
        "milterd_quarantine_failures": "counter",
    }.items() <= {name: f.type for name, f in families.items()}.items()
    s = samples(metrics, body.decode())
    assert s[("milterd_messages_total", (("action", "accept"), ("category", "CLEAN")))] == 1
    assert s[("milterd_recipients_deferred_total", ())] == 1
    assert s[("milterd_lookups_total", (("result", "failed"),))] == 1
    buckets = [float(dict(labels)["le"]) for n, labels in s if n == "milterd_check_duration_seconds_bucket"]
    assert min(buckets) == 0.001 and max(b for b in buckets if b != float("inf")) == 120.0
    assert "milterd_messages_total" not in generate_latest().decode()  # never the global registry

    assert get(f"http://{listen}/metrics", {"Accept-Encoding": "gzip"})[2][:2] == b"\x1f\x8b"
    with pytest.raises(urllib.error.HTTPError) as e:
        get(f"http://{listen}/nothing")
    assert e.value.code == 404


def test_status_json_has_sessions_with_age_and_stage_and_backends_with_latency(served, make_engine):
    metrics, listen = served
    engine = make_engine(network=True)
    metrics.configure(engine.config)
    metrics.sessions_limit(100)
    disposition = evaluate(engine, CLEAN)
    for elapsed in (0.010, 0.020, 0.030, 0.040, 0.100):
        findings = {**disposition.findings, "clamav": Finding("clamav", "ok", True, elapsed=elapsed)}
        metrics.observe(replace(disposition, findings=findings))
    sid = metrics.sessions.start()
    metrics.sessions.stage(sid, "helo")
    metrics.sessions.stage(sid, "mail", queue_id="4QTEST1")
    metrics.sessions.stage(sid, "rcpt")
    other = metrics.sessions.start()

    code, kind, body = get(f"http://{listen}/status")
    status = json.loads(body)
    assert code == 200 and kind == "application/json"
    assert set(status) == {"version", "pid", "uptime", "config_loaded", "sessions_limit", "sessions", "backends"}
    assert status["sessions_limit"] == 100
    assert [(s["id"], s["stage"], s["queue_id"]) for s in status["sessions"]] == [
        (sid, "rcpt", "4QTEST1"),
        (other, "connect", ""),
    ]
    assert all(s["age"] >= s["stage_age"] >= 0 for s in status["sessions"])
    backends = {b["check"]: b for b in status["backends"]}
    assert list(backends)[:2] == ["clamav", "spamd"]  # in start order
    clamav = backends["clamav"]
    assert clamav["address"] == NOWHERE_CLAMD and clamav["state"] == "up" and clamav["last_status"] == "ok"
    assert clamav["latency"] == {"n": 5, "mean": 0.04, "p90": 0.1, "max": 0.1}
    assert backends["spamd"]["state"] == "down" and backends["spamd"]["latency"]["n"] == 5
    assert backends["banned"]["address"] == "" and backends["banned"]["state"] == ""


def test_status_lines_show_one_line_per_session_and_per_check(served, make_engine):
    metrics, listen = served
    engine = make_engine(network=True)
    metrics.configure(engine.config)
    metrics.sessions_limit(100)
    metrics.observe(evaluate(engine, CLEAN))
    sid = metrics.sessions.start()
    metrics.sessions.stage(sid, "eom", queue_id="4QTEST1")

    lines = m.status_lines(listen)
    assert lines[0].startswith(f"milterd {m.__version__}, pid ") and lines[0].endswith("sessions 1/100")
    assert lines[1].split() == ["SESSION", "AGE", "STAGE", "FOR", "QUEUE", "ID"]
    assert lines[2].split()[0] == str(sid) and lines[2].split()[2:] == ["eom", lines[2].split()[3], "4QTEST1"]
    assert lines[3].split()[:3] == ["CHECK", "ADDRESS", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert rows["clamav"][1:3] == [NOWHERE_CLAMD, "DOWN"] and rows["clamav"][-1] == "unavailable"
    assert rows["spamd"][1:3] == [engine.config.spamd.address[0], "DOWN"]
    assert rows["banned"][1:4] == ["-", "-", "-"] and rows["banned"][4] == "1" and rows["banned"][-1] == "ok"
    assert len(m.status_lines(f"http://{listen}/status")) == len(lines)  # a URL works as well


def test_format_status_of_a_quiet_daemon():
    lines = m.format_status(
        {
            "version": "1",
            "pid": 7,
            "uptime": 3725,
            "config_loaded": 65,
            "sessions_limit": 0,
            "sessions": [],
            "backends": [],
        }
    )
    assert lines[0] == "milterd 1, pid 7, up 1h02m, config loaded 1m05s ago, sessions 0/?"
    assert "no session in flight" in lines[2]
    assert m._age(5.25) == "5.2s" and m._age(90000) == "1d01h" and m._ms(0.0125) == "12ms" and m._ms(None) == "-"


def test_status_lines_say_clearly_when_milterd_cannot_be_asked():
    with pytest.raises(m.StatusError, match=r"metrics are off: set \[metrics\] listen"):
        m.status_lines("")
    port = refused_port()
    with pytest.raises(m.StatusError, match=rf"milterd is not reachable at http://127.0.0.1:{port}/status"):
        m.status_lines(f"127.0.0.1:{port}")
    assert m.status_url("0.0.0.0:9469") == "http://127.0.0.1:9469/status"
    assert m.status_url("[::]:9469") == "http://[::1]:9469/status"
    assert m.status_url("http://mx:9469") == "http://mx:9469/status"


def test_ipv6_listen(make_engine):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = m.serve_metrics(m.Metrics(), "[::1]:0")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert get(f"http://[::1]:{server.address[1]}/metrics")[0] == 200
    finally:
        server.close()


@pytest.mark.parametrize(
    "listen, error",
    [
        ("9469", "is not HOST:PORT"),
        ("127.0.0.1:", "is not HOST:PORT"),
        ("127.0.0.1:99999", "is not HOST:PORT"),
        ("127.0.0.1:0", "port 0"),
        ("::1:9469", "put an IPv6 address in brackets"),
        ("[::1:9469", "needs its closing bracket"),
        ("[127.0.0.1]:9469", "brackets are for IPv6"),
        ("local host:9469", "is not a host name"),
    ],
)
def test_check_metrics_names_the_file_and_the_key(listen, error):
    with pytest.raises(ConfigError, match=rf"^/etc/milterd/milterd.toml: metrics.listen: .*{error}"):
        m.check_metrics(m.MetricsSettings(listen), Path("/etc/milterd/milterd.toml"))


@pytest.mark.parametrize("listen", ["", "127.0.0.1:9469", "[::1]:9469", "localhost:9469", "0.0.0.0:9469"])
def test_check_metrics_accepts(listen):
    m.check_metrics(m.MetricsSettings(listen), Path("milterd.toml"))


def test_the_server_threads_block_the_signals_the_main_thread_handles(served):
    metrics, listen = served
    get(f"http://{listen}/status")
    thread = next(t for t in threading.enumerate() if t.name == "milterd-metrics")
    blocked = int(
        re.search(r"^SigBlk:\s*([0-9a-f]+)$", Path(f"/proc/self/task/{thread.native_id}/status").read_text(), re.M)[1],
        16,
    )
    assert all(blocked & (1 << (sig - 1)) for sig in m.SIGNALS)


def test_concurrent_observers_and_sessions_add_up(make_engine):
    engine = make_engine()
    metrics = m.Metrics()
    disposition = evaluate(engine, CLEAN)

    def work():
        for _ in range(200):
            sid = metrics.sessions.start()
            metrics.sessions.stage(sid, "eom")
            metrics.observe(disposition)
            metrics.lookup(True)
            metrics.sessions.end(sid)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = samples(metrics)
    assert s[("milterd_messages_total", (("action", "accept"), ("category", "CLEAN")))] == 1600
    assert s[("milterd_check_duration_seconds_count", (("check", "banned"),))] == 1600
    assert s[("milterd_lookups_total", (("result", "ok"),))] == 1600
    assert s[("milterd_sessions", ())] == 0
    assert {b["check"]: b["latency"]["n"] for b in metrics.status()["backends"]}["banned"] == m.LATENCY_WINDOW
