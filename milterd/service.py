"""The running daemon: the milter in a thread of its own, and the signals in the main thread.

libmilter's own signal thread takes SIGHUP as "stop". The main thread keeps SIGHUP, SIGTERM and
SIGINT unblocked while every other thread blocks them, so the kernel hands them to the main
thread, whose Python handlers only set flags; the main loop then acts:
- SIGHUP (`milterd reload`, `systemctl reload`): read milterd.toml and rules/ again, build and
  check a new Engine as check-config does, and swap it in. A transaction keeps the Engine it
  started with; the old one closes when its last transaction ends. A configuration that does not
  load is refused, and the old one keeps serving.
- SIGTERM, SIGINT: stop taking connections, let the transactions in flight finish (at most
  `[milter] stop_timeout`), exit 0. Any other end is an error (exit 1), for the unit to restart.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import Milter

from .engine import Engine
from .metrics import Metrics, serve_metrics
from .milter import Session, limit_malloc_arenas, run_milter
from .tomlschema import ConfigError

log = logging.getLogger("milterd")

SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
EXIT_OK, EXIT_FAILED = 0, 1
RESTART_ONLY = ("listen", "user", "timeout")  # [milter] settings a reload cannot change
# libmilter writes a callback's reply after the callback returned, and a transaction counts as
# ended when it returns: the last replies get this long to leave before the process does
REPLY_GRACE = 0.5


class Service:
    """One milterd process: the current Engine, reloads, a clean stop."""

    def __init__(self, engine: Engine, load: Callable[[], Engine], metrics: Metrics):
        """`load()` builds a new Engine from the configuration files (ConfigError when they are wrong)."""
        self.engine = engine
        self.load = load
        self.metrics = metrics
        self.metrics_server = None
        self._wake = threading.Event()
        self._reload = self._stop = False
        self._failed: BaseException | None = None

    def run(self) -> int:
        limit_malloc_arenas()
        Session.engine = self.engine
        Session.metrics = self.metrics
        Session.stopping = False
        self.metrics.configure(self.engine.config)
        self.metrics.sessions_limit(self.engine.config.milter.max_concurrent)
        if listen := self.engine.config.metrics.listen:
            try:
                self.metrics_server = serve_metrics(self.metrics, listen)
            except OSError as e:
                log.error("cannot serve metrics on %s: %s", listen, e.strerror or e)
                self.engine.close()
                return EXIT_FAILED
        for sig in SIGNALS:
            signal.signal(sig, self._signalled)
        milter = threading.Thread(target=self._serve, name="milter")
        milter.start()
        while milter.is_alive():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._reload:
                self._reload = False
                self.reload()
            if self._stop:
                return self._stopped(milter)
        if self._failed is not None:
            log.error("cannot serve on %s: %s", self.engine.config.milter.listen, self._failed)
        else:
            log.error("the milter stopped on its own: exiting for a restart")
        self.engine.close()
        return EXIT_FAILED

    def reload(self) -> bool:
        """Build the new configuration's engine and swap it in; False (old one kept) when it does not load."""
        started = time.monotonic()
        try:
            new = self.load()
        except (ConfigError, OSError) as e:
            log.error("reload refused, the running configuration stays: %s", e)
            self.metrics.reload(False)
            return False
        old = self.engine.config.milter
        for name in RESTART_ONLY:
            if getattr(new.config.milter, name) != getattr(old, name):
                log.warning("reload: [milter] %s changed: it takes effect at the next restart", name)
        if new.config.metrics.listen != self.engine.config.metrics.listen:
            log.warning("reload: [metrics] listen changed: it takes effect at the next restart")
        new.start()
        previous, self.engine = self.engine, new
        Session.engine = new
        previous.retire()
        self.metrics.configure(new.config)
        self.metrics.reload(True)
        log.info("reloaded %s in %.0f ms", new.config.path, (time.monotonic() - started) * 1000)
        return True

    def _signalled(self, sig, frame) -> None:
        if sig == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def _serve(self) -> None:
        """The milter thread: it and every thread it starts block the stop and reload signals."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            run_milter(self.engine.config.milter, self.engine.start)
        except Exception as e:  # cannot listen, out of threads: the main thread says so
            self._failed = e
        finally:
            self._wake.set()

    def _stopped(self, milter: threading.Thread) -> int:
        """Stop taking mail, wait for the transactions in flight, close."""
        timeout = self.engine.config.milter.stop_timeout
        log.info("stopping: %d transactions in flight, waiting up to %g s", Session.in_flight, timeout)
        Session.stopping = True
        Milter.milter.stop()
        deadline = time.monotonic() + timeout
        while (Session.in_flight > 0 or milter.is_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if Session.in_flight > 0:
            log.warning("stopped with %d transactions unfinished after %g s", Session.in_flight, timeout)
        else:
            time.sleep(REPLY_GRACE)
        self.engine.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("milterd stopped")
        return EXIT_OK
