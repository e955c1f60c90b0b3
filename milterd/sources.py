"""Messages from files for `milterd scan`: a single .eml, an mbox, a Maildir, or a folder of .eml files."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io
import mailbox
import threading
from collections.abc import Callable
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
    """Every message under `path`, in a stable order."""
    if path.is_dir():
        if (path / "cur").is_dir() or (path / "new").is_dir():
            files = sorted(f for sub in ("new", "cur") if (path / sub).is_dir() for f in (path / sub).iterdir())
        else:
            files = sorted(f for f in path.iterdir() if f.is_file())
        return [_file_item(f) for f in files if f.is_file()]
    if not path.is_file():
        raise SourceError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        is_mbox = f.read(5) == b"From "
    if not is_mbox:
        return [_file_item(path)]
    box = mailbox.mbox(path, create=False)
    lock = threading.Lock()  # one mbox file object serves every scanning thread

    def reader(key: str) -> BinaryIO:
        with lock:
            return io.BytesIO(box.get_bytes(key))

    return [Item(f"{path}:{n}", lambda key=key: reader(key)) for n, key in enumerate(box.keys(), 1)]


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
