"""Messages from files for `milterd scan`: a single .eml, an mbox, a Maildir, or a folder of .eml files."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io
import itertools
import mailbox
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HEADER_LIMIT = 256 * 1024  # envelope defaults are read from at most this much of the header


class SourceError(Exception):
    """A path that is not a message, mbox or Maildir."""


@dataclass(frozen=True)
class Item:
    """One message in a source: a display name and a way to open its bytes."""

    name: str
    open: Callable[[], BinaryIO]


def items(path: Path) -> list[Item]:
    """Every message under `path`, in a stable order; an mbox's are read when opened (`iterate` streams)."""
    if path.is_dir() or not path.is_file() or not _is_mbox(path):
        return list(iterate(path))
    box = mailbox.mbox(path, create=False)
    lock = threading.Lock()  # one mbox file object serves every reader

    def reader(key: str) -> BinaryIO:
        with lock:
            return io.BytesIO(box.get_bytes(key))

    return [Item(f"{path}:{n}", lambda key=key: reader(key)) for n, key in enumerate(box.keys(), 1)]


def iterate(path: Path) -> Iterator[Item]:
    """Every message under `path`, in a stable order, an mbox read one message at a time: what is held
    is the message being yielded, whatever the mbox's size. SourceError (raised at once) when `path`
    is neither a file nor a directory."""
    if path.is_dir():
        if (path / "cur").is_dir() or (path / "new").is_dir():
            files = sorted(f for sub in ("new", "cur") if (path / sub).is_dir() for f in (path / sub).iterdir())
        else:
            files = sorted(f for f in path.iterdir() if f.is_file())
        return (_file_item(f) for f in files if f.is_file())
    if not path.is_file():
        raise SourceError(f"{path}: no such file or directory")
    if not _is_mbox(path):
        return iter([_file_item(path)])
    return _mbox_items(path)


def count(path: Path) -> int:
    """How many messages `iterate(path)` yields, without keeping any (one quick read of an mbox)."""
    if path.is_dir() or not path.is_file() or not _is_mbox(path):
        return sum(1 for _ in iterate(path))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b"From "))


def stdin_items(stream: BinaryIO, name: str = "-") -> Iterator[Item]:
    """`-`: one message from standard input, or every message of an mbox piped in (it starts with "From ")."""
    first = stream.readline()
    if first.startswith(b"From "):
        yield from _split_mbox(itertools.chain([first], stream), name)
        return
    data = first + stream.read()
    yield Item(name, lambda: io.BytesIO(data))


def _is_mbox(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(5) == b"From "


def _mbox_items(path: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        yield from _split_mbox(f, str(path))


def _split_mbox(lines: Iterable[bytes], name: str) -> Iterator[Item]:
    """The messages of an mbox, as Python's mailbox.mbox cuts them (same bytes, same numbering): each
    starts after a "From " line and ends before the next one, less the blank line that separates them."""
    n, body, last_was_empty = 0, None, False
    for line in lines:
        if line.startswith(b"From "):
            if body is not None:
                n += 1
                yield _bytes_item(f"{name}:{n}", body, last_was_empty)
            body, last_was_empty = [], False
            continue
        if body is not None:
            body.append(line)
        last_was_empty = line == b"\n"
    if body is not None:
        yield _bytes_item(f"{name}:{n + 1}", body, last_was_empty)


def _bytes_item(name: str, lines: list[bytes], drop_blank: bool) -> Item:
    data = b"".join(lines)
    if drop_blank:
        data = data[:-1]
    return Item(name, lambda: io.BytesIO(data))


def _file_item(path: Path) -> Item:
    return Item(str(path), lambda: open(path, "rb"))


def header_defaults(stream: BinaryIO) -> tuple[str, tuple[str, ...]]:
    """(sender, recipients) from Return-Path/From and To/Cc, for scans given no envelope."""
    head = bytearray()
    for line in iter(stream.readline, b""):
        if line in (b"\n", b"\r\n") or len(head) > HEADER_LIMIT:
            break
        head += line
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(bytes(head))
    sender = ""
    for field in ("Return-Path", "From"):
        found = email.utils.getaddresses([str(v) for v in headers.get_all(field, [])])
        if found and found[0][1]:
            sender = found[0][1]
            break
    rcpts = tuple(
        addr
        for _, addr in email.utils.getaddresses([str(v) for f in ("To", "Cc") for v in headers.get_all(f, [])])
        if "@" in addr
    )
    return sender, rcpts
