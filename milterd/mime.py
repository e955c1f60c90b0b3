"""Walk a message down to every leaf: MIME parts, attached messages, uuencoded blocks, TNEF, archives.

The banned-file check needs what amavis' decoders give it: for every file inside the message, its
declared and real (libmagic) type and its names from the root down. clamd unpacks for itself; this
walk only names and types things, so it reads each member as a stream and keeps a member's bytes
only when the member is a container to open in turn. The limits are amavis': too deep leaves that
container closed, too many files, too many expanded bytes or too long ends the walk; either way
with a reason in `unchecked`, never with an exception.

Who reads what: libarchive (in process, as a stream) the archive formats in FORMATS and the single
compressed streams in COMPRESSED, which are decompressed as gunzip would, into the same quota;
Debian's unar (a child process in its own process group, killed at the walk's deadline or past the
quota, writing into a private temporary directory that is always removed) what libarchive cannot:
ARJ, BinHex, zoo, ARC, and zip members packed with deflate64 or PKWARE implode; Python itself MIME,
uuencode and TNEF.
"""

from __future__ import annotations

import binascii
import contextlib
import ctypes
import io
import json
import os
import queue
import quopri
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from email.feedparser import BytesFeedParser
from email.header import decode_header, make_header
from email.message import Message as EmailPart
from email.policy import compat32
from typing import TYPE_CHECKING, BinaryIO

import magic
import tnefparse
from libarchive import ffi
from libarchive.exception import ArchiveError
from libarchive.read import ArchiveRead

if TYPE_CHECKING:
    from .checks.banned import BannedSettings as Limits

LARGE = 1024 * 1024  # the milter's default spool_threshold: past it a message is on disk
# A walk frees what it parsed, but glibc keeps the freed heap; handing it back after each walk keeps
# the peak flat under load (c=50: 90 -> 80 MB) for ~3 us. Without glibc there is nothing to do.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)
HEAD = 64 * 1024  # what libmagic sees of each file: enough for ISO 9660's signature at 32 KiB
BLOCK = 64 * 1024

# Real types libarchive unpacks.
ARCHIVES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/java-archive",
        "application/epub+zip",
        "application/vnd.android.package-archive",
        "application/x-7z-compressed",
        "application/x-rar",
        "application/vnd.rar",
        "application/x-rar-compressed",
        "application/x-tar",
        "application/x-gtar",
        "application/x-ustar",
        "application/x-cpio",
        "application/x-iso9660-image",
        "application/x-lha",
        "application/x-lzh-compressed",
        "application/vnd.ms-cab-compressed",
        "application/x-xar",
        "application/x-archive",
        "application/vnd.debian.binary-package",
        "application/x-rpm",
        "application/warc",
    }
)
# Office documents that are zip files (docx, xlsm, odt ...): amavis unpacks them too.
ZIP_DOCUMENTS = (
    "application/vnd.openxmlformats-officedocument.",
    "application/vnd.oasis.opendocument.",
    "application/vnd.ms-excel.",
    "application/vnd.ms-word.",
    "application/vnd.ms-powerpoint.",
)
# Single compressed streams: a tar inside is an archive, anything else one member (libarchive's "raw").
COMPRESSED = frozenset(
    {
        "application/gzip",
        "application/x-gzip",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-lzma",
        "application/zstd",
        "application/x-zstd",
        "application/x-lzip",
        "application/x-lz4",
        "application/x-compress",
    }
)
# Executables may be self-extracting archives, and libmagic's "data" may be an archive behind a prefix
# (libarchive finds a zip by its central directory at the end): when libarchive finds none, plain files.
MAYBE_ARCHIVES = frozenset(
    {"application/vnd.microsoft.portable-executable", "application/x-dosexec", "application/octet-stream"}
)
# What a compressed stream holds that is listed in its place (a .tar.gz's files are the .gz's members,
# as libarchive and tar list them); anything else inside is one member, named as gunzip names it.
TARS = frozenset({"application/x-tar", "application/x-gtar", "application/x-ustar", "application/x-cpio"})
# Containers libarchive cannot read and amavis opens with its external decoders: unar reads them.
UNAR = frozenset(
    {
        "application/x-arj",
        "application/mac-binhex40",
        "application/x-zoo",
        "application/x-arc",
        "application/x-stuffit",
    }
)
# Zip members libarchive reads the directory of but cannot decompress: unar extracts those members.
_UNAR_METHODS = re.compile(r"Unsupported ZIP compression method", re.IGNORECASE)
UNAR_POLL = 0.02  # seconds between looks at a running unar (deadline, extracted bytes and files)
LISTING_MAX = 16 * 1024 * 1024  # lsar's JSON listing of one archive; more is a hostile archive
TNEF = frozenset({"application/vnd.ms-tnef", "application/ms-tnef"})
MAIL = "message/rfc822"
# Not "all": mtree makes members out of a text list of file names, raw takes anything (only for COMPRESSED).
FORMATS = ("7zip", "ar", "cab", "cpio", "iso9660", "lha", "rar", "rar5", "tar", "warc", "xar", "zip")
# Only decompressors built into libarchive: the others run external programs on hostile input.
FILTERS = ("gzip", "bzip2", "xz", "lzma", "lzip", "zstd", "lz4", "compress", "rpm")
COMPRESSION_SUFFIXES = frozenset({"gz", "bz2", "xz", "lzma", "zst", "z", "lz", "lz4"})
NAME_HEADERS = ("content-type", "content-disposition")
_CLEAN_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]*={0,2}[\r\n]*")  # no defect for the email package to report
_UU_BEGIN = re.compile(rb"^begin [0-7]{3,4} ([^\r\n]*)\r?\n", re.MULTILINE)

ffi.ffi("entry_is_encrypted", [ffi.c_archive_entry_p], ctypes.c_int)  # not wrapped by libarchive-c 5


@dataclass(frozen=True)
class Part:
    path: str  # names from the root down joined by "/", "part1.2" for a MIME node without a name; raw
    name: str  # this node's file name, decoded; "" if none
    declared_type: str  # lower-case Content-Type of a MIME part; "" for archive members
    real_type: str  # libmagic MIME type of the decoded content; "" when it could not be read
    in_archive: bool  # False for a MIME leaf, True for a member of an archive, TNEF or uuencoded block
    depth: int  # 1 for the top message's leaves, one more per attached message or container
    size: int  # decoded bytes


@dataclass(frozen=True)
class Inspection:
    parts: tuple[Part, ...]  # every leaf MIME part and every archive member (archives too)
    unchecked: tuple[str, ...]  # why something was not inspected
    mime_defects: tuple[str, ...]  # "<path>: <email package defect>"


class _Stop(Exception):
    """A limit for the whole walk (files, quota, time) was reached: the walk ends here."""


class _TooDeep(Exception):
    """max_levels reached: the container being opened is left unopened, the walk goes on."""


class Walker:
    """Walks messages within [banned]'s limits; one per Engine, shared by every session.

    At most `walk_slots` messages are walked at once, and messages spooled to disk one at a time,
    so concurrent mail cannot add up in memory; the heap is trimmed after each walk.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        # A walk is Python under the GIL: two at a time keep both cores busy, and more would only hold
        # more parsed messages in memory at once (make bench, c=50: peak RSS 108 MB with 32 walks, 62 with 2).
        self._slots = threading.BoundedSemaphore(limits.walk_slots)
        self._large = threading.Lock()
        # libmagic runs without the GIL. A few handles, borrowed in turn: python-magic's one shared
        # handle is behind a lock that concurrent messages queued on (a third of milterd's CPU samples
        # under load), and a handle per thread cost each thread a private copy of the database (16 MB).
        self._magic: queue.LifoQueue = queue.LifoQueue()
        for _ in range(limits.magic_handles):
            self._magic.put(magic.Magic(mime=True))

    def inspect(self, message) -> Inspection:
        """Every file in `message` (a milterd.message.Message) with its types; never raises."""
        limits = self.limits
        if message.size > limits.max_size:
            return Inspection((), (f"message: larger than max_size ({message.size} > {limits.max_size} bytes)",), ())
        with self._large if message.size > LARGE else contextlib.nullcontext(), self._slots:
            try:
                return self._inspect(message)
            finally:
                _malloc_trim(0)

    def _inspect(self, message) -> Inspection:
        walk = _Walk(self.limits, message.size, self.identify, message.time_left(self.limits.timeout))
        try:
            with message.open() as stream:
                root = walk.parse(stream, "message")
            walk.message(root, "", 1)
        except _Stop as stop:
            walk.unchecked.append(str(stop))
        except RecursionError:  # the email package recurses once per nested multipart
            walk.unchecked.append("message: cannot parse: MIME nesting too deep")
        except Exception as exc:  # a hostile message must not take the filter down
            walk.unchecked.append(f"message: cannot inspect: {_reason(exc)}")
        return Inspection(tuple(walk.parts), tuple(walk.unchecked), tuple(walk.defects))

    def identify(self, data: bytes) -> str:
        """libmagic's MIME type of the head, as file(1) reads it."""
        handle = self._magic.get()
        try:
            return handle.from_buffer(data[:HEAD])
        finally:
            self._magic.put(handle)


class _Walk:
    """The state of one walk: what was found, and what is left of each limit."""

    def __init__(self, limits: Limits, size: int, identify: Callable[[bytes], str], timeout: float):
        self.limits = limits
        self.timeout = timeout
        self.identify = identify
        self.quota = max(
            limits.min_expansion_quota,
            size * limits.min_expansion_factor,
            min(limits.max_expansion_quota, size * limits.max_expansion_factor),
        )
        self.expanded = 0
        self.deadline = time.monotonic() + timeout
        self.parts: list[Part] = []
        self.unchecked: list[str] = []
        self.defects: list[str] = []

    # limits

    def tick(self, where: str) -> None:
        if time.monotonic() > self.deadline:
            raise _Stop(f"timeout {self.timeout:g} s exceeded at {where}")

    def spend(self, size: int, where: str) -> None:
        self.expanded += size
        if self.expanded > self.quota:
            raise _Stop(f"max_expansion_quota {self.quota} bytes exceeded at {where}")

    def descend(self, path: str, depth: int) -> None:
        """Before anything at `depth`: is there time and depth left?"""
        self.tick(path)
        if depth > self.limits.max_levels:
            raise _TooDeep(f"max_levels {self.limits.max_levels} exceeded at {path}")

    def admit(self, path: str, depth: int) -> None:
        """Before a new file: is there time, depth and room left for it?"""
        self.descend(path, depth)
        if len(self.parts) >= self.limits.max_files:
            raise _Stop(f"max_files {self.limits.max_files} exceeded at {path}")

    @contextlib.contextmanager
    def guard(self, path: str, failure: str) -> Iterator[None]:
        """A node that fails becomes a reason in `unchecked`; the walk goes on with the next one."""
        try:
            yield
        except _Stop:
            raise
        except _TooDeep as deep:
            self.unchecked.append(str(deep))
        except RecursionError:
            self.unchecked.append(f"{path}: {failure}: nesting too deep")
        except Exception as exc:  # unpackers fail in every way on hostile input
            self.unchecked.append(_failure(path, failure, _reason(exc)))

    def record(self, path, name, declared, depth, in_archive, size, real_type: str = "") -> Part:
        """A file found; without `real_type` its content could not be read, and the caller says why."""
        part = Part(path, name, declared, real_type, in_archive, depth, size)
        self.parts.append(part)
        return part

    # MIME

    def parse(self, stream: BinaryIO, where: str) -> EmailPart:
        """compat32, the most lenient policy: problems become defects, not exceptions."""
        parser = BytesFeedParser(policy=compat32)
        while chunk := stream.read(BLOCK):
            self.tick(where)
            parser.feed(chunk)
        return parser.close()

    def message(self, root: EmailPart, prefix: str, depth: int) -> None:
        """One message's tree, depth first; positions as IMAP numbers them (part1.2)."""
        stack = [(root, "")]
        while stack:
            node, position = stack.pop()
            if node.is_multipart() and node.get_content_maintype() != "message":
                label = _join(prefix, f"part{position}") if position else prefix or "message"
                self.tick(label)
                self._defects(node, label)
                children = [child for child in node.get_payload() if isinstance(child, EmailPart)]
                numbered = [(child, f"{position}.{n}" if position else str(n)) for n, child in enumerate(children, 1)]
                stack.extend(reversed(numbered))
                continue
            name = _filename(node)
            path = _join(prefix, name or f"part{position or 1}")
            with self.guard(path, "cannot decode"):
                if node.is_multipart() and not _encoded(node):  # an attached message: one level down
                    self._defects(node, path)
                    self.descend(path, depth + 1)
                    for sub in node.get_payload():
                        if isinstance(sub, EmailPart):
                            self.message(sub, path, depth + 1)
                else:
                    self._leaf(node, path, name, depth)

    def _leaf(self, node: EmailPart, path: str, name: str, depth: int) -> None:
        self.admit(path, depth)
        data = _decoded(node)
        self._defects(node, path)
        self.spend(len(data), path)
        declared = node.get_content_type()
        part = self.record(path, name, declared, depth, False, len(data), self.identify(data))
        tnef = declared in TNEF or name.lower() == "winmail.dat"
        self.contents(part, data, tnef)

    def _defects(self, node: EmailPart, label: str) -> None:
        self.defects.extend(f"{label}: {type(defect).__name__}" for defect in node.defects)

    # containers

    def contents(self, part: Part, source: bytes | BinaryIO, tnef: bool = False) -> None:
        """Open `part` by its real type; its files come one level down."""
        with self.guard(part.path, "cannot unpack"):
            real = part.real_type
            if tnef or real in TNEF:
                self._tnef(part, source if isinstance(source, bytes) else source.read())
            elif real == MAIL:
                self.descend(part.path, part.depth + 1)
                stream = io.BytesIO(source) if isinstance(source, bytes) else source  # BytesIO shares bytes
                self.message(self.parse(stream, part.path), part.path, part.depth + 1)
            elif real in COMPRESSED:
                self._decompress(part, source)
            elif real in ARCHIVES or real.startswith(ZIP_DOCUMENTS):
                self._archive(part, source)
            elif real in UNAR:
                self._unar(part, source)
            elif real in MAYBE_ARCHIVES:
                self._archive(part, source, optional=True)
            elif real.startswith("text/") and isinstance(source, bytes) and b"begin " in source:
                self._uuencoded(part, source)

    def _archive(self, part: Part, source: bytes | BinaryIO, optional: bool = False) -> None:
        """Every regular file in the archive, read as a stream; `optional`: not being one is fine."""
        with _reader() as archive:
            try:
                _open(archive, source)
                entries = iter(ArchiveRead(archive))
                entry = next(entries, None)
            except ArchiveError as exc:
                if optional and not _encrypted(_reason(exc)):
                    return
                raise
            buffer = ctypes.create_string_buffer(BLOCK)
            n = 0
            deferred: dict[str, str] = {}  # members libarchive cannot decompress: name -> its reason
            while entry is not None:
                if entry.isfile:
                    n += 1
                    name = _text(entry.pathname)
                    self._member(archive, buffer, entry, part, name, n, deferred)
                entry = next(entries, None)
        if deferred:  # deflate64, implode: unar extracts just those, and what it cannot stays unchecked
            also = ""
            try:
                self._unar(part, source, only=set(deferred))
            except (_Stop, _TooDeep):
                raise
            except Exception as exc:
                also = f"; {_reason(exc)}"
            found = {p.name for p in self.parts if p.path.startswith(part.path + "/") and p.real_type}
            for name, failure in deferred.items():
                path = _join(part.path, name)
                if name not in found:
                    self.admit(path, part.depth + 1)
                    self.record(path, name, "", part.depth + 1, True, 0)
                if name not in found or also:
                    self.unchecked.append(_failure(path, "cannot unpack", failure + also))

    def _member(self, archive, buffer, entry, parent: Part, name: str, n: int, deferred: dict) -> None:
        path = _join(parent.path, name or ("data" if n == 1 else f"member{n}"))
        depth = parent.depth + 1
        self.admit(path, depth)
        if ffi.entry_is_encrypted(entry._entry_p):  # libarchive-c has no property for it
            self.record(path, name, "", depth, True, entry.size or 0)
            self.unchecked.append(f"encrypted: {path}")
            return
        with _Content(self.identify, self.limits.spill_dir) as content:
            failure = self._read(archive, buffer, content, path)
            if failure and name and content.size == 0 and _UNAR_METHODS.search(failure):
                deferred[name] = failure
                return
            if failure:
                self.record(path, name, "", depth, True, content.size)
                self.unchecked.append(_failure(path, "cannot unpack", failure))
                return
            part = self.record(path, name, "", depth, True, content.size, content.type())
            if source := content.source():
                self.contents(part, source)

    def _read(self, archive, buffer, content: _Content, path: str) -> str:
        """The current entry's data into `content`, within the quota and the deadline; why it stopped early."""
        try:
            while (size := ffi.read_data(archive, buffer, BLOCK)) > 0:
                self.tick(path)
                self.spend(size, path)
                content.add(buffer, size)
        except ArchiveError as exc:  # this member only: the next one may still read
            return _reason(exc)
        # ARCHIVE_WARN ends the data early: bad CRC, wrong size
        return _text(ffi.error_string(archive)) or "truncated" if size < 0 else ""

    def _decompress(self, part: Part, source: bytes | BinaryIO) -> None:
        """A single compressed stream (.gz, .bz2, .xz, .zst, .lz ...), decompressed as gunzip would, every
        byte counted against the quota: a tar inside is listed in its place (a .tar.gz's files are its
        members), anything else is one member named as gunzip names it. Not libarchive's format bidding
        over the stream: a stream of zeros is a valid empty tar to it, and a bomb would pass unread."""
        with _reader(formats=("raw",)) as archive:
            _open(archive, source)
            entry = next(iter(ArchiveRead(archive)), None)
            if entry is None or ffi.filter_count(archive) <= 1:  # raw without a decompressor: the input itself
                raise ValueError(f"not {part.real_type} data")
            name = _decompressed_name(part.name.rpartition("/")[2])  # a member's name is its path in the archive
            path = _join(part.path, name or "data")
            depth = part.depth + 1
            self.admit(path, depth)
            with _Content(self.identify, self.limits.spill_dir) as content:
                failure = self._read(archive, ctypes.create_string_buffer(BLOCK), content, path)
                if failure:
                    self.record(path, name, "", depth, True, content.size)
                    self.unchecked.append(_failure(path, "cannot unpack", failure))
                    return
                real = content.type()
                inner = content.source()
                if real in TARS and inner is not None:
                    self._archive(replace(part, real_type=real), inner)
                    return
                member = self.record(path, name, "", depth, True, content.size, real)
                if inner is not None:
                    self.contents(member, inner)

    def _unar(self, part: Part, source: bytes | BinaryIO, only: set[str] | None = None) -> None:
        """What libarchive cannot read, through Debian's lsar/unar as amavis runs its external decoders:
        listed first (declared sizes against the quota), then extracted into a private temporary
        directory watched for the deadline, the quota and max_files, and always removed. `only`: just
        these members (of a zip whose other members libarchive read)."""
        limits = self.limits
        if not limits.unar_command or not limits.lsar_command:
            raise ValueError(f"no decoder for {part.real_type} (unar_command is empty)")
        workdir = tempfile.mkdtemp(prefix="milterd-unar-", dir=limits.spill_dir or None)
        try:
            archive = os.path.join(workdir, "archive")
            _copy(source, archive)
            listing = self._run([limits.lsar_command, "-j", "--", archive], workdir, part.path, None)
            entries = _listing(listing)
            if only is not None:
                entries = [entry for entry in entries if entry["name"] in only]
                if not entries:
                    return
            files = [entry for entry in entries if not entry["dir"] and not entry["link"]]
            for entry in files:
                if entry["encrypted"]:
                    path = _join(part.path, entry["name"])
                    self.admit(path, part.depth + 1)
                    self.record(path, entry["name"], "", part.depth + 1, True, entry["size"])
                    self.unchecked.append(f"encrypted: {path}")
            files = [entry for entry in files if not entry["encrypted"]]
            if not files:
                return
            if self.expanded + sum(entry["size"] for entry in files) > self.quota:
                raise _Stop(f"max_expansion_quota {self.quota} bytes exceeded at {part.path}")
            out = os.path.join(workdir, "out")
            os.mkdir(out)
            argv = [limits.unar_command, "-q", "-no-directory", "-force-rename", "-no-recursion", "-forks", "skip"]
            argv += ["-password", "", "-output-directory", out]
            if only is not None:
                argv += ["-indexes", "--", archive, *(str(entry["index"]) for entry in files)]
            else:
                argv += ["--", archive]
            try:
                self._run(argv, workdir, part.path, out)
            except _Stop:
                raise
            except Exception:  # what it extracted before it failed is walked too, then the failure is reported
                self._walk_extracted(part, out)
                raise
            self._walk_extracted(part, out)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, argv: list[str], workdir: str, where: str, out: str | None) -> bytes:
        """`argv` without a shell, in its own process group; killed as a group at the deadline or when `out`
        grows past the quota or max_files. Its stdout (from a file: no pipe to fill), raising on failure."""
        stdout_path, stderr_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=workdir,
                    start_new_session=True,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                )
            except OSError as exc:
                raise ValueError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            while True:
                # Exited but not yet reaped: its process group id cannot have been reused yet.
                if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
                self.tick(where)
                if out is not None:
                    count, size = _usage(out)
                    if self.expanded + size > self.quota:
                        raise _Stop(f"max_expansion_quota {self.quota} bytes exceeded at {where}")
                    if len(self.parts) + count > self.limits.max_files:
                        raise _Stop(f"max_files {self.limits.max_files} exceeded at {where}")
                elif os.path.getsize(stdout_path) > LISTING_MAX:
                    raise ValueError(f"{argv[0]}: listing larger than {LISTING_MAX} bytes")
                time.sleep(UNAR_POLL)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # what it left running, or all of it
            process.wait()
        if process.returncode != 0:
            with open(stderr_path, "rb") as stderr:
                message = _text(stderr.read()[-400:]).replace(workdir + "/", "").strip().splitlines()
            raise ValueError(f"{os.path.basename(argv[0])}: {message[-1] if message else f'exit {process.returncode}'}")
        with open(stdout_path, "rb") as stdout:
            return stdout.read()

    def _walk_extracted(self, parent: Part, out: str) -> None:
        for relative in sorted(_extracted(out)):
            self._extracted(parent, relative, os.path.join(out, relative))

    def _extracted(self, parent: Part, relative: str, file: str) -> None:
        """A file unar extracted: named, typed and opened like any other member."""
        path = _join(parent.path, relative)
        depth = parent.depth + 1
        with self.guard(path, "cannot unpack"):
            self.admit(path, depth)
            with open(file, "rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                self.spend(size, path)
                real = self.identify(stream.read(HEAD))
                part = self.record(path, relative, "", depth, True, size, real)
                if _container(real):
                    stream.seek(0)
                    self.contents(part, stream)

    def _tnef(self, part: Part, data: bytes) -> None:
        """winmail.dat: Outlook's attachments inside the attachment."""
        tnef = tnefparse.TNEF(data, do_checksum=False)
        for n, attachment in enumerate(tnef.attachments, 1):
            name = _text(attachment.long_filename() or attachment.name)
            self._file(_join(part.path, name or f"member{n}"), name, part.depth + 1, attachment.data)

    def _uuencoded(self, part: Part, text: bytes) -> None:
        """`begin 644 name` blocks in a text part, as amavis (MIME-tools) extracts them."""
        begins = list(_UU_BEGIN.finditer(text))
        for n, begin in enumerate(begins, 1):
            stop = begins[n].start() if n < len(begins) else len(text)
            name = _text(begin.group(1).strip())
            data = _uudecode(text[begin.end() : stop])
            self._file(_join(part.path, name or f"member{n}"), name, part.depth + 1, data)

    def _file(self, path: str, name: str, depth: int, data: bytes) -> None:
        """A member whose bytes are already in memory (TNEF, uuencoded)."""
        self.admit(path, depth)
        self.spend(len(data), path)
        part = self.record(path, name, "", depth, True, len(data), self.identify(data))
        self.contents(part, data)


class _Content:
    """One member's bytes as they stream out of libarchive: the head for libmagic, and all of it
    (in a temp file past the head) only when the member is a container to open in turn."""

    def __init__(self, identify: Callable[[bytes], str], spill_dir: str):
        self._identify = identify
        self._spill_dir = spill_dir or None
        self._head = b""
        self.size = 0
        self._type: str | None = None
        self._spill: BinaryIO | None = None

    def add(self, buffer, size: int) -> None:
        self.size += size
        if self._spill is not None:
            self._spill.write(ctypes.string_at(buffer, size))
        elif self._type is None:
            self._head += ctypes.string_at(buffer, size)
            if len(self._head) >= HEAD and _container(self.type()):
                self._spill = tempfile.TemporaryFile(dir=self._spill_dir, prefix="milterd-")
                self._spill.write(self._head)
        # else: typed, not a container: only counted

    def type(self) -> str:
        if self._type is None:
            self._type = self._identify(self._head)
        return self._type

    def source(self) -> bytes | BinaryIO | None:
        """The whole member, when it is a container."""
        if self._spill is not None:
            self._spill.seek(0)
            return self._spill
        return self._head if _container(self.type()) else None

    def __enter__(self) -> _Content:
        return self

    def __exit__(self, *exc) -> None:
        if self._spill is not None:
            self._spill.close()


@contextlib.contextmanager
def _reader(formats: tuple[str, ...] = FORMATS) -> Iterator[int]:
    """A libarchive read handle for `formats` (raw: a compressed stream's content) and our filters."""
    archive = ffi.read_new()
    try:
        for name in FILTERS:
            ffi.get_read_filter_function(name)(archive)
        for name in formats:
            ffi.get_read_format_function(name)(archive)
        yield archive
    finally:
        ffi.read_free(archive)


def _open(archive: int, source: bytes | BinaryIO) -> None:
    if isinstance(source, bytes):
        ffi.read_open_memory(archive, source, len(source))
    else:
        source.flush()
        ffi.read_open_fd(archive, source.fileno(), BLOCK)


def _copy(source: bytes | BinaryIO, target: str) -> None:
    """The container's bytes into a file of our own for unar (a spilled member has no name)."""
    with open(target, "wb") as out:
        if isinstance(source, bytes):
            out.write(source)
        else:
            source.seek(0)
            shutil.copyfileobj(source, out, BLOCK)


def _listing(stdout: bytes) -> list[dict]:
    """lsar -j's entries: index, name, declared size, and what kind of entry."""
    listing = json.loads(stdout)
    entries = []
    for item in listing.get("lsarContents", []) if isinstance(listing, dict) else []:
        if not isinstance(item, dict):
            continue
        size = item.get("XADFileSize", 0)
        entries.append(
            {
                "index": int(item.get("XADIndex", len(entries))),
                "name": _text(item.get("XADFileName")) if isinstance(item.get("XADFileName"), str) else "",
                "size": size if isinstance(size, int) and size > 0 else 0,
                "dir": bool(item.get("XADIsDirectory")),
                "link": bool(item.get("XADIsLink")),
                "encrypted": bool(item.get("XADIsEncrypted")),
            }
        )
    return entries


def _usage(directory: str) -> tuple[int, int]:
    """Files and bytes under `directory`, links not followed."""
    count = size = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(root, name)).st_size
                count += 1
    return count, size


def _extracted(directory: str) -> Iterator[str]:
    """Regular files under `directory` (not symbolic links), as paths relative to it."""
    for root, _dirs, names in os.walk(directory):
        for name in names:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):
                yield os.path.relpath(file, directory)


def _container(real: str) -> bool:
    return (
        real in ARCHIVES
        or real in COMPRESSED
        or real in MAYBE_ARCHIVES
        or real in TNEF
        or real == MAIL
        or real in UNAR
        or real.startswith(ZIP_DOCUMENTS)
    )


def _decoded(node: EmailPart) -> bytes:
    """The body with its transfer encoding undone; an encoded message/rfc822, which the parser split
    into a message of encoded lines anyway, is joined back and decoded (mail clients show it)."""
    if not node.is_multipart():
        payload = node.get_payload()
        if _encoded(node) == "base64" and isinstance(payload, str) and _CLEAN_BASE64.fullmatch(payload):
            if (len(payload) - payload.count("\n") - payload.count("\r")) % 4 == 0:
                # What the email package would return, without its three copies of the payload in between
                return binascii.a2b_base64(payload)
        return node.get_payload(decode=True) or b""
    encoded = b"".join(sub.as_bytes() for sub in node.get_payload()).lstrip(b"\r\n")
    if _encoded(node) == "quoted-printable":
        return quopri.decodestring(encoded)
    return binascii.a2b_base64(encoded)


def _encoded(node: EmailPart) -> str:
    cte = str(node.get("content-transfer-encoding", "")).strip().lower()
    return cte if cte in ("base64", "quoted-printable") else ""


def _uudecode(block: bytes) -> bytes:
    """The lines after `begin` up to the empty line, `end` or the first line that is not uuencoded (a
    truncated mail has no `end`); like uudecode(1), a line with stray characters past its length decodes."""
    out = bytearray()
    for line in block.splitlines():
        line = line.rstrip(b"\r")
        if not line.strip(b" `"):
            break
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            try:
                out += binascii.a2b_uu(line[: (((line[0] - 32) & 63) * 4 + 5) // 3])
            except binascii.Error:
                break
    return bytes(out)


def _filename(node: EmailPart) -> str:
    """Content-Disposition filename or Content-Type name: RFC 2231 (by the email package), then RFC 2047."""
    try:
        headers = [(key, value) for key, value in node.raw_items() if key.lower() in NAME_HEADERS]
        if any(_unescape(value) != value for _, value in headers):
            # Raw UTF-8 in a header: compat32 would hand the name over as U+FFFDs; parse a copy read as UTF-8.
            node = EmailPart(policy=compat32)
            for key, value in headers:
                node[key] = _unescape(value)
        name = str(node.get_filename() or "")
    except Exception:  # a parameter the email package cannot collapse: no usable name
        return ""
    if "=?" not in name:
        return name
    try:
        chunks = decode_header(name)
    except Exception:  # a broken encoded word stays as written
        return name
    try:
        return str(make_header(chunks))
    except (LookupError, UnicodeError):  # unknown charset or bytes that are not in it
        return "".join(_text(chunk, charset) for chunk, charset in chunks)


def _unescape(value: str) -> str:
    """The parser keeps raw 8-bit header bytes as surrogate escapes: read them as UTF-8."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _text(value: str | bytes | None, charset: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return value.decode(charset or "utf-8", "replace")
    except LookupError:
        return value.decode("latin-1")


def _join(prefix: str, segment: str) -> str:
    return f"{prefix}/{segment}" if prefix else segment


def _decompressed_name(name: str) -> str:
    """What gunzip would call the file: the name without its compression suffix, "" if it has none."""
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and suffix.lower() in COMPRESSION_SUFFIXES else ""


def _failure(path: str, failure: str, reason: str) -> str:
    return f"encrypted: {path}" if _encrypted(reason) else f"{path}: {failure}: {reason}"


def _encrypted(reason: str) -> bool:
    """libarchive's words for it: "Passphrase required", "Encrypted file is unsupported", ..."""
    return "encrypt" in reason.lower() or "passphrase" in reason.lower()


def _reason(exc: Exception) -> str:
    """A one-line reason: libarchive's message without its errno/pointer decoration."""
    message = exc.msg if isinstance(exc, ArchiveError) else str(exc)
    message = _text(message) or type(exc).__name__
    return " ".join(message.split())[:200]
