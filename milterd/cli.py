"""The `milterd` command: run (the milter daemon), scan (offline, same engine), report, check-config, dkim-keygen."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from . import __version__, report, sources, stats
from .config import load_config
from .message import Envelope, Message, Spool
from .quarantine import CATEGORIES as QUARANTINE_CATEGORIES
from .tomlschema import ConfigError

log = logging.getLogger("milterd")

EXIT_OK, EXIT_BLOCKED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="milterd", description="Pre-queue content filter for Postfix.")
    parser.add_argument("--version", action="version", version=f"milterd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the milter daemon")
    run.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")
    run.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")

    scan = sub.add_parser("scan", help="scan .eml files, mboxes or Maildirs with the daemon's checks and policy")
    scan.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")
    scan.add_argument("--json", action="store_true", help="one JSON object per message per line")
    scan.add_argument("--mail-from", help='envelope sender ("" for the null sender; default: from the headers)')
    scan.add_argument("--rcpt", action="append", help="envelope recipient, repeatable (default: To and Cc)")
    scan.add_argument("--client-ip", default="", help="SMTP client address")
    scan.add_argument("--helo", default="", help="SMTP HELO name")
    scan.add_argument("--daemon-name", default="", help="Postfix {daemon_name}: the smtpd service (policy banks)")
    scan.add_argument("--auth-user", default="", help="SASL login name: the client authenticated (originating)")
    scan.add_argument("--jobs", type=int, help="messages scanned at once (default: [milter] max_concurrent, at most 8)")
    scan.add_argument(
        "--only",
        choices=("all", "blocked", "unchecked"),
        default="all",
        help="which messages are listed: all (default), blocked (not accepted), unchecked (a check could not"
        " inspect it); the summary counts every message",
    )
    scan.add_argument("--json-summary", action="store_true", help='with --json: a last line {"summary": {...}}')
    scan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    scan.add_argument("-v", "--verbose", action="store_true", help="log one line per message to stderr")
    scan.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help=".eml files, mboxes, Maildirs; - reads standard input"
    )

    rep = sub.add_parser(
        "report", help="report messages as spam or ham: Pyzor, Razor, and SpamAssassin through spamd TELL"
    )
    rep.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")
    kind = rep.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--spam", action="store_true", help="the messages are spam (pyzor report, razor-report, spamd TELL)"
    )
    kind.add_argument(
        "--ham", action="store_true", help="the messages are not spam (pyzor whitelist, razor-revoke, spamd TELL)"
    )
    rep.add_argument("paths", nargs="+", type=Path, metavar="PATH", help=".eml files, mboxes or Maildirs")

    check = sub.add_parser("check-config", help="validate the config file and the rules")
    check.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")
    check.add_argument(
        "--show", action="store_true", help="print the effective settings and where each came from (runs SQL once)"
    )

    quarantine = sub.add_parser("quarantine", help="list, show and purge quarantined messages")
    qsub = quarantine.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", help="kept messages, oldest first")
    qlist.add_argument("--json", action="store_true", help="one JSON object per line")
    qlist.add_argument("--category", choices=QUARANTINE_CATEGORIES, help="only this category")
    qlist.add_argument("--since", help="only those kept in the last AGE (90s, 30m, 2h, 7d)")
    qshow = qsub.add_parser("show", help="a kept message's envelope, reason and header section")
    qshow.add_argument("id", metavar="ID")
    qpurge = qsub.add_parser("purge", help="remove entries older than [quarantine] keep_days")
    for each in (qlist, qshow, qpurge):
        each.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")

    status = sub.add_parser("status", help="sessions in flight and backends, as amavisd-nanny ([metrics] listen)")
    status.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")

    reload = sub.add_parser("reload", help="tell the running milterd (its pidfile) to re-read its configuration")
    reload.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")

    rel = sub.add_parser("release", help="re-send a quarantined message to its recipients (or --to) via release_via")
    rel.add_argument("--config", type=Path, help="config file (default /etc/milterd/milterd.toml)")
    rel.add_argument("id", metavar="ID")
    rel.add_argument("--to", action="append", default=[], metavar="ADDR", help="send to ADDR instead (repeatable)")
    rel.add_argument("--learn-ham", action="store_true", help="also teach SpamAssassin it is ham (spamd TELL)")

    keygen = sub.add_parser(
        "dkim-keygen",
        help="make a DKIM signing key; print the DNS record to publish and the [[signing.key]] to add",
    )
    keygen.add_argument("domain", metavar="DOMAIN", help="the From domain to sign for")
    keygen.add_argument("selector", metavar="SELECTOR", help="the key's name in DNS: SELECTOR._domainkey.DOMAIN")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="key type (default rsa)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where DOMAIN.SELECTOR.key goes (default .)")

    stats.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "dkim-keygen":  # needs no configuration
        return _keygen(args)
    if args.command == "stats":  # reads a log, needs no configuration
        return stats.run(args)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        return _check_config(config, args.show)
    if args.command == "scan":
        return _scan(config, args)
    if args.command == "report":
        return _report(config, args)
    if args.command in ("quarantine", "release"):
        return _quarantine(config, args)
    if args.command == "reload":
        return _reload(config)
    if args.command == "status":
        from .metrics import StatusError, status_lines

        try:
            print("\n".join(status_lines(config.metrics.listen)))
        except StatusError as e:
            print(f"milterd: status: {e}", file=sys.stderr)
            return EXIT_BLOCKED
        return EXIT_OK
    return _run(config, args)


def _reload(config) -> int:
    """SIGHUP to the process in [milter] pidfile; it logs whether the new configuration was taken."""
    import signal

    if not config.milter.pidfile:
        print("milterd: reload: [milter] pidfile is not set: send SIGHUP to milterd yourself", file=sys.stderr)
        return EXIT_USAGE
    try:
        pid = int(Path(config.milter.pidfile).read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as e:
        print(f"milterd: reload: {config.milter.pidfile}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_BLOCKED
    print(f"milterd: reload sent to {pid}; the log says whether the new configuration was taken")
    return EXIT_OK


def _quarantine(config, args) -> int:
    """`quarantine list|show|purge` and `release`: the directory of [quarantine], read as the daemon wrote it."""
    import json
    import time

    from .quarantine import QuarantineError, open_store, parse_age, release

    path = config.path or Path("milterd.toml")
    database = None
    if config.sql.enabled:
        from .sql import Database, read_dsn

        try:
            database = Database(config.sql, read_dsn(config.sql, path))
        except ConfigError as e:
            print(f"milterd: {e}", file=sys.stderr)
            return EXIT_USAGE
    store = open_store(config.quarantine, path, database)
    try:
        if args.command == "release":
            entry = release(store, config.quarantine, args.id, args.to)
            print(f"{args.id}: released to {', '.join(entry.released_to)} via {config.quarantine.release_via}")
            if args.learn_ham:
                return _learn_ham(config, store, args.id)
            return EXIT_OK
        if args.action == "purge":
            removed = store.purge(time.time() - config.quarantine.keep_days * 86400)
            print(f"milterd: {removed} entries older than {config.quarantine.keep_days} days removed")
            return EXIT_OK
        if args.action == "show":
            entry = store.get(args.id)
            for key, value in entry.to_json().items():
                print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
            print()
            with store.open(args.id) as stream:
                sys.stdout.write(_header_section(stream).decode("utf-8", "replace"))
            return EXIT_OK
        since = time.time() - parse_age(args.since) if args.since else 0.0
        for entry in store.entries():
            if entry.time >= since and args.category in (None, entry.category):
                print(json.dumps(_listed(entry)) if args.json else _row(entry))
        return EXIT_OK
    except (QuarantineError, ValueError) as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_BLOCKED
    except OSError as e:
        print(f"milterd: {config.quarantine.directory}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BLOCKED
    finally:
        if database is not None:
            database.close()


def _listed(entry) -> dict:
    """`quarantine list --json`: id, time, category, mail_from, rcpts, size, reason (and released)."""
    keys = ("id", "time", "category", "mail_from", "rcpts", "size", "reason", "released")
    return {k: v for k, v in entry.to_json().items() if k in keys}


def _row(entry) -> str:
    """One line per entry; the addresses and the reason are the sender's text: made printable."""
    import time

    from .sanitize import address, printable

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.time))
    envelope = f"{address(entry.mail_from)} -> {','.join(address(r) for r in entry.rcpts)}"
    released = " (released)" if entry.released else ""
    return f"{entry.id}  {when}  {entry.category:<10} {envelope}  {printable(entry.reason)}{released}"


def _header_section(stream) -> bytes:
    lines = []
    while (line := stream.readline(1 << 20)) and line not in (b"\r\n", b"\n"):
        lines.append(line)
    return b"".join(lines).replace(b"\r\n", b"\n")


def _learn_ham(config, store, entry_id: str) -> int:
    """Teach SpamAssassin a released message is ham (spamd TELL, as `milterd report --ham`)."""
    from .checks import spamd

    with store.open(entry_id) as stream:
        raw = stream.read()
    failures = spamd.tell(raw, config.spamd.address, config.spamd.timeout, config.spamd.user, spam=False)
    for failure in failures:
        print(f"milterd: {entry_id}: spamd: {failure}", file=sys.stderr)
    print(f"{entry_id}: spamd: {'not ' if failures else ''}learned as ham")
    return EXIT_BLOCKED if failures else EXIT_OK


def _check_config(config, show: bool) -> int:
    """Everything a start or a reload would do short of serving: the engine built (keys read), then closed."""
    from .engine import build_engine

    try:
        engine = build_engine(config)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .checks import unmet_needs

    for warning in unmet_needs(config):
        print(f"milterd: warning: {warning}", file=sys.stderr)
    try:
        print(f"milterd: {config.path or 'built-in defaults'}: OK")
        if show:
            from .show import lines

            print("\n".join(lines(config, engine)))
    finally:
        engine.close()
    return EXIT_OK


def _run(config, args) -> int:
    from .engine import build_engine
    from .metrics import Metrics
    from .service import Service

    settings = config.milter
    metrics = Metrics()
    try:
        engine = build_engine(config, metrics=metrics)  # keys are read here, before the daemon drops root
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.foreground:
        import daemon
        import daemon.pidfile

        context = daemon.DaemonContext(
            umask=0o022,
            pidfile=daemon.pidfile.TimeoutPIDLockFile(settings.pidfile) if settings.pidfile else None,
        )
        context.open()
    _setup_logging(settings.log_file, settings.log_level, foreground=args.foreground)
    from .checks import unmet_needs

    for warning in unmet_needs(config):
        log.warning("%s", warning)
    if args.foreground and settings.pidfile:
        Path(settings.pidfile).write_text(f"{os.getpid()}\n")

    def load():
        """The configuration files read again, and their engine built: what a reload swaps in."""
        fresh = load_config(args.config)
        for warning in unmet_needs(fresh):
            log.warning("%s", warning)
        return build_engine(fresh, metrics=metrics)

    return Service(engine, load, metrics).run()


# A reporter: (raw message, is spam) -> its failures, one line each; empty when every server took it.
Reporter = Callable[[bytes, bool], list[str]]


def _reporters(config) -> list[tuple[str, Reporter]]:
    """Whom `milterd report` tells: every enabled collaborative check that takes reports."""
    reporters: list[tuple[str, Reporter]] = []
    if config.pyzor.enabled:
        from .checks import pyzor

        settings = config.pyzor
        reporters.append(("pyzor", lambda raw, spam: pyzor.report(raw, settings.servers, settings.timeout, spam=spam)))
    if config.razor.enabled:
        from .checks import razor

        rz = config.razor
        reporters.append(("razor", lambda raw, spam: razor.report(raw, rz.command, rz.homedir, rz.timeout, spam=spam)))
    if config.spamd.enabled:  # SpamAssassin's Bayes learns it (TELL; spamd needs --allow-tell)
        from .checks import spamd

        sa = config.spamd
        reporters.append(("spamd", lambda raw, spam: spamd.tell(raw, sa.address, sa.timeout, sa.user, spam=spam)))
    return reporters


def _report(config, args) -> int:
    reporters = _reporters(config)
    if not reporters:
        print("milterd: report: no collaborative check that takes reports is enabled", file=sys.stderr)
        return EXIT_USAGE
    try:
        items = [item for path in args.paths for item in sources.items(path)]
    except (sources.SourceError, OSError) as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    what = "spam" if args.spam else "ham"
    failed = False
    for item in items:
        try:
            with item.open() as stream:
                raw = stream.read()
        except OSError as e:
            print(f"milterd: {item.name}: {e}", file=sys.stderr)
            failed = True
            continue
        for name, reporter in reporters:
            try:
                failures = reporter(raw, args.spam)
            except Exception as e:  # one reporter's bug must not stop the others
                failures = [f"{type(e).__name__}: {e}"]
            for failure in failures:
                print(f"milterd: {item.name}: {name}: {failure}", file=sys.stderr)
            failed |= bool(failures)
            print(f"{item.name}: {name}: {'not ' if failures else ''}reported as {what}")
    return 1 if failed else EXIT_OK  # 1: some server did not take some message


def _keygen(args) -> int:
    from .dkimsign import generate_key, zone_lines

    try:
        path, record = generate_key(args.dir, args.domain, args.selector, args.type, args.bits)
    except FileExistsError as e:
        print(f"milterd: {e.filename} exists: not overwritten", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"# {path.resolve()}: the private key (mode 0600); keep it readable by milterd only")
    print("# Publish in the DNS zone of " + args.domain + ":")
    print(zone_lines(args.domain, args.selector, record))
    print("# Add to milterd.toml:")
    print(f'[[signing.key]]\ndomain = "{args.domain}"\nselector = "{args.selector}"\nkey = "{path.resolve()}"')
    return EXIT_OK


def _setup_logging(log_file: str, level: str, foreground: bool) -> None:
    if log_file:
        handler: logging.Handler = logging.handlers.WatchedFileHandler(log_file)
        fmt = "%(asctime)s milterd[%(process)d]: %(message)s"
    elif foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s milterd[%(process)d]: %(message)s"
    else:
        handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_MAIL)
        fmt = "milterd[%(process)d]: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _scan(config, args) -> int:
    """Scan messages with the daemon's checks and policy; the table (or --json) on stdout, a summary at the end.

    Sources are read as they are scanned (an mbox one message at a time), at most a few messages
    per job ahead, so memory stays flat whatever their size; results print in the sources' order.
    """
    import itertools
    import time
    from collections import deque

    from . import scanreport
    from .engine import build_engine

    _setup_logging("", "info" if args.verbose else "warning", foreground=True)
    jobs = args.jobs if args.jobs is not None else scanreport.default_jobs(config.milter.max_concurrent)
    if jobs < 1:
        print("milterd: --jobs must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    if args.json_summary and not args.json:
        print("milterd: --json-summary goes with --json", file=sys.stderr)
        return EXIT_USAGE
    if sum(str(p) == "-" for p in args.paths) > 1:
        print("milterd: - (standard input) can be given once", file=sys.stderr)
        return EXIT_USAGE
    try:
        for path in args.paths:  # every path checked before the first message is scanned
            if str(path) != "-" and not path.exists():
                raise sources.SourceError(f"{path}: no such file or directory")
        total: int | None = 0
        for path in args.paths:
            total = None if str(path) == "-" or total is None else total + sources.count(path)
        items = itertools.chain.from_iterable(
            sources.stdin_items(sys.stdin.buffer) if str(p) == "-" else sources.iterate(p) for p in args.paths
        )
    except (sources.SourceError, OSError) as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Scanning is offline: one message at a time per job, so the engine needs as many slots as jobs.
    try:
        engine = build_engine(replace(config, milter=replace(config.milter, max_concurrent=jobs)), offline=True)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress = None
    if not args.quiet and sys.stderr.isatty() and total != 1:
        progress = scanreport.Progress(total, sys.stderr)
    to_terminal = progress is not None and sys.stdout.isatty()

    def write(text: str) -> None:
        if to_terminal:
            progress.clear()
        print(text, flush=True)

    tally = scanreport.Tally(collapse=total != 1)
    lister = scanreport.Lister(tally, args.only, write)

    def scan_one(item: sources.Item):
        with item.open() as stream:
            sender, rcpts = sources.header_defaults(stream)
            stream.seek(0)
            spool = Spool.copy_of(stream, config.milter.spool_threshold, config.milter.spool_dir)
        envelope = Envelope(
            mail_from=sender if args.mail_from is None else args.mail_from,
            rcpts=tuple(args.rcpt) if args.rcpt else rcpts,
            client_ip=args.client_ip,
            helo=args.helo,
            auth_user=args.auth_user,
            daemon_name=args.daemon_name,
        )
        message = Message(envelope, spool)
        try:
            disposition = engine.evaluate(message)
            engine.after_reply(disposition)
        finally:
            message.close()
        return item.name, disposition

    def show(name, disposition) -> None:
        if args.json:
            tally.observe(name, disposition)
            if scanreport.listed(args.only, disposition):
                write(report.as_json(name, disposition))
        else:
            lister.add(name, disposition)
        if progress:
            progress.step()

    started = time.monotonic()
    if not args.json:
        write(report.TABLE_HEAD)
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            window: deque = deque()  # in order; a few per job ahead so no job waits on the reader
            for item in items:
                window.append(pool.submit(scan_one, item))
                if len(window) >= 2 * jobs:
                    show(*window.popleft().result())
            while window:
                show(*window.popleft().result())
    except (sources.SourceError, OSError) as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.close()
        if progress:
            progress.done()
    elapsed = time.monotonic() - started
    try:
        if args.json:
            if args.json_summary:
                write(scanreport.summary_json(tally, elapsed, jobs))
        else:
            lister.flush()
            write("\n".join(tally.summary_lines(elapsed, jobs, lister.notes)))
    except OSError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_BLOCKED if tally.blocked_count else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
