"""One message: its envelope and its raw bytes, in memory when small and on disk past a size.

Several checks read the same message at once, each through its own reader, so memory does not
grow with message size or with the number of checks.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from .mime import Inspection, Walker

CHUNK = 64 * 1024
MAX_HEADER_SECTION = 1024 * 1024  # Postfix's header_size_limit is 100 KB; past this no check reads on


@dataclass(frozen=True)
class Envelope:
    mail_from: str = ""  # "" is the null sender
    rcpts: tuple[str, ...] = ()
    client_ip: str = ""
    client_name: str = ""
    helo: str = ""
    queue_id: str = ""
    auth_user: str = ""  # Postfix {auth_authen}: SASL login name
    daemon_name: str = ""  # Postfix {daemon_name}: the smtpd service it came through (policy banks)

    def own_submission(self) -> str | None:
        """Why this is our own users' mail (sender authentication judges other servers), or None."""
        if self.auth_user:
            return "SASL-authenticated client"
        try:
            if ipaddress.ip_address(self.client_ip).is_loopback:  # sendmail(1) via pickup, a local reinjection
                return "client on loopback"
        except ValueError:
            pass
        return None


_CRLF = re.compile(r"\r?\n")


_BLANK_LINE = re.compile(rb"(?:^|\r?\n)\r?\n")


def split_header_section(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """A spooled message as (headers, body): the headers as the milter got them, (name, value)
    with LF-folded values (milter.py writes each as `Name: value` CRLF, its folds as CRLF; a file
    `scan` reads may end its lines in LF alone)."""
    blank = _BLANK_LINE.search(raw)
    head, body = (raw, b"") if blank is None else (raw[: blank.start()], raw[blank.end() :])
    headers: list[tuple[str, str]] = []
    for line in _CRLF.split(head.decode("utf-8", "surrogateescape")):
        if not line:
            continue
        if line[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value.removeprefix(" ")))
    return headers, body


def header_section(headers: list[tuple[str, str]]) -> bytes:
    """The wire form of (name, value) headers with LF- or CRLF-folded values, blank line excluded."""
    return b"".join(
        f"{name}: {_CRLF.sub(chr(13) + chr(10), value)}\r\n".encode("utf-8", "surrogateescape")
        for name, value in headers
    )


class Spool:
    """Collects a message's bytes; keeps up to `threshold` in memory, then moves to an unlinked temp file.

    The temp file has no name on disk (O_TMPFILE where the kernel allows), so a crash leaves
    nothing behind; readers use pread, so any number can read at once.
    """

    def __init__(self, threshold: int = 1 << 20, directory: str | None = None):
        self._threshold = threshold
        self._directory = directory or None
        self._memory: bytearray | bytes = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None and len(self._memory) + len(data) <= self._threshold:
            self._memory += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="milterd-")
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(data)

    def reader(self) -> BinaryIO:
        """A new reader from the first byte; independent of other readers."""
        if self._file is None:
            self._memory = bytes(self._memory)  # once: BytesIO shares an immutable buffer, no copy per reader
            return io.BytesIO(self._memory)
        self._file.flush()
        # Its own descriptor: a check that outlives its deadline keeps reading this message even
        # after the spool is closed, never another message's file that reused the number.
        return io.BufferedReader(_PReader(os.dup(self._file.fileno()), self.size), CHUNK)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    @classmethod
    def copy_of(cls, stream: BinaryIO, threshold: int = 1 << 20, directory: str | None = None) -> Spool:
        spool = cls(threshold, directory)
        while chunk := stream.read(CHUNK):
            spool.write(chunk)
        return spool


class _Prefix(io.RawIOBase):
    """The first `size` bytes of a reader (and finally closes it)."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream, self._left = stream, size

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._left)
        if want <= 0:
            return 0
        got = self._stream.readinto(memoryview(buffer)[:want])
        self._left -= got
        return got


class _PReader(io.RawIOBase):
    """Reads (and finally closes) a file descriptor with pread from its own offset."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass
class Message:
    """What the pipeline scans: the envelope and the spooled raw message.

    The MIME walk is done once, by whichever check asks first; the others wait for it and share it.
    """

    envelope: Envelope
    spool: Spool
    deadline: float | None = None  # time.monotonic() by which the reply is due ([milter] message_timeout)
    _inspection: Inspection | None = field(default=None, init=False, repr=False)
    _header_section: bytes | None = field(default=None, init=False, repr=False)
    _cuts: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # max_body -> truncated size
    _inspecting: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.spool.size

    def time_left(self, limit: float) -> float:
        """Seconds a check may still spend: its own `limit`, or less when the message's deadline is nearer."""
        if self.deadline is None:
            return limit
        return max(0.0, min(limit, self.deadline - time.monotonic()))

    def open(self) -> BinaryIO:
        return self.spool.reader()

    def headers(self) -> list[tuple[str, str]]:
        """The header fields as (name, value), folds kept as LF."""
        return split_header_section(self.header_section())[0]

    def header_section(self) -> bytes:
        """The lines before the first empty one (CRLF or LF), at most MAX_HEADER_SECTION bytes."""
        if self._header_section is not None:
            return self._header_section
        lines, size = [], 0
        with self.open() as stream:
            while size < MAX_HEADER_SECTION:
                line = stream.readline(MAX_HEADER_SECTION - size)
                if not line or line in (b"\r\n", b"\n"):
                    break
                lines.append(line)
                size += len(line)
        self._header_section = b"".join(lines)  # the spool does not change: read once
        return self._header_section

    def truncated(self, max_body: int) -> View:
        """The message as amavis gives SpamAssassin one over its size limit: the header section whole
        (up to MAX_HEADER_SECTION), then at most `max_body` bytes of the body, cut after the last line
        end (LF or CRLF) within them, or at `max_body` when the body has none there.

        The view is a prefix of the raw message, streamed from the spool like the message itself:
        finding the cut reads what is kept once, a CHUNK at a time. A message of at most `max_body`
        bytes is whole, unread.
        """
        if self.size <= max_body:
            return View(self, self.size)
        cut = self._cuts.get(max_body)
        if cut is None:
            cut = self._cuts[max_body] = self._cut(max_body)  # the spool does not change: found once
        return View(self, cut)

    def _cut(self, max_body: int) -> int:
        with self.open() as stream:
            pos = 0
            while pos < MAX_HEADER_SECTION:
                line = stream.readline(MAX_HEADER_SECTION - pos)
                pos += len(line)
                if not line or line in (b"\r\n", b"\n"):
                    break
            body, limit = pos, pos + max_body
            if limit >= self.size:
                return self.size
            last = body
            while pos < limit and (chunk := stream.read(min(CHUNK, limit - pos))):
                if (end := chunk.rfind(b"\n")) >= 0:
                    last = pos + end + 1
                pos += len(chunk)
        return last if last > body else limit

    def sha256(self) -> str:
        """The message's digest: the key of the collaborative checks' result caches."""
        digest = hashlib.sha256()
        with self.open() as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def inspect(self, walker: Walker) -> Inspection:
        with self._inspecting:
            if self._inspection is None:
                self._inspection = walker.inspect(self)
            return self._inspection

    def close(self) -> None:
        self.spool.close()


@dataclass(frozen=True)
class View:
    """A prefix of a message (Message.truncated): what a check with a size limit is given."""

    message: Message
    size: int  # bytes of the message in the view

    @property
    def truncated(self) -> bool:
        return self.size < self.message.size

    def open(self) -> BinaryIO:
        stream = self.message.open()
        return stream if not self.truncated else io.BufferedReader(_Prefix(stream, self.size), CHUNK)

    def note(self, done: str = "scored") -> str:
        """What the finding's detail says of a truncated view: "truncated: first N of M bytes scored"."""
        return f"truncated: first {self.size} of {self.message.size} bytes {done}"
