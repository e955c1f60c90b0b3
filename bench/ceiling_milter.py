"""The fair ceiling for milterd with clamd and spamd: a milter that only hands each message to them.

`make bench` puts it behind its own Postfix listener, so it gets the same SMTP client, the same
Postfix and the same milter protocol as milterd's rows; all it adds is what any milter must do
to scan with clamd and SpamAssassin. It keeps the message in memory as Postfix sends it (the
header lines rebuilt as milterd rebuilds them), then at end of message streams it to clamd
(INSTREAM) and, unless clamd found a virus, to spamd (REPORT), as milterd orders them. It
refuses what milterd's bench policy refuses (a virus, or a score at the kill level) so that Postfix
delivers the same messages in both rows, and adds no header. No policy, no parsing, no spool,
no logging: whatever milterd spends beyond this is its own.

Usage: python -m bench.ceiling_milter inet:PORT@127.0.0.1 CLAMD_SOCKET SPAMD_HOST:PORT KILL_LEVEL
"""

from __future__ import annotations

import re
import socket
import struct
import sys

import Milter

CHUNK = 64 * 1024
TIMEOUT = 120.0
_LINE_END = re.compile(rb"\r?\n")
_SCORE = re.compile(rb"^Spam: \w+ ; (-?[0-9.]+) / ", re.MULTILINE | re.IGNORECASE)

clamd_socket = ""
spamd_address = ("127.0.0.1", 783)
kill_level = 4.0


def clamd_instream(raw: bytes) -> bytes:
    """clamd's one-line verdict: b"stream: OK" or b"stream: NAME FOUND"."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(clamd_socket)
        sock.sendall(b"nINSTREAM\n")
        for start in range(0, len(raw), CHUNK):
            chunk = raw[start : start + CHUNK]
            sock.sendall(struct.pack("!L", len(chunk)) + chunk)
        sock.sendall(struct.pack("!L", 0))
        with sock.makefile("rb") as reply:
            return reply.readline(4096).strip()


def spamd_report(raw: bytes) -> bytes:
    """spamd's whole REPORT reply (its head says Spam: True or False)."""
    with socket.create_connection(spamd_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"REPORT SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(raw))
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while data := sock.recv(CHUNK):
            reply += data
        return bytes(reply)


class Ceiling(Milter.Base):
    def __init__(self):
        self.parts: list[bytes] = []
        self.in_body = False

    @Milter.noreply
    def envfrom(self, mail_from, *params):
        self.parts, self.in_body = [], False
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE  # answered, or Postfix's next write waits for a delayed ACK (40 ms)

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name, value):
        self.parts.append(name.encode("ascii", "replace") + b": " + _LINE_END.sub(b"\r\n", value) + b"\r\n")
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        if not self.in_body:
            self.in_body = True
            self.parts.append(b"\r\n")
        self.parts.append(chunk)
        return Milter.CONTINUE

    def eom(self):
        if not self.in_body:
            self.parts.append(b"\r\n")
        raw = b"".join(self.parts)
        self.parts = []
        try:
            verdict = clamd_instream(raw)
            if verdict.endswith(b"FOUND"):
                self.setreply("554", "5.7.1", "virus")
                return Milter.REJECT
            if not verdict.endswith(b"OK"):
                return Milter.TEMPFAIL
            reply = spamd_report(raw)
        except OSError:
            return Milter.TEMPFAIL
        score = _SCORE.search(reply.partition(b"\r\n\r\n")[0])
        if score is None:
            return Milter.TEMPFAIL
        if float(score.group(1)) >= kill_level:
            self.setreply("554", "5.7.1", "spam")
            return Milter.REJECT
        return Milter.ACCEPT


if __name__ == "__main__":
    listen, clamd_socket, spamd, kill = sys.argv[1:5]
    kill_level = float(kill)
    host, _, port = spamd.rpartition(":")
    spamd_address = (host, int(port))
    Milter.factory = Ceiling
    Milter.runmilter("ceiling", listen, 30)
