"""Reading a file that holds a secret (a DKIM key, a database password): never one others can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(Exception):
    """The file cannot be read, is not a regular file, or everyone may read it; the text says which."""


def read_secret(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of `path`, opened without following a link; group-readable is fine
    (root:milterd 0640), readable by everyone is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(f"{path} is not a regular file")
        if mode & stat.S_IROTH:
            raise SecretFileError(f"{path} is readable by everyone (mode {stat.S_IMODE(mode):04o}): chmod 600 it")
        return f.read(limit)
