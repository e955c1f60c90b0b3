"""`make run`: private clamd and spamd under .run/, an offline `milterd scan` of three samples, then
`milterd run` with the samples sent through a throw-away private Postfix; then milterd serves until
Ctrl-C/SIGTERM, and every daemon is stopped on the way out, whatever happened."""

import ctypes
import email
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

from tests import daemons

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
MILTERD = ROOT / ".venv" / "bin" / "milterd"
SYSTEM_DB = Path("/var/lib/clamav")
SENDER, RCPT = "alice@remote.test", "user@example.com"  # example.com: a local domain in rules/
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"  # split like EICAR


def check_listen(spec: str) -> tuple[int, str]:
    """Port and Postfix milter address of a free libmilter inet:PORT@HOST address; ValueError if not."""
    if not (m := re.fullmatch(r"inet:(\d+)@([\w.-]+)", spec)):
        raise ValueError(f"MILTERD_LISTEN={spec!r}: use inet:PORT@HOST, e.g. inet:8892@127.0.0.1")
    host, port = m.group(2), int(m.group(1))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libmilter does
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"milterd cannot listen on {host} port {port}: {e.strerror}.\n"
                f"Stop what uses it (`ss -ltnp 'sport = :{port}'`) or use another port:\n"
                "    MILTERD_LISTEN=inet:8892@127.0.0.1 make run"
            ) from None
    return port, f"inet:{host}:{port}"


def start_clamav():
    """clamd with the system's signatures if there are any, else the test signatures."""
    if any((SYSTEM_DB / f).exists() for f in ("main.cvd", "main.cld", "daily.cvd", "daily.cld")):
        print(f"* clamd: loading the real signatures from {SYSTEM_DB} (can take a minute) ...")
        return daemons.start_clamd(RUN / "clamd", database_dir=SYSTEM_DB, timeout=300)
    print(
        f"\nWARNING: no ClamAV signature database in {SYSTEM_DB}: clamd gets test signatures only,\n"
        "WARNING: so it detects ONLY the EICAR test string and the ClamAV test files, no real virus.\n"
        "WARNING: To get real signatures run `freshclam` (as root, needs Internet access), then\n"
        "WARNING: run `make run` again.\n\n* clamd: starting with the test signatures ..."
    )
    return daemons.start_clamd(RUN / "clamd")


def write_samples(dest: Path) -> list[Path]:
    """A clean, a GTUBE and an EICAR message to user@example.com (each file's stem is in its Message-ID)."""
    dest.mkdir()
    for name, subject, body, attachment in [
        ("1-clean.eml", "Lunch on Friday?", "Hi,\n\nstill on for lunch on Friday?\n\nAlice\n", None),
        ("2-spam-gtube.eml", "Cheap offer", f"The GTUBE spam test string:\n\n{GTUBE}\n", None),
        ("3-virus-eicar.eml", "Your invoice", "Please see the attached invoice.\n", daemons.EICAR),
    ]:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = f"Alice <{SENDER}>", RCPT, subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = f"<{name[:-4]}.{time.time_ns()}@remote.test>"
        msg.set_content(body)
        if attachment:
            msg.add_attachment(attachment, "application", "octet-stream", filename="invoice.com")
        (dest / name).write_bytes(msg.as_bytes())
    return sorted(dest.iterdir())


def start_milterd(config: Path, log: Path) -> subprocess.Popen:
    """`milterd run --foreground` logging to log; SIGTERM'd by the kernel if we die (PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(log, "ab") as f:  # own session: Ctrl-C reaches only us, and we stop it in order
        return subprocess.Popen(
            [str(MILTERD), "run", "--foreground", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: libc.prctl(1, signal.SIGTERM),
        )  # noqa: PLW1509 (no threads)


def send(port: int, raw: bytes) -> tuple[int | None, str]:
    """Send raw over SMTP; (reply code, reply text) of the step that ended the transaction."""
    try:
        with smtplib.SMTP("127.0.0.1", port, "client.remote.test", timeout=120) as s:
            code, reply = s.mail(SENDER)  # says EHLO first
            if code == 250:
                code, reply = s.rcpt(RCPT)
            if code in (250, 251):
                code, reply = s.data(raw)  # raises SMTPDataError unless 250
            return code, reply.decode(errors="replace")
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error.decode(errors="replace")
    except OSError as e:  # refused or lost connection (SMTPException is an OSError too)
        return None, f"{type(e).__name__}: {e}"


def demo(samples: list[Path], milter: str) -> None:
    """Send the samples through a private Postfix using milterd; print what happened to each."""
    print(f"* sending the samples through a private Postfix with smtpd_milters = {milter} ...")
    postfix = daemons.start_postfix(RUN / "postfix", {"smtp": milter})  # main() stops it on errors
    for path in samples:
        code, reply = send(postfix.ports["smtp"], path.read_bytes())
        print(f"\n  {path.name}: SMTP {code} {reply}")
        if code == 250:
            msg = email.message_from_bytes(postfix.wait_delivered(path.stem.encode()))
            print("    delivered, with these headers:")
            for name, value in msg.items():
                if re.fullmatch(r"x-spam-.*|x-virus-scanned|subject", name, re.IGNORECASE):
                    print(f"      {name}: {' '.join(str(value).split())}")
    postfix.stop()


def banner(listen: str, milter: str, log: Path) -> None:
    """How to use the running milterd, where its logs go, how to stop it."""
    print(
        f'\n{"=" * 78}\nmilterd is listening on {milter.removeprefix("inet:")}  (listen = "{listen}")\n\n'
        "To filter your real Postfix's mail with it, add to /etc/postfix/main.cf, then `postfix reload`:\n"
        f"    smtpd_milters = {milter}\n    non_smtpd_milters = $smtpd_milters\n"
        "    milter_default_action = tempfail\n    milter_protocol = 6\n\n"
        "Config: .run/milterd.toml, policy: .run/rules/ (restart `make run` after edits)\n"
        f"Logs: milterd's log follows and is kept in {log.relative_to(ROOT)}; clamd: .run/clamd/clamd.log,\n"
        "      spamd: .run/spamd/spamd-run/spamd.log (spamd runs offline: no DNS/network tests)\n"
        "Press Ctrl-C to stop milterd, spamd and clamd.\n" + "=" * 78
    )


def prepare(listen: str) -> tuple[Path, list[Path]]:
    """Fresh .run/ with clamd, spamd, milterd.toml, rules/ and samples/; the offline scan."""
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()  # daemons.start_* make it traversable for the daemons' users
    clamd = start_clamav()
    print("* spamd: starting (private config, no network tests) ...")
    spamd = daemons.start_spamd(RUN / "spamd")
    shutil.copytree(ROOT / "rules", RUN / "rules")
    config = RUN / "milterd.toml"
    config.write_text(
        f'[milter]\nlisten = "{listen}"\nrules = "rules"\nlog_file = ""\n\n'
        f'[clamav]\nsocket = "{clamd.socket_path}"\n\n'
        f'[spamd]\naddress = "127.0.0.1:{spamd.port}"\n\n'
        f'[quarantine]\ndirectory = "{RUN / "quarantine"}"\n\n'
        f'[notify]\noutbox = "{RUN / "outbox"}"\nvia = "127.0.0.1:1"  # no relay here: notifications wait\n'
    )
    samples = write_samples(RUN / "samples")
    print("* offline check: milterd scan --config .run/milterd.toml .run/samples\n")
    rc = subprocess.run(
        [str(MILTERD), "scan", "--config", ".run/milterd.toml", ".run/samples"], cwd=ROOT, check=False
    ).returncode
    print(f"\n(exit {rc}: {'EICAR was blocked, as expected' if rc == 1 else 'UNEXPECTED, EICAR should be blocked'})")
    return config, samples


def main() -> int:
    """Bring everything up, show it working, serve until Ctrl-C/SIGTERM; the exit status."""
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the children's
    listen = os.environ.get("MILTERD_LISTEN", "inet:8891@127.0.0.1")
    try:
        port, milter = check_listen(listen)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops us like Ctrl-C
    milterd, status, log = None, 0, RUN / "milterd.log"
    try:
        config, samples = prepare(listen)
        print(f"\n* starting milterd run --foreground (log: {log.relative_to(ROOT)}) ...")
        milterd = start_milterd(config, log)
        daemons.wait_for_listen(port, 20, milterd, pid=milterd.pid, logs=[log])
        demo(samples, milter)
        banner(listen, milter, log)
        with open(log, errors="replace") as f:  # milterd's log, as it comes, until it ends
            while milterd.poll() is None:
                if not (line := f.readline()):
                    time.sleep(0.2)
                print(line, end="")
            print(f.read(), end="")
        raise RuntimeError(f"milterd exited with status {milterd.returncode}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal (make passes one on) must not
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cut the cleanup short
        print("\nstopping ...")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if milterd is not None:
                milterd.terminate()  # libmilter stops on SIGTERM; SIGKILL only if it hangs
                try:
                    milterd.wait(10)
                except subprocess.TimeoutExpired:
                    milterd.kill()
                    milterd.wait()
            daemons.stop_all()  # spamd and clamd (and Postfix, if a failure left it running)
            print("milterd, spamd and clamd stopped.")
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # the others were stopped
            print(f"error while stopping: {e}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
