"""A FAKE dccifd: DCC has no Debian package and cannot run here, so the DCC tests talk to this.

It speaks dccifd's ASCII protocol as DCC's dccifd(8) man page, include/dccif.h and dccifd.c's
ascii_job() describe it, and as SpamAssassin's DCC plugin uses it: one connection per message;
a line of options (unknown ones end the connection without an answer, as dccifd does); the SMTP
client's address, optionally followed by CR and its name; the HELO name; the sender; one
recipient a line (optionally followed by CR and a local user name) up to an empty line; then the
message up to the client's half-close. It answers the overall result letter and a newline, one
letter per recipient and a newline, and, asked for "header" (or "cksums"), the X-DCC header
(folded with a tab past 78 characters, as DCC folds it) and an empty line. Without recipients it
asks nothing and sends no header, as dccifd does.

It checks no checksums: the counts come from a JSON file (re-read for every connection), either
the default ones or those of the first token found in the message:

    {"counts": {"Body": 1, "Fuz1": 0, "Fuz2": 0},
     "tokens": {"BULK-TOKEN": {"Body": "many", "Fuz1": "many", "Fuz2": "many"},
                "SILENT-TOKEN": {"silent": true},      # read everything, never answer
                "TEMPFAIL-TOKEN": {"result": "T"}}}    # as dccifd without a DCC server

Every request is appended to a JSON-lines log (options, envelope, the message in base64), so
tests can assert on what the client really sent.

Run as ``python -I fake_dccifd.py SOCKET CONFIG LOG`` (stdlib only); tests start it with
`start_fake_dccifd`, under tests/daemons.py's reaper, and stop it by PID.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OPTIONS = {
    "log",
    "spam",
    "body",
    "header",
    "cksums",
    "query",
    "grey-off",
    "no-grey",
    "grey-query",
    "no-reject",
    "rcvd-nxt",
    "rcvd-next",
}
SILENT_FOR = 60.0  # seconds a silent connection is held open without an answer
_log_lock = threading.Lock()


class _Truncated(Exception):
    pass


class _Reader:
    """Lines and the rest of a stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def line(self) -> bytes:
        """The next line without its newline and trailing CRs (dccifd's ascii_read_line)."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise _Truncated("truncated request")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def rest(self) -> bytes:
        data = bytearray(self.buffer)
        while chunk := self.sock.recv(65536):
            data += chunk
        return bytes(data)


def _header(counts: dict, server: str = "fake-dccifd.test 1") -> bytes:
    """An X-DCC header as dccifd writes it, folded with a tab where a line would pass 78 characters."""
    values = [f"{name}={counts.get(name, 0)}" for name in ("Body", "Fuz1", "Fuz2")]
    words = [f"X-DCC-FAKE-Metrics: {server};", *(["bulk"] if "many" in map(str, counts.values()) else []), *values]
    lines, line = [], words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > 78:
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return "".join(f"{text}\n" for text in lines).encode()


class Handler(socketserver.BaseRequestHandler):
    server: FakeServer

    def handle(self) -> None:
        reader = _Reader(self.request)
        try:
            options = reader.line().decode("latin-1").replace(",", " ").split()
            if unknown := [o for o in options if o.lower() not in OPTIONS]:
                self._log({"error": f"unrecognized option value: {unknown[0]}"})
                return  # dccifd logs the error and ends the job without an answer
            config = json.loads(Path(self.server.config).read_text())
            client = reader.line()
            client_ip, _, client_name = client.partition(b"\r")
            helo, sender = reader.line(), reader.line()
            rcpts = []
            while rcpt := reader.line():
                rcpts.append(rcpt)
            message = reader.rest()
        except _Truncated as e:
            self._log({"error": str(e)})
            return
        counts = dict(config.get("counts", {}))
        behaviour: dict = {}
        for token, settings in config.get("tokens", {}).items():
            if token.encode() in message:
                behaviour = settings
                counts = {k: v for k, v in settings.items() if k in ("Body", "Fuz1", "Fuz2")} or counts
                break
        text = lambda b: b.decode("utf-8", "surrogateescape")  # noqa: E731
        self._log(
            {
                "options": options,
                "client_ip": text(client_ip),
                "client_name": text(client_name),
                "helo": text(helo),
                "sender": text(sender),
                "rcpts": [text(r) for r in rcpts],
                "message": base64.b64encode(message).decode(),
            }
        )
        if behaviour.get("silent"):
            time.sleep(SILENT_FOR)
            return
        result = behaviour.get("result", "A")
        wants_header = bool({"header", "cksums"} & {o.lower() for o in options})
        if (
            result == "T"
        ):  # dccifd without a DCC context (it answers that before the envelope; we read on for the token)
            reply = b"T\n\n" + (b"\n" if wants_header else b"")
        else:
            reply = f"{result}\n{('R' if result == 'R' else 'A') * len(rcpts)}\n".encode()
            if wants_header:
                reply += (_header(counts) if rcpts else b"") + b"\n"
            if "body" in {o.lower() for o in options}:
                reply += (_header(counts) if rcpts else b"") + message
        self.request.sendall(reply)

    def _log(self, entry: dict) -> None:
        with _log_lock, open(self.server.log, "a") as f:
            f.write(json.dumps(entry) + "\n")


class FakeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, config: str, log: str):
        self.config, self.log = config, log
        super().__init__(path, Handler)


def main(path: str, config: str, log: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = FakeServer(path, config, log)

    def stop(_sig, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"fake dccifd listening on {path}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        os.unlink(path)


# --------------------------------------------------------------------------- for the tests


@dataclass(frozen=True)
class FakeDccifd:
    """A running fake dccifd (see the module docstring); stop() is tests.daemons' stop by PID."""

    socket_path: Path
    config: Path
    requests_log: Path
    pid: int
    log: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    def requests(self) -> list[dict]:
        """Every complete request logged so far, the message decoded to bytes (readiness probes are not)."""
        if not self.requests_log.exists():
            return []
        entries = [json.loads(line) for line in self.requests_log.read_text().splitlines()]
        return [{**e, "message": base64.b64decode(e["message"])} for e in entries if "message" in e]

    def stop(self) -> None:
        from tests import daemons

        try:
            daemons._terminate(self.proc, self.pid, [self.log, self.out])
        finally:
            daemons._LIVE.pop(id(self), None)


def start_fake_dccifd(
    workdir: Path, counts: dict | None = None, tokens: dict | None = None, timeout: float = 10
) -> FakeDccifd:
    """Start the fake under the reaper in workdir; counts and tokens as in the module docstring."""
    from tests import daemons

    workdir.mkdir(parents=True, exist_ok=True)
    config, log, path = workdir / "fake_dccifd.json", workdir / "requests.jsonl", workdir / "dccifd"
    config.write_text(json.dumps({"counts": counts or {"Body": 0, "Fuz1": 0, "Fuz2": 0}, "tokens": tokens or {}}))
    argv = [sys.executable, "-I", str(Path(__file__).resolve()), str(path), str(config), str(log)]
    proc, pid, out = daemons._spawn(argv, workdir, "fake_dccifd")
    fake = FakeDccifd(path, config, log, pid, out, proc, out)
    daemons._LIVE[id(fake)] = fake  # stopped by daemons.stop_all at exit if a test forgets
    daemons.wait_for_unix_socket(path, timeout, proc, logs=[out])
    return fake


if __name__ == "__main__":
    main(*sys.argv[1:4])
