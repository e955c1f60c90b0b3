"""Prometheus metrics and `milterd status`: what amavisd-agent and amavisd-nanny showed, over HTTP.

One `Metrics` lives as long as the process: a reload builds a new Engine but keeps counting into
the same object. It has its own CollectorRegistry (never prometheus_client's global one), so tests
and a second instance never collide. Every label value comes from a closed set of our own
(categories, actions, check names, statuses, results, the configured backend addresses); a value
outside it is counted as "other", so nothing a message says can reach a label.

`[metrics] listen = "127.0.0.1:9469"` serves, on one port and in daemon threads:
- `/metrics`: the Prometheus text format (OpenMetrics when asked, gzip when accepted);
- `/status`: JSON for `milterd status`: the sessions in flight (age, stage, queue id), each check's
  backend (up or down, since when) and its recent latency.

The milter reports stage changes through `Metrics.sessions` (a SessionTracker): one dict update
under a lock per callback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import typing
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import __version__
from .findings import Status
from .policy import Action, Category, kept
from .quarantine import CATEGORIES as QUARANTINE_CATEGORIES
from .sanitize import printable
from .tomlschema import ConfigError

if TYPE_CHECKING:  # prometheus_client, http.server and urllib are imported where used: config.py imports this
    from .config import Config
    from .engine import Disposition

log = logging.getLogger("milterd")

# 1 ms .. 120 s: in-process checks take milliseconds, spamd up to its 60 s timeout, a message 120 s
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_WINDOW = 100  # check durations kept per check for /status (mean, p90)
SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}  # the main thread's: reload and stop
STATUS_TIMEOUT = 5.0  # seconds `milterd status` waits for the daemon
OTHER = "other"  # the label value for anything outside its closed set (never expected)

CATEGORIES = tuple(c.name for c in Category)
ACTIONS = typing.get_args(Action)
STATUSES = typing.get_args(Status)
STAGES = ("connect", "helo", "mail", "rcpt", "data", "eom", "idle")
# The settings key holding each networked check's backend address(es): the backend_up label
BACKEND_KEYS = {"clamav": "socket", "spamd": "address", "dcc": "socket", "pyzor": "servers"}
# What a finding says of its backend: it answered (1), it did not (0). Others say nothing: a skipped
# or size-limited check never asked it, and "error" may be our own bug as well as a garbled answer.
BACKEND_STATE = {"ok": True, "unavailable": False, "timeout": False}
RAN = ("ok", "unavailable", "timeout", "error")  # statuses whose elapsed time is a check's latency


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: where /metrics and /status are served."""

    listen: str = ""  # "HOST:PORT" or "[V6]:PORT"; "" = off (and `milterd status` cannot answer)


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT" or "[V6]:PORT"; ValueError says what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'{listen!r} is not HOST:PORT (IPv6: "[::1]:9469")')
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{listen!r}: an IPv6 address needs its closing bracket")
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{listen!r}: brackets are for IPv6 addresses only")
    elif ":" in host:
        raise ValueError(f'{listen!r}: put an IPv6 address in brackets, "[{host}]:{port}"')
    if any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"{listen!r}: {host!r} is not a host name or address")
    return host, int(port)


def check_metrics(settings: MetricsSettings, path: Path) -> None:
    """ConfigError naming the file and key when `[metrics] listen` is neither "" nor HOST:PORT."""
    if settings.listen:
        try:
            _, port = parse_listen(settings.listen)
        except ValueError as e:
            raise ConfigError(f"{path}: metrics.listen: {e}") from None
        if port == 0:
            raise ConfigError(f"{path}: metrics.listen: port 0 is no fixed port for Prometheus to scrape")


def backend_addresses(config: Config) -> dict[str, str]:
    """check name -> its configured backend address(es), comma-joined: the `address` label. Only
    enabled checks that talk to a daemon or server (BACKEND_KEYS)."""
    out = {}
    for name, key in BACKEND_KEYS.items():
        try:
            settings = config.check(name)
        except KeyError:  # not a registered check in this build
            continue
        if settings.enabled:
            value = getattr(settings, key)
            out[name] = ",".join(value) if isinstance(value, tuple) else str(value)
    return out


class SessionTracker:
    """The SMTP sessions in flight: id -> (started, stage, stage since, queue id), under a lock.

    `start()` at connect, `stage(sid, ...)` at each callback, `end(sid)` at close; all O(1).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = count(1)
        self._sessions: dict[int, list] = {}  # sid -> [started, stage, stage_since, queue_id]

    def start(self) -> int:
        """A new session, in stage "connect"; its id for the other calls."""
        now = self._clock()
        with self._lock:
            sid = next(self._ids)
            self._sessions[sid] = [now, "connect", now, ""]
        return sid

    def stage(self, sid: int, stage: str, queue_id: str = "") -> None:
        """The session moved to `stage` (one of STAGES); a queue id, once Postfix gave one, is kept."""
        now = self._clock()
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is not None:
                entry[1], entry[2] = stage, now
                if queue_id:
                    entry[3] = queue_id

    def end(self, sid: int) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def snapshot(self) -> list[dict]:
        """The sessions in flight, oldest first: id, age and stage age in seconds, stage, queue id."""
        now = self._clock()
        with self._lock:
            entries = [(sid, *entry) for sid, entry in self._sessions.items()]
        return [
            {
                "id": sid,
                "age": round(now - started, 3),
                "stage": stage,
                "stage_age": round(now - since, 3),
                "queue_id": printable(queue_id, 40),
            }
            for sid, started, stage, since, queue_id in sorted(entries, key=lambda e: e[1])
        ]


class _Backend:
    """What /status says of one check: its backend's state and its recent durations."""

    __slots__ = ("address", "up", "since", "durations", "last_status")

    def __init__(self, address: str = ""):
        self.address = address
        self.up: bool | None = None  # None: not known yet (no message asked it)
        self.since = 0.0  # wall clock of the last change of `up`
        self.durations: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_status = ""


class Metrics:
    """Every milterd metric, in its own registry; thread-safe; one per process, kept across reloads.

    Per message: `observe(disposition)` once the reply is decided. Per SMTP session: `sessions`
    (a SessionTracker). Per recipient: `lookup(ok)`, `deferred()`. Per configuration:
    `configure(config)`, `sessions_limit(n)`, `reload(ok)`. From the pipeline: `abandoned(check)`.
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._backends: dict[str, _Backend] = {}  # check -> its state (every check observed or configured)
        self._checks: frozenset[str] = frozenset(_registered_checks())
        self._limit = 0
        self._last_reload = 0.0
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.sessions = SessionTracker()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "milterd_messages", "Messages decided, by main category and action", ["category", "action"],
            registry=registry,
        )  # fmt: skip
        self.check_duration = Histogram(
            "milterd_check_duration_seconds", "Time a check took on a message (checks that ran)", ["check"],
            buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.check_results = Counter(
            "milterd_check_results", "Check findings by status", ["check", "status"], registry=registry
        )
        self.backend_up = Gauge(
            "milterd_backend_up", "1 when the check's backend answered its last request, 0 when it did not",
            ["check", "address"], registry=registry,
        )  # fmt: skip
        self.sessions_gauge = Gauge("milterd_sessions", "SMTP sessions in flight", registry=registry)
        self.sessions_gauge.set_function(lambda: len(self.sessions))
        self.sessions_limit_gauge = Gauge("milterd_sessions_limit", "SMTP sessions served at once", registry=registry)
        self.recipients_deferred = Counter(
            "milterd_recipients_deferred", "Recipients deferred with 452 4.5.3 (their policy differs)",
            registry=registry,
        )  # fmt: skip
        self.reloads = Counter("milterd_reloads", "Configuration reloads by result", ["result"], registry=registry)
        self.last_reload_success = Gauge(
            "milterd_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (Unix time)", registry=registry,
        )  # fmt: skip
        self.abandoned_checks = Counter(
            "milterd_abandoned_checks", "Checks abandoned when the message's time ran out", ["check"],
            registry=registry,
        )  # fmt: skip
        self.lookups = Counter(
            "milterd_lookups", "Recipient policy lookups; failed = 451 4.3.0 at RCPT", ["result"],
            registry=registry,
        )  # fmt: skip
        self.quarantined = Counter(
            "milterd_quarantined", "Messages kept in quarantine, by quarantine category", ["category"],
            registry=registry,
        )  # fmt: skip
        self.quarantine_failures = Counter(
            "milterd_quarantine_failures", "Copies that could not be kept (the message got 451)", registry=registry
        )
        # Every series of a closed set exists from the start, so rate() and absent() see zeros.
        for category in CATEGORIES:
            for action in ACTIONS:
                self.messages.labels(category, action)
        for category in QUARANTINE_CATEGORIES:
            self.quarantined.labels(category)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for result in ("ok", "failed"):
            self.lookups.labels(result)

    # ---- per configuration

    def configure(self, config: Config, when: float | None = None) -> None:
        """The configuration now in force (at start and after each successful reload): the backends'
        addresses (series of addresses no longer configured go), zeros for the enabled checks' series,
        and the last-load time. Never raises."""
        try:
            from .checks import enabled

            addresses = backend_addresses(config)
            checks = [spec.name for spec in enabled(config)]
        except Exception as e:  # metrics must never stop milterd
            log.error("metrics: configure: %s: %s", type(e).__name__, e, exc_info=True)
            return
        with self._lock:
            backends = {}
            for name in checks:  # in start order; a check that stays keeps its state and latencies
                backend = backends[name] = self._backends.get(name) or _Backend()
                if backend.address != addresses.get(name, ""):
                    if backend.up is not None:
                        self.backend_up.remove(name, backend.address)
                    backend.address, backend.up, backend.since = addresses.get(name, ""), None, 0.0
            for name, backend in self._backends.items():  # a backend_up series per address in force only
                if backend.up is not None and backends.get(name) is not backend:
                    self.backend_up.remove(name, backend.address)
            self._backends = backends
        for name in checks:
            self.check_duration.labels(name)
            self.abandoned_checks.labels(name)
            for status in STATUSES:
                self.check_results.labels(name, status)
        self._loaded(when)

    def sessions_limit(self, n: int) -> None:
        """The number of SMTP sessions served at once (the setting in force)."""
        self._limit = n
        self.sessions_limit_gauge.set(n)

    def reload(self, ok: bool, when: float | None = None) -> None:
        """A reload was tried: counted by result; a success also sets the last-load time."""
        self.reloads.labels("success" if ok else "failure").inc()
        if ok:
            self._loaded(when)

    def _loaded(self, when: float | None) -> None:
        self._last_reload = self._clock() if when is None else when
        self.last_reload_success.set(self._last_reload)

    # ---- per recipient, per check

    def lookup(self, ok: bool) -> None:
        """A recipient's policy lookup at RCPT: ok, or failed (the recipient got 451 4.3.0)."""
        self.lookups.labels("ok" if ok else "failed").inc()

    def deferred(self) -> None:
        """A recipient deferred with 452 4.5.3 (its policy differs from the transaction's)."""
        self.recipients_deferred.inc()

    def abandoned(self, check: str) -> None:
        """A check given up on because the message's time ran out (its thread may still be running)."""
        self.abandoned_checks.labels(self._check(check)).inc()

    def backend(self, check: str, address: str, up: bool) -> None:
        """Set a backend's state by hand (observe() does it from the findings)."""
        check = self._check(check)
        with self._lock:
            backend = self._backends.setdefault(check, _Backend())
            if backend.address and backend.address != address and backend.up is not None:
                self.backend_up.remove(check, backend.address)
                backend.up = None
            backend.address = address
            self._set_up(check, backend, up)

    def _set_up(self, check: str, backend: _Backend, up: bool) -> None:  # under self._lock
        if backend.up is not up:
            backend.up, backend.since = up, self._clock()
        self.backend_up.labels(check, backend.address).set(1 if up else 0)

    # ---- per message

    def observe(self, disposition: Disposition) -> None:
        """One decided message: its category and action, each check's status and duration (checks
        that ran), its backend's state, the quarantined copy or the failure to keep one. Never raises."""
        try:
            self._observe(disposition)
        except Exception as e:  # metrics must never change what happens to a message
            log.error("metrics: %s: %s", type(e).__name__, e, exc_info=True)

    def _observe(self, disposition: Disposition) -> None:
        from .engine import QUARANTINE_FAILED

        outcome = disposition.outcome
        verdict = outcome.verdict
        category = _closed(verdict.category.name, CATEGORIES)
        self.messages.labels(category, _closed(verdict.action, ACTIONS)).inc()
        for name, finding in disposition.findings.items():
            check, status = self._check(name), _closed(finding.status, STATUSES)
            self.check_results.labels(check, status).inc()
            ran = status in RAN
            if ran:
                self.check_duration.labels(check).observe(max(finding.elapsed, 0.0))
            with self._lock:
                backend = self._backends.setdefault(check, _Backend())
                backend.last_status = status
                if ran:
                    backend.durations.append(max(finding.elapsed, 0.0))
                if backend.address and status in BACKEND_STATE:
                    self._set_up(check, backend, BACKEND_STATE[status])
        if outcome.quarantine_id:
            category = kept(outcome.policy, verdict) or (verdict.blocked_by or verdict.category).name.lower()
            self.quarantined.labels(_closed(category, QUARANTINE_CATEGORIES)).inc()
        elif verdict.reply == QUARANTINE_FAILED:
            self.quarantine_failures.inc()

    def _check(self, name: str) -> str:
        return name if name in self._checks else OTHER

    # ---- /status

    def status(self) -> dict:
        """What /status answers (and `milterd status` prints)."""
        now = self._clock()
        with self._lock:
            backends = [
                {
                    "check": name,
                    "address": b.address,
                    "state": {None: "unknown", True: "up", False: "down"}[b.up] if b.address else "",
                    "since": round(now - b.since, 3) if b.up is not None else None,
                    "last_status": b.last_status,
                    "latency": _latency(b.durations),
                }
                for name, b in self._backends.items()
            ]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(now - self._started, 3),
            "config_loaded": round(now - self._last_reload, 3) if self._last_reload else None,
            "sessions_limit": self._limit,
            "sessions": self.sessions.snapshot(),
            "backends": backends,
        }


def _closed(value: str, allowed) -> str:
    """The value when it is in its closed set, else "other"."""
    return value if value in allowed else OTHER


def _registered_checks() -> set[str]:
    from .checks import registry

    return set(registry())


def _latency(durations: deque[float]) -> dict:
    """n, mean, p90 (nearest rank) and max of the recent durations, in seconds."""
    values = sorted(durations)
    if not values:
        return {"n": 0, "mean": None, "p90": None, "max": None}
    p90 = values[max(0, -(-len(values) * 9 // 10) - 1)]
    return {"n": len(values), "mean": round(sum(values) / len(values), 4), "p90": round(p90, 4), "max": values[-1]}


# ---- serving


def _handler(metrics: Metrics) -> type:
    """prometheus_client's /metrics handler (OpenMetrics when asked, gzip when accepted), plus /status."""
    from prometheus_client.exposition import MetricsHandler

    class _Handler(MetricsHandler):
        """prometheus_client's /metrics handler, plus /status; nothing logged per request."""

        metrics: Metrics

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                return super().do_GET()
            if path == "/status":
                body = json.dumps(self.metrics.status()).encode()
                return self._send(200, "application/json", body)
            if path == "/":
                return self._send(200, "text/plain; charset=utf-8", b"milterd: /metrics, /status\n")
            return self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return type("MilterdMetricsHandler", (_Handler,), {"registry": metrics.registry, "metrics": metrics})


class MetricsServer:
    """/metrics and /status on one bound socket, served by a daemon thread (a thread per request)."""

    def __init__(self, metrics: Metrics, listen: str):
        host, port = parse_listen(listen)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        from http.server import ThreadingHTTPServer

        handler = _handler(metrics)
        server_class = type("MetricsHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
        server_class.daemon_threads = True
        self.httpd = server_class((host, port), handler)
        self.address: tuple[str, int] = self.httpd.server_address[:2]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="milterd-metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        """Serve from a thread that blocks the signals the main thread handles (reload, stop), as do the
        request threads it starts, so the kernel never hands SIGHUP or SIGTERM to one of them."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self

    def close(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(metrics: Metrics, listen: str) -> MetricsServer:
    """Bind `listen` ("HOST:PORT", "[V6]:PORT"; port 0 picks a free one, see .address) and serve
    /metrics and /status in a daemon thread. OSError when the address cannot be bound."""
    return MetricsServer(metrics, listen).start()


# ---- milterd status


class StatusError(Exception):
    """`milterd status` cannot answer: metrics are off, or milterd does not answer."""


def status_url(listen: str) -> str:
    """The /status URL for `[metrics] listen` (a wildcard address is asked on loopback), or a URL as given."""
    if listen.startswith(("http://", "https://")):
        return listen if urlsplit(listen).path not in ("", "/") else listen.rstrip("/") + "/status"
    if not listen:
        raise StatusError('metrics are off: set [metrics] listen (for example "127.0.0.1:9469") in milterd.toml')
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        raise StatusError(f"metrics.listen: {e}") from None
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/status"


def fetch_status(url: str, timeout: float = STATUS_TIMEOUT) -> dict:
    """The /status JSON; StatusError when milterd is not reachable or answers something else."""
    import urllib.error
    import urllib.request

    url = status_url(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our own URL)
            return json.loads(response.read(1 << 22))
    except urllib.error.HTTPError as e:
        raise StatusError(f"{url}: HTTP {e.code}: is that milterd's [metrics] listen?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(
            f"milterd is not reachable at {url}: {reason} (is it running? is [metrics] listen right?)"
        ) from None
    except ValueError as e:
        raise StatusError(f"{url}: not milterd's status: {e}") from None


def status_lines(url: str, timeout: float = STATUS_TIMEOUT) -> list[str]:
    """`milterd status`: a header, one line per session in flight (id, age, stage, time in it, queue
    id), then one line per check (its backend's address and state, its recent latency).
    `url`: `[metrics] listen` or a URL. StatusError when milterd cannot be asked."""
    return format_status(fetch_status(url, timeout))


def format_status(status: Mapping[str, Any]) -> list[str]:
    sessions, backends = status.get("sessions", []), status.get("backends", [])
    limit = status.get("sessions_limit") or "?"
    lines = [
        f"milterd {status.get('version', '?')}, pid {status.get('pid', '?')}, up {_age(status.get('uptime'))}, "
        f"config loaded {_age(status.get('config_loaded'))} ago, sessions {len(sessions)}/{limit}"
    ]
    lines.append(f"{'SESSION':>8}  {'AGE':>7}  {'STAGE':<7}{'FOR':>7}  QUEUE ID")
    for s in sessions:
        lines.append(
            f"{s['id']:>8}  {_age(s['age']):>7}  {s['stage']:<7}{_age(s['stage_age']):>7}  {s['queue_id'] or '-'}"
        )
    if not sessions:
        lines.append(f"{'':>8}  (no session in flight)")
    width = max([len(b["address"]) for b in backends] + [len("ADDRESS")])
    lines.append(
        f"{'CHECK':<8}  {'ADDRESS':<{width}}  {'STATE':<7} {'SINCE':>7}  {'N':>4} {'MEAN':>8} {'P90':>8}  LAST"
    )
    for b in backends:
        latency = b.get("latency", {})
        state = b["state"].upper() if b["state"] == "down" else b["state"] or "-"
        lines.append(
            f"{b['check']:<8}  {b['address'] or '-':<{width}}  {state:<7} {_age(b['since']):>7}  "
            f"{latency.get('n', 0):>4} {_ms(latency.get('mean')):>8} {_ms(latency.get('p90')):>8}  "
            f"{b.get('last_status') or '-'}"
        )
    return lines


def _age(seconds: float | None) -> str:
    """12.3s, 4m05s, 3h02m, 2d04h; "-" when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"
