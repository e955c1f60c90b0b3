"""DKIM keys made at run time (no key material in the repository) and messages signed with them."""

from __future__ import annotations

import base64
import functools
import subprocess
from dataclasses import dataclass
from email.utils import formatdate

import dkim
import nacl.encoding
import nacl.signing


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # the signature's a=
    private: bytes  # what dkim.sign() takes
    record: str  # the TXT record at SELECTOR._domainkey.DOMAIN.


def rsa(bits: int = 2048) -> Key:
    """One key per size for the whole run."""
    return _rsa(bits)


@functools.cache
def _rsa(bits: int) -> Key:
    """openssl writes PKCS#1 with -traditional, which dkimpy reads; the record holds the DER public key."""
    private = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], check=True, capture_output=True).stdout
    public = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=private, check=True, capture_output=True
    ).stdout
    return Key(b"rsa-sha256", private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())


@functools.cache
def ed25519() -> Key:
    signing = nacl.signing.SigningKey.generate()
    public = signing.verify_key.encode(nacl.encoding.Base64Encoder).decode()
    return Key(b"ed25519-sha256", signing.encode(nacl.encoding.Base64Encoder), f"v=DKIM1; k=ed25519; p={public}")


def message(body: bytes = b"Hello,\r\n\r\nthe report is attached.\r\n", sender: str = "alice@example.com") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.net\r\nSubject: report\r\n"
        f"Date: {formatdate(localtime=True)}\r\nMessage-ID: <1@example.com>\r\n\r\n"
    ).encode() + body


def sign(
    data: bytes,
    key: Key,
    domain: str,
    selector: str = "sel",
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"),
    length: bool = False,
    algorithm: bytes | None = None,
) -> bytes:
    """`data` with a DKIM-Signature on top, as a signer adds it."""
    header = dkim.DKIM(data).sign(
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=algorithm or key.algorithm,
        canonicalize=canonicalize,
        length=length,
    )
    return header + data
