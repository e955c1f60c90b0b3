"""Start real clamd, spamd, pyzord, MariaDB and Postfix instances privately on loopback.

Used by the integration and end-to-end tests, the ``make run`` dev script and the
benchmark, so that every one of them talks to the same real daemons the production
milter talks to, without touching the system's own configuration or instances.

Stdlib only (MariaDB's execute/query import PyMySQL when called). Linux only (uses prctl via
ctypes). Meant to run as root (Postfix needs it).

Why a reaper wrapper: every daemon is started under a tiny Python process (this file
run as ``python -I daemons.py --reap ...``, see _reaper_main) that is a child subreaper
(PR_SET_CHILD_SUBREAPER). Postfix's master exits on SIGTERM without waiting for its
children; on this machine PID 1 is not an init and reaps orphans only late, so without
the wrapper a stop leaves zombie smtpd/qmgr/... processes for a while and nobody can tell
when the instance is really gone. The wrapper reaps every descendant and exits only when
all of them are gone, so ``stop()`` returning means no process of that daemon is left.
The wrapper also gets SIGTERM when the process that started it dies (PR_SET_PDEATHSIG),
so a crashed test run does not leak daemons (an atexit hook stops them on normal exit).
Caveat: the kernel fires PDEATHSIG when the *thread* that spawned the wrapper exits, so
start daemons from a thread that lives as long as you need them (normally the main one).
"""

from __future__ import annotations

import atexit
import grp
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "free_port",
    "wait_for_port",
    "wait_for_unix_socket",
    "wait_for_listen",
    "make_traversable",
    "EICAR",
    "CLAM_EXE",
    "write_test_signatures",
    "Clamd",
    "start_clamd",
    "Spamd",
    "start_spamd",
    "Pyzord",
    "start_pyzord",
    "MariaDB",
    "start_mariadb",
    "Postfix",
    "start_postfix",
    "stop_all",
]

CLAMD = "/usr/sbin/clamd"
SPAMD = "/usr/sbin/spamd"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
SA_SYSTEM_SITECONFIG = Path("/etc/spamassassin")

# Two halves, so this source file is not itself flagged as a virus sample.
_EICAR_HEAD = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$"
_EICAR_TAIL = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR: bytes = _EICAR_HEAD + _EICAR_TAIL
CLAM_EXE = Path("/usr/share/clamav-testfiles/clam.exe")

STOP_GRACE = 8.0  # seconds between SIGTERM and SIGKILL


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(paths: Iterable[Path | str], lines: int = 40) -> str:
    """Last lines of each existing log, for error messages that explain a failed start."""
    out = []
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        if not text.strip():
            continue
        tail = "\n".join(text.splitlines()[-lines:])
        out.append(f"--- {p} (tail) ---\n{tail}")
    return "\n".join(out) if out else "(no log output)"


def _describe(proc: subprocess.Popen) -> str:
    """The daemon's command line, not the reaper's (see _spawn)."""
    args = [str(a) for a in proc.args]
    if "--reap" in args[:4]:
        args = args[args.index("--reap") + 2 :]
    return " ".join(args)


def _wait(probe, what: str, timeout: float, proc: subprocess.Popen | None, logs: Sequence[Path | str]) -> None:
    """Poll probe() until it returns True; fail fast if proc died, with the log tails."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{_describe(proc)} exited with {proc.returncode} while waiting for {what}\n{_tail(logs)}"
            )
        try:
            if probe():
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{_tail(logs)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, *, logs: Sequence[Path | str] = ()
) -> None:
    """Wait until host:port accepts a TCP connection (readiness, not a fixed sleep).

    Raises RuntimeError with the tails of ``logs`` if ``proc`` exits first or on timeout.
    """

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=0.5):
            return True

    _wait(probe, f"{host}:{port}", timeout, proc, logs)


def _listening(port: int, pid: int | None = None) -> bool:
    """True if a socket LISTENs on TCP port (per /proc/net/tcp*) and, when pid is given,
    that process holds it (so a stranger that grabbed our 'free' port doesn't count)."""
    want = f":{port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        inodes.add(f"socket:[{fields[9]}]")
        except FileNotFoundError:
            pass
    if pid is None or not inodes:
        return bool(inodes)
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


def wait_for_listen(
    port: int,
    timeout: float,
    proc: subprocess.Popen | None = None,
    *,
    pid: int | None = None,
    logs: Sequence[Path | str] = (),
) -> None:
    """Wait until a TCP port is in LISTEN state (held by pid if given), without connecting.

    For Postfix: a probe connection would make smtpd run a whole milter session (and
    log 'lost connection'), which tests counting milter connections would see.
    """
    _wait(lambda: _listening(port, pid), f"a listener on port {port}", timeout, proc, logs)


def wait_for_unix_socket(
    path: Path | str, timeout: float, proc: subprocess.Popen | None = None, *, logs: Sequence[Path | str] = ()
) -> None:
    """Wait until the unix stream socket at path accepts a connection."""

    def probe() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            return True

    _wait(probe, f"unix:{path}", timeout, proc, logs)


def make_traversable(path: Path | str) -> None:
    """Give 'other' search (x) permission on path and its ancestors where missing.

    The daemons' unprivileged users (postfix for milter sockets, nobody for the Maildir,
    debian-spamd for its config) must reach files below the work directory, and pytest's
    and mkdtemp's directories are 0700. Only directories owned by us are changed (x only,
    never r); the home directory and top-level directories are never changed: we raise.
    """
    p = Path(path).resolve()
    home = Path.home().resolve()
    for d in [p, *p.parents]:
        st = d.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid != os.geteuid() or d == home or d.parent == Path("/"):
            raise RuntimeError(
                f"{d} is not searchable by other users; the daemons' users need it. "
                f"Use a work directory below /tmp or chmod o+x {d} yourself."
            )
        os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _chown(path: Path, user: str, group: str | None = None) -> None:
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    os.chown(path, pw.pw_uid, gid)


# --------------------------------------------------------------------------- process wrapper


def _reaper_main(pidfile: str, argv: Sequence[str]) -> None:
    """Body of the wrapper process (``python -I daemons.py --reap PIDFILE ARGV...``).

    Becomes a child subreaper, asks for SIGTERM when its parent dies, forks+execs the
    daemon, writes the daemon's PID to PIDFILE, forwards SIGTERM/SIGINT/SIGHUP to it and
    reaps every descendant; it exits (with the daemon's status) when none is left.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # parent already gone
        sys.exit(1)
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        try:
            os.execv(argv[0], list(argv))
        finally:
            os._exit(127)
    alive = True

    def forward(sig, _frame):
        if alive:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    for sig in sigs:
        signal.signal(sig, forward)
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{child}\n")
    os.rename(pidfile + ".tmp", pidfile)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
    status = 0
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            alive = False
            status = os.waitstatus_to_exitcode(st)
    sys.exit(status if status >= 0 else 128 - status)


def _reaper_argv(pidfile: Path, argv: Sequence[str]) -> list[str]:
    # -I: stdlib only, ignore PYTHONPATH and the script's directory (tests/).
    return [sys.executable, "-I", str(Path(__file__).resolve()), "--reap", str(pidfile), *argv]


_LIVE: dict[int, _Managed] = {}


def _spawn(
    argv: Sequence[str], workdir: Path, name: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int, Path]:
    """Start argv under the reaper; return (wrapper Popen, daemon pid, stdout/stderr file)."""
    out = workdir / f"{name}.out"
    pidfile = workdir / f"{name}.wrapper.pid"
    pidfile.unlink(missing_ok=True)
    with open(out, "ab") as f:
        proc = subprocess.Popen(
            _reaper_argv(pidfile, argv),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    holder: list[int] = []

    def probe() -> bool:
        holder.append(int(pidfile.read_text()))
        return True

    _wait(probe, f"{name} to be spawned", 10, proc, [out])
    return proc, holder[0], out


def _terminate(proc: subprocess.Popen, pid: int, logs: Sequence[Path]) -> None:
    """SIGTERM the daemon by PID, wait for the wrapper (= every descendant gone), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(STOP_GRACE)
        return
    except subprocess.TimeoutExpired:
        pass
    # Force: the daemon's own group (Postfix's master is a session leader) and ours.
    for pg in {pid, proc.pid}:
        try:
            if os.getpgid(pg) == pg and pg != os.getpgrp():
                os.killpg(pg, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    print(f"warning: {_describe(proc)} needed SIGKILL\n{_tail(logs, 10)}", file=sys.stderr)


class _Managed:
    """Shared stop() logic; subclasses are frozen dataclasses with pid/log/proc/out."""

    pid: int
    log: Path
    proc: subprocess.Popen
    out: Path

    def stop(self) -> None:
        """Stop by PID (SIGTERM, SIGKILL after STOP_GRACE s); returns when no process is left."""
        try:
            _terminate(self.proc, self.pid, [self.log, self.out])
        finally:
            _LIVE.pop(id(self), None)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def _register(self):
        _LIVE[id(self)] = self
        return self


def stop_all(daemons: Iterable[object | None] | None = None) -> None:
    """Stop the given daemons (None entries ignored), or every one still running."""
    items = list(_LIVE.values()) if daemons is None else [d for d in daemons if d is not None]
    errors = []
    for d in reversed(items):
        try:
            d.stop()  # type: ignore[attr-defined]
        except Exception as e:  # keep stopping the others
            errors.append(e)
    if errors:
        raise errors[0]


atexit.register(stop_all)


# --------------------------------------------------------------------------- clamd


def write_test_signatures(dbdir: Path) -> None:
    """The only signatures our clamd gets (ClamAV ships none; freshclam can't reach its
    servers): EICAR as a body signature and clam.exe by MD5, which also covers archives
    containing clam.exe. clamd reports them with a ``.UNOFFICIAL`` suffix."""
    dbdir = Path(dbdir)
    dbdir.mkdir(parents=True, exist_ok=True)
    (dbdir / "test.ndb").write_text(f"Eicar-Test-Signature:0:*:{EICAR.hex()}\n")
    data = CLAM_EXE.read_bytes()
    (dbdir / "test.hdb").write_text(f"{hashlib.md5(data).hexdigest()}:{len(data)}:ClamAV-Test-File\n")


def _clamd_ping(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(address)
        s.sendall(b"zPING\0")
        return s.recv(16).rstrip(b"\0\n") == b"PONG"


@dataclass(frozen=True)
class Clamd(_Managed):
    """A private clamd listening on a unix socket and on 127.0.0.1:port."""

    socket_path: Path
    port: int
    pid: int
    log: Path
    config: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    @property
    def tcp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def start_clamd(workdir: Path, database_dir: Path | None = None, timeout: float = 60) -> Clamd:
    """Start clamd with a private config in workdir; returns once both sockets answer PING.

    Runs as root (no ``User``: clamd only switches user when told to), so it can read
    whatever the tests ask it to scan; the unix socket is mode 666 for the milter.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    make_traversable(workdir)
    if database_dir is None:
        database_dir = workdir / "db"
        write_test_signatures(database_dir)
    sock = workdir / "clamd.sock"
    log = workdir / "clamd.log"
    tmp = workdir / "clamd-tmp"
    tmp.mkdir(exist_ok=True)
    port = free_port()
    conf = workdir / "clamd.conf"
    conf.write_text(
        "\n".join(
            [
                "Foreground yes",
                f"LocalSocket {sock}",
                "LocalSocketMode 666",
                "FixStaleSocket yes",
                f"TCPSocket {port}",
                "TCPAddr 127.0.0.1",
                f"DatabaseDirectory {Path(database_dir).resolve()}",
                f"TemporaryDirectory {tmp}",
                f"LogFile {log}",
                "LogTime yes",
                "LogClean no",
                f"PidFile {workdir / 'clamd.pid'}",
                "StreamMaxLength 25M",
                "MaxFileSize 25M",
                "ScanArchive yes",
                "ScanPE yes",
                "ScanOLE2 yes",
                "ScanPDF yes",
                "ScanHTML yes",
                "ScanMail yes",
                "MaxThreads 8",
                "SelfCheck 0",
                "Bytecode no",
                "",
            ]
        )
    )
    proc, pid, out = _spawn([CLAMD, "-c", str(conf)], workdir, "clamd")
    d = Clamd(socket_path=sock, port=port, pid=pid, log=log, config=conf, proc=proc, out=out)._register()
    try:
        _wait(
            lambda: _clamd_ping(socket.AF_UNIX, str(sock)) and _clamd_ping(socket.AF_INET, ("127.0.0.1", port)),
            "clamd PING on both sockets",
            timeout,
            proc,
            [log, out],
        )
    except BaseException:
        d.stop()
        raise
    return d


# --------------------------------------------------------------------------- spamd

SA_LOCAL_CF = """\
# Private test config: no network, no learning, so results are deterministic offline.
skip_rbl_checks 1
dns_available no
use_razor2 0
use_pyzor 0
use_bayes 0
bayes_auto_learn 0
# These options exist only when their plugin is loaded (Debian loads neither by default);
# unguarded they log "failed to parse line".
ifplugin Mail::SpamAssassin::Plugin::DCC
use_dcc 0
endif
ifplugin Mail::SpamAssassin::Plugin::AWL
use_auto_whitelist 0
endif
ifplugin Mail::SpamAssassin::Plugin::TxRep
use_txrep 0
endif
"""


# With allow_tell: Bayes on (and only TELL teaches it) in a database of the test's own.
SA_BAYES_CF = """\
use_bayes 1
bayes_auto_learn 0
bayes_learn_during_report 1
bayes_path {path}
bayes_file_mode 0700
"""
SA_LEARN = "/usr/bin/sa-learn"


@dataclass(frozen=True)
class Spamd(_Managed):
    """A private spamd on 127.0.0.1:port with network tests, Bayes and AWL off.

    Started with allow_tell, it takes TELL (--allow-tell) and has Bayes on, in its own database
    (``bayes_path``, a prefix as SpamAssassin's bayes_path: files ``bayes_path``_toks etc.).
    """

    port: int
    pid: int
    log: Path
    siteconfig: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)
    bayes_path: Path | None = None

    def bayes_counts(self) -> tuple[int, int]:
        """(nspam, nham) of its Bayes database, from `sa-learn --dump magic` with its site config."""
        assert self.bayes_path is not None, "spamd was started without allow_tell: no Bayes"
        # As the database's owner (spamd's user), so sa-learn never leaves files spamd cannot write,
        # with a HOME of its own, so it never touches a real ~/.spamassassin.
        owner = self.bayes_path.parent.stat().st_uid
        home = self.bayes_path.parent.parent / "sa-learn-home"
        home.mkdir(exist_ok=True)
        os.chown(home, owner, -1)
        other = owner != os.geteuid()
        out = subprocess.run(
            [SA_LEARN, f"--siteconfigpath={self.siteconfig}", f"--prefspath={home / 'user_prefs'}", "--dump", "magic"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=home,
            env={**os.environ, "HOME": str(home)},
            user=owner if other else None,
            group=pwd.getpwuid(owner).pw_gid if other else None,
            extra_groups=[] if other else None,
        )
        if out.returncode != 0 and "ERROR: Bayes dump returned an error" not in out.stderr:
            raise RuntimeError(f"sa-learn --dump magic: {out.returncode}: {out.stderr}")
        counts = {}
        for line in out.stdout.splitlines():  # "0.000          0          3          0  non-token data: nspam"
            if "non-token data: " in line:
                counts[line.rsplit(": ", 1)[1].strip()] = int(line.split()[2])
        return counts.get("nspam", 0), counts.get("nham", 0)


def _spamd_ping(port: int) -> bool:
    """PING is answered by a child, so success means spamd can really take requests
    (the port alone accepts connections as soon as the parent has bound it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PING SPAMC/1.5\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(256):
            reply += chunk
    return b" PONG" in reply


def start_spamd(
    workdir: Path, timeout: float = 60, children: int = 2, user: str = "debian-spamd", allow_tell: bool = False
) -> Spamd:
    """Start spamd with a private site config (workdir/sa); returns once it answers PING.

    The site config holds copies of the system's *.pre files (they load the plugins
    every rule depends on) and Debian's 65_debian.cf, plus our local.cf; the rules
    themselves come from the system rules directory as in production.

    allow_tell: spamd takes TELL (--allow-tell), with Bayes on in workdir/bayes (see SA_BAYES_CF).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    make_traversable(workdir)
    sa = workdir / "sa"
    sa.mkdir(exist_ok=True)
    os.chmod(sa, 0o755)
    for f in SA_SYSTEM_SITECONFIG.iterdir():
        if f.is_file() and f.name != "local.cf" and f.suffix in (".pre", ".cf"):
            shutil.copy(f, sa / f.name)
    bayes_path = None
    local_cf = SA_LOCAL_CF
    if allow_tell:
        bayes = workdir / "bayes"
        bayes.mkdir(exist_ok=True)
        os.chmod(bayes, 0o700)
        if os.geteuid() == 0:
            _chown(bayes, user)
        bayes_path = bayes / "bayes"
        local_cf += SA_BAYES_CF.format(path=bayes_path)
    (sa / "local.cf").write_text(local_cf)
    for f in sa.iterdir():
        os.chmod(f, 0o644)
    # spamd drops to `user` and then writes its log and removes its pidfile there.
    run = workdir / "spamd-run"
    run.mkdir(exist_ok=True)
    log = run / "spamd.log"
    log.touch()
    if os.geteuid() == 0:
        _chown(run, user)
        _chown(log, user)
    port = free_port()
    argv = [
        SPAMD,
        "-L",
        "-x",
        f"--siteconfigpath={sa}",
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-A",
        "127.0.0.1",
        "-m",
        str(children),
        "--min-children=1",
        "--min-spare=1",
        f"--max-spare={children}",
        "-r",
        str(run / "spamd.pid"),
        "-s",
        str(log),
    ]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", user]
    if allow_tell:
        argv.append("--allow-tell")
    proc, pid, out = _spawn(argv, workdir, "spamd")
    d = Spamd(port=port, pid=pid, log=log, siteconfig=sa, proc=proc, out=out, bayes_path=bayes_path)._register()
    try:
        _wait(lambda: _spamd_ping(port), f"spamd PING on 127.0.0.1:{port}", timeout, proc, [log, out])
    except BaseException:
        d.stop()
        raise
    return d


# --------------------------------------------------------------------------- pyzord

PYZORD = "/usr/bin/pyzord"
PYZOR = "/usr/bin/pyzor"


def _udp_bound(port: int) -> bool:
    """True if a UDP socket is bound to port on 127.0.0.1 (per /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == want for line in list(f)[1:])


@dataclass(frozen=True)
class Pyzord(_Managed):
    """A private pyzord on UDP 127.0.0.1:port (gdbm database), anonymous users may do everything.

    ``usage_log`` gets one line per request (``anonymous,127.0.0.1,check,[digest],200``), so
    tests can count what reached the server; ``client_home`` is a pyzor client homedir whose
    ``servers`` file names this server (``pyzor --homedir client_home check < msg``).
    """

    port: int
    pid: int
    log: Path
    usage_log: Path
    client_home: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, op: str | None = None) -> list[str]:
        """The usage log's lines, optionally only those of one operation (check, report, whitelist, ping)."""
        try:
            lines = self.usage_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if op is None or f",{op}," in line]


def _pyzor_ping(client_home: Path) -> bool:
    rc = subprocess.run(
        [PYZOR, "--homedir", str(client_home), "-t", "1", "ping"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
    ).returncode
    return rc == 0


def start_pyzord(workdir: Path, timeout: float = 30) -> Pyzord:
    """Start Debian's pyzord (needs python3-gdbm) on a free port; returns once a real `pyzor ping` answers.

    The access file lets the anonymous user whitelist too (pyzord's default ACL does not), so
    tests can report ham without accounts. UDP: a free TCP port number is taken as the UDP one
    (small race accepted, as for the TCP daemons).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home, client_home = workdir / "home", workdir / "client"
    home.mkdir(exist_ok=True)
    client_home.mkdir(exist_ok=True)
    port = free_port()
    (home / "access").write_text("all : anonymous : allow\n")
    (client_home / "servers").write_text(f"127.0.0.1:{port}\n")
    log, usage = workdir / "pyzord.log", workdir / "pyzord-usage.log"
    argv = [
        PYZORD,
        "--homedir", str(home),
        "-a", "127.0.0.1",
        "-p", str(port),
        "-e", "gdbm",
        "--dsn", str(workdir / "pyzord.db"),
        "--access-file", str(home / "access"),
        "--log-file", str(log),
        "--usage-log-file", str(usage),
    ]  # fmt: skip
    proc, pid, out = _spawn(argv, workdir, "pyzord")
    d = Pyzord(port=port, pid=pid, log=log, usage_log=usage, client_home=client_home, proc=proc, out=out)._register()
    try:
        _wait(lambda: _udp_bound(port) and _pyzor_ping(client_home), "a pyzor ping answer", timeout, proc, [log, out])
    except BaseException:
        d.stop()
        raise
    return d


# --------------------------------------------------------------------------- MariaDB

MARIADBD = "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
MARIADB_CLIENT = "/usr/bin/mariadb"
# The seed's (tests/sql/mail.sql) read-only account, as in the Postfix+MySQL tutorials.
MAIL_ADMIN = ("mail_admin", "mail_admin_password")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the NUL

# Server options for mariadb-install-db (which passes them on to its `mariadbd --bootstrap`)
# and for every start: small and fast; durability does not matter for a test instance, a
# clean SIGTERM shutdown still writes everything.
_MARIADB_TUNING = (
    "--skip-name-resolve",  # client host = its IP, so 'mail_admin'@'127.0.0.1' is the TCP account
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-temp-data-file-path=ibtmp1:1M:autoextend",
    "--innodb-use-native-aio=0",  # io_setup() may be refused in containers
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--skip-log-bin",
    "--performance-schema=OFF",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
)


def _mysql_greeting(path: Path) -> bool:
    """True once the server's handshake (protocol 10) arrives on its unix socket.

    mariadbd creates its sockets only when it is ready for connections; reading the greeting
    proves it accepts, without logging in (stdlib only)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        head = s.recv(5)
    return len(head) == 5 and head[4] == 10


@dataclass(eq=False)
class MariaDB(_Managed):
    """A private mariadbd on 127.0.0.1:port and a unix socket, with its own datadir.

    ``stop()`` and ``start()`` stop and restart the same instance (port, datadir, data), so a
    test can take the database away and bring it back. Root exists only as root@localhost
    (the unix socket) with ``root_password``; ``root_cnf`` is a client option file for it:
    ``mariadb --defaults-file=ROOT_CNF``. Not frozen: pid and proc change on start().
    """

    port: int
    socket_path: Path
    datadir: Path
    root_password: str = field(repr=False)
    root_cnf: Path
    pid: int
    log: Path
    argv: list[str] = field(repr=False)
    workdir: Path = field(repr=False)
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)
    host: str = "127.0.0.1"

    @property
    def socket(self) -> str:
        return str(self.socket_path)

    def url(self, database: str = "mail", user: str = MAIL_ADMIN[0], password: str = MAIL_ADMIN[1]) -> str:
        """An SQLAlchemy URL over TCP: mysql+pymysql://USER:PASSWORD@127.0.0.1:PORT/DATABASE."""
        from urllib.parse import quote

        return f"mysql+pymysql://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """The seed's read-only account on the `mail` database (see tests/sql/mail.sql)."""
        return self.url()

    def start(self, timeout: float = 60) -> None:
        """(Re)start on the same port and datadir; returns once it accepts connections."""
        if self.proc is not None and self.running:
            raise RuntimeError(f"mariadbd (pid {self.pid}) is already running")
        self.socket_path.unlink(missing_ok=True)  # stale after a SIGKILL
        proc, pid, out = _spawn(self.argv, self.workdir, "mariadbd")
        self.proc, self.pid, self.out = proc, pid, out
        self._register()
        try:
            _wait(
                lambda: _mysql_greeting(self.socket_path) and _listening(self.port, pid),
                f"mariadbd on {self.socket_path} and 127.0.0.1:{self.port}",
                timeout,
                proc,
                [self.log, out],
            )
        except BaseException:
            self.stop()
            raise

    def connect(self, database: str | None = None, **kwargs):
        """A PyMySQL connection as root over the unix socket, autocommit on."""
        import pymysql

        return pymysql.connect(
            unix_socket=self.socket,
            user="root",
            password=self.root_password,
            database=database,
            autocommit=True,
            connect_timeout=5,
            charset="utf8mb4",
            **kwargs,
        )

    def execute(self, sql: str, params: Sequence | dict = (), database: str | None = None) -> int:
        """Run one statement as root (PyMySQL %s placeholders); returns the affected row count."""
        with self.connect(database) as conn, conn.cursor() as cur:
            return cur.execute(sql, params or None)

    def query(self, sql: str, params: Sequence | dict = (), database: str | None = None) -> list[tuple]:
        """Run one statement as root and return all rows as tuples."""
        with self.connect(database) as conn, conn.cursor() as cur:
            cur.execute(sql, params or None)
            return list(cur.fetchall())

    def load_sql(self, path: Path | str) -> None:
        """Feed an SQL script to the `mariadb` client as root, as an admin would (`mariadb < file`)."""
        self.client(stdin=Path(path).read_bytes())

    def client(self, *args: str, stdin: bytes | None = None) -> str:
        """Run the `mariadb` command-line client as root with args; returns its stdout."""
        argv = [MARIADB_CLIENT, f"--defaults-file={self.root_cnf}", "--batch", *args]
        r = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return r.stdout.decode()


def start_mariadb(workdir: Path, timeout: float = 60) -> MariaDB:
    """Initialise a datadir in workdir and start mariadbd on 127.0.0.1:<free port>.

    ``mariadb-install-db --no-defaults`` (no system my.cnf, no test db) creates the system
    tables (~1 s); mariadbd then runs with ``--no-defaults`` and everything on the command
    line: its own datadir, socket, pid file, tmpdir and error log below workdir,
    ``--bind-address=127.0.0.1``. As root it runs with ``--user=root`` (mariadbd refuses root
    otherwise), so nothing needs chown'ing. Root's accounts other than root@localhost are
    dropped and root@localhost gets a random password. No databases besides the system ones:
    load them with ``load_sql``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    datadir, tmpdir = workdir / "data", workdir / "tmp"
    if datadir.exists():
        raise RuntimeError(f"{datadir} exists; start_mariadb wants a fresh directory (restart with .start())")
    tmpdir.mkdir()
    sock = workdir / "mariadbd.sock"
    if len(str(sock)) > _SUN_PATH_MAX:  # deep --basetemp: a short private directory instead
        import tempfile

        sock = Path(tempfile.mkdtemp(prefix="mariadb-")) / "mariadbd.sock"
    log = workdir / "mariadbd.err"
    user = ["--user=root"] if os.geteuid() == 0 else []
    common = [f"--datadir={datadir}", f"--tmpdir={tmpdir}", *user, *_MARIADB_TUNING]
    install = [MARIADB_INSTALL_DB, "--no-defaults", *common]
    install += ["--auth-root-authentication-method=normal", "--skip-test-db"]
    r = subprocess.run(install, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if r.returncode != 0:
        out = (r.stdout + r.stderr).decode(errors="replace")
        raise RuntimeError(f"{' '.join(install)} failed ({r.returncode}):\n{out}")
    port = free_port()
    argv = [
        MARIADBD,
        "--no-defaults",
        *common,
        f"--socket={sock}",
        f"--port={port}",
        "--bind-address=127.0.0.1",
        "--skip-networking=0",
        f"--pid-file={workdir / 'mariadbd.pid'}",
        f"--log-error={log}",
    ]
    password = secrets.token_hex(16)
    root_cnf = workdir / "root.cnf"
    d = MariaDB(
        port=port,
        socket_path=sock,
        datadir=datadir,
        root_password=password,
        root_cnf=root_cnf,
        pid=0,
        log=log,
        argv=argv,
        workdir=workdir,
        proc=None,  # type: ignore[arg-type]  # set by start()
        out=workdir / "mariadbd.out",
    )
    _write_root_cnf(root_cnf, sock, None)
    d.start(timeout)
    try:
        # install-db's "normal" root: passwordless root@localhost, @127.0.0.1, @::1 and @<hostname>.
        sql = "SELECT Host FROM mysql.user WHERE User='root' AND Host<>'localhost'"
        hosts = d.client("--skip-column-names", "-e", sql).split()
        drops = "".join(f"DROP USER 'root'@'{h}';" for h in hosts)
        d.client("-e", f"{drops}ALTER USER 'root'@'localhost' IDENTIFIED BY '{password}';")
        _write_root_cnf(root_cnf, sock, password)
    except BaseException:
        d.stop()
        raise
    return d


def _write_root_cnf(path: Path, sock: Path, password: str | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[client]\nuser=root\nsocket={sock}\n" + (f"password={password}\n" if password else ""))


# --------------------------------------------------------------------------- Postfix

VIRTUAL_DOMAINS = ("milterd.test", "example.com", "example.org", "remote.test")
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

_MASTER_CF = """\
# Private test instance: chroot n everywhere (unix milter sockets live outside any jail).
{listeners}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _run_on_tty(argv: Sequence[str], timeout: float = 60) -> tuple[int, str]:
    """Run argv with stdout/stderr on a pseudo-terminal and return (rc, output).

    The postfix command prints its fatal errors only when stderr is a terminal; with a
    pipe (and no postlogd running yet) a failed ``postfix check`` just exits 1 silently.
    """
    import pty
    import select

    mfd, sfd = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sfd, stderr=sfd, close_fds=True)
    finally:
        os.close(sfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([mfd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(mfd, 65536)
                except OSError:  # EIO: every writer has gone
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            proc.kill()
    finally:
        os.close(mfd)
    rc = proc.wait()
    return rc, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").strip()


@dataclass(frozen=True)
class Postfix(_Managed):
    """A private Postfix instance: one smtpd per listener, all mail into one Maildir."""

    ports: dict[str, int]
    maildir: Path
    pid: int
    log: Path
    config_directory: Path
    queue_directory: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    def delivered(self) -> list[bytes]:
        """Raw bytes of every delivered message (maildir new/ and cur/), oldest first."""
        files = []
        for sub in ("new", "cur"):
            try:
                files.extend(p for p in (self.maildir / sub).iterdir() if p.is_file())
            except FileNotFoundError:
                pass
        msgs = []
        for p in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                msgs.append(p.read_bytes())
            except FileNotFoundError:  # moved new/ -> cur/ meanwhile
                pass
        return msgs

    def wait_delivered(self, token: bytes, timeout: float = 30) -> bytes:
        """The delivered message containing token; polls, RuntimeError with maillog on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.delivered():
                if token in m:
                    return m
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no delivered message contains {token!r} after {timeout}s; "
                    f"queue: {self.queue_files()}\n{_tail([self.log])}"
                )
            time.sleep(0.05)

    def queue_files(self) -> list[Path]:
        """Queue files not yet delivered (maildrop, incoming, active, deferred, hold)."""
        found = []
        for q in _QUEUES:
            for root, _dirs, files in os.walk(self.queue_directory / q):
                found.extend(Path(root) / f for f in files)
        return found

    def wait_queue_empty(self, timeout: float = 30) -> None:
        """Wait until nothing is queued; a deferred message makes this time out."""
        deadline = time.monotonic() + timeout
        while self.queue_files():
            if time.monotonic() >= deadline:
                raise RuntimeError(f"queue not empty after {timeout}s: {self.queue_files()}\n{_tail([self.log])}")
            time.sleep(0.05)

    def postconf(self, *args: str) -> str:
        """Run postconf against this instance (e.g. postconf('-n'))."""
        return subprocess.run(
            ["postconf", "-c", str(self.config_directory), *args], check=True, capture_output=True, text=True
        ).stdout

    def flush(self) -> None:
        """Retry deferred mail now (postqueue -f)."""
        subprocess.run(["postqueue", "-c", str(self.config_directory), "-f"], check=True)


def start_postfix(
    workdir: Path,
    listeners: dict[str, str | None],
    hostname: str = "mx.milterd.test",
    timeout: float = 30,
    extra_main_cf: dict[str, str] | None = None,
    extra_master_cf: str = "",
) -> Postfix:
    """Start a private Postfix (own config, queue, data dir) under workdir.

    listeners maps a name to that smtpd's smtpd_milters (None = no milter); each gets
    127.0.0.1:<free port>. The value is stored in main.cf as ``<name>_milters`` and the
    master.cf line says ``-o smtpd_milters=$<name>_milters``, so milter values with
    spaces, commas or ``{ ... }`` per-milter settings need no quoting. Each listener logs
    as ``postfix/<name>/smtpd`` (syslog_name), so the maillog tells listeners apart.

    We run the master directly (``master -s``: stays in the foreground, so its PID is
    known) after ``postfix -c etc check`` created the queue; this skips postfix-script's
    `find` over the shared system directories. Readiness = every listener socket is in
    LISTEN state and held by the master (no probe connection, which would start a milter
    session). All daemons run with chroot n; mail for the virtual domains goes to
    ``maildir`` as user nobody. Needs root. ``extra_main_cf`` overrides main.cf settings;
    ``extra_master_cf`` is appended to master.cf as is (extra services such as a
    content_filter's transport and reinjection smtpd; readiness does not wait for them).
    """
    if os.geteuid() != 0:
        raise RuntimeError("a private Postfix instance needs root")
    workdir = Path(workdir).resolve()
    for name in listeners:
        if not name.isidentifier():
            raise ValueError(f"listener name {name!r} must be an identifier ([A-Za-z0-9_])")
    workdir.mkdir(parents=True, exist_ok=True)
    make_traversable(workdir)
    etc, queue, data = workdir / "etc", workdir / "queue", workdir / "data"
    for d in (etc, queue):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    maildir = workdir / "Maildir"
    nobody = pwd.getpwnam("nobody")
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        os.chown(maildir / sub, nobody.pw_uid, nobody.pw_gid)
        os.chmod(maildir / sub, 0o755)
    log = workdir / "maillog"
    ports = {name: free_port() for name in listeners}

    main = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "inet_interfaces": "127.0.0.1",
        "myhostname": hostname,
        "mydestination": "",
        "smtp_dns_support_level": "disabled",
        "maillog_file": str(log),
        "maillog_file_prefixes": str(workdir),  # default allows only /var and /dev/stdout
        "alias_maps": "",  # keep away from /etc/aliases
        "alias_database": "",
        "biff": "no",
        "virtual_mailbox_domains": " ".join(VIRTUAL_DOMAINS),
        "virtual_mailbox_base": str(workdir),
        "virtual_mailbox_maps": f"static:{maildir.name}/",
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
        "milter_protocol": "6",
        "milter_default_action": "tempfail",
        "milter_connect_timeout": "10s",
        "milter_command_timeout": "30s",
        "milter_content_timeout": "300s",
        # XCLIENT lets a test on 127.0.0.1 claim to be a remote MTA in TEST-NET-1 (Postfix and milterd
        # then see that client, not an originating one); that network may relay as loopback may.
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "mynetworks": "127.0.0.0/8 192.0.2.0/24",
    }
    lines = []
    for name, port in ports.items():
        line = f"127.0.0.1:{port} inet n - n - - smtpd\n  -o syslog_name=postfix/{name}"
        milters = listeners[name]
        if milters is not None:
            main[f"{name}_milters"] = milters
            line += f"\n  -o smtpd_milters=${name}_milters"
        lines.append(line)
    main.update(extra_main_cf or {})
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    (etc / "master.cf").write_text(_MASTER_CF.format(listeners="\n".join(lines)) + extra_master_cf)
    # Postfix will not trust a config file modified within the last second or so: it
    # re-reads it every 300 ms until its mtime is old enough (~2 s on every program start
    # right after writing, `postfix check` included). Backdating removes that wait.
    past = time.time() - 60
    for f in ("main.cf", "master.cf"):
        os.utime(etc / f, (past, past))

    # Creates the missing queue and data directories with Postfix's own owners and modes
    # and checks the configuration (0.15 s).
    rc, output = _run_on_tty([POSTFIX, "-c", str(etc), "check"])
    if rc != 0:
        raise RuntimeError(f"postfix check failed ({rc}): {output}\n{_tail([log])}")
    (queue / "pid" / "master.pid").unlink(missing_ok=True)

    env = dict(os.environ, MAIL_CONFIG=str(etc))
    proc, pid, out = _spawn([POSTFIX_MASTER, "-c", str(etc), "-s"], workdir, "postfix-master", env=env)
    d = Postfix(
        ports=ports, maildir=maildir, pid=pid, log=log, config_directory=etc, queue_directory=queue, proc=proc, out=out
    )._register()
    try:
        for port in ports.values():
            wait_for_listen(port, timeout, proc, pid=pid, logs=[log, out])
    except RuntimeError as e:
        d.stop()
        raise RuntimeError(
            f"{e}\nNote: Postfix's master reports start-up fatals (e.g. 'bind ... Address "
            f"already in use') only to syslog, which does not exist here, so the reason may "
            f"be missing above; `postfix -c {etc} check` passed."
        ) from None
    except BaseException:
        d.stop()
        raise
    return d


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _reaper_main(sys.argv[2], sys.argv[3:])
