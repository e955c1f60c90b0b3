"""DKIM signing of originating mail: the [signing] section, its keys, the Signer, and key generation.

amavis' signing, with its defaults (`$enable_dkim_signing`, `dkim_key()`, `%signed_header_fields`):
- only originating mail is signed: SASL-authenticated, or from a client in `[milter] mynetworks`; and
  never mail that is VIRUS, SPAM or SPAMMY;
- the key is chosen by the domain of the RFC5322.From address (exact match); a domain may have
  an RSA and an Ed25519 key, and the message then gets both signatures (RFC 8463);
- c=relaxed/simple; the signed fields are amavis' list, each instance present in the message,
  and From, Date, Subject and Content-Type signed once more than present ("oversigned"), so
  nobody can add another one without breaking the signature;
- a domain that already has a valid signature on the message is not signed again.

Keys are read once, when the engine is built (as root, before the daemon drops it; check-config
builds it too): a key file that others can read, that cannot be read, or that is not a usable key
is a config error. Loading the config only checks [signing]'s values: dkimpy and cryptography are
imported where keys are read and mail is signed.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .secretfile import SecretFileError, read_secret
from .tomlschema import POSITIVE, ConfigError

log = logging.getLogger("milterd")

# amavis' %signed_header_fields (Amavis/Conf.pm): RFC 6376's list and RFC 4021 additions, less
# Sender, To, Cc, Resent-To and Resent-Cc (mailing lists and mailers mangle them). amavis also signs
# Received (but never the top one in milter mode); RFC 6376 5.4 advises against it and dkimpy
# refuses it, so it is left out.
SIGNED_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "Message-ID", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID", "Content-Description",
    "Resent-Date", "Resent-From", "Resent-Sender", "Resent-Message-ID",
    "List-Id", "List-Post", "List-Owner", "List-Subscribe", "List-Unsubscribe", "List-Help", "List-Archive",
    "Precedence", "Original-Message-ID", "Message-Context", "PICS-Label", "Sensitivity", "Solicitation",
    "Content-Location", "Content-Features", "Content-Disposition", "Content-Language", "Content-Alternative",
    "Content-Base", "Content-MD5", "Content-Duration", "Content-Class", "Accept-Language", "Auto-Submitted",
    "Archived-At", "VBR-Info", "Organization", "Organisation", "User-Agent", "X-Mailer",
)  # fmt: skip
# amavis' value 2 in %signed_header_fields: one more instance signed than present
OVERSIGNED_HEADERS = ("From", "Date", "Subject", "Content-Type")
MIN_RSA_BITS = 1024  # amavis' $dkim_minimum_key_bits
NOT_SIGNED = ("VIRUS", "SPAM", "SPAMMY")  # amavis never signs these categories

Canonicalization = typing.Literal["relaxed/simple", "relaxed/relaxed", "simple/simple", "simple/relaxed"]


@dataclass(frozen=True)
class SigningKey:
    """One `[[signing.key]]`: sign mail From `domain` with the PEM private key at `key` under `selector`."""

    domain: str
    selector: str
    key: str  # path to a PEM private key (RSA or Ed25519), relative to the config file


@dataclass(frozen=True)
class SigningSettings:
    enabled: bool = False  # originating mail: SASL-authenticated, or from [milter] mynetworks
    headers: tuple[str, ...] = SIGNED_HEADERS
    oversign: tuple[str, ...] = OVERSIGNED_HEADERS
    canonicalization: Canonicalization = "relaxed/simple"
    max_size: int = field(default=25 * 1024 * 1024, metadata=POSITIVE)  # dkimpy holds the message in memory
    key: tuple[SigningKey, ...] = ()


@dataclass(frozen=True)
class Key:
    domain: str  # lower case
    selector: str
    algorithm: bytes  # a=: b"rsa-sha256" or b"ed25519-sha256"
    private: bytes = field(repr=False)  # what dkim.sign() takes: PKCS#1 PEM, or the base64 Ed25519 seed
    bits: int = 0  # RSA modulus size


class Signer:
    """Signs originating mail with the keys of its From domain; `build_signer` makes it from [signing]."""

    def __init__(
        self,
        keys: Sequence[Key],
        headers: Iterable[str] = SIGNED_HEADERS,
        oversign: Iterable[str] = OVERSIGNED_HEADERS,
        canonicalization: str = "relaxed/simple",
        max_size: int = 25 * 1024 * 1024,
    ):
        self.keys = tuple(keys)
        self.headers = frozenset(h.lower().encode() for h in headers)
        self.oversign = frozenset(h.lower().encode() for h in oversign)
        header_c, _, body_c = canonicalization.partition("/")
        self.canonicalize = (header_c.encode(), body_c.encode())
        self.max_size = max_size

    def wants(self, originating: bool, categories: Iterable[object]) -> bool:
        """Sign this message? Originating (lookups.is_originating), and not VIRUS, SPAM or SPAMMY (amavis)."""
        return originating and not any(getattr(c, "name", c) in NOT_SIGNED for c in categories)

    def sign(self, message: bytes, skip_domains: Iterable[str] = ()) -> list[tuple[str, str]]:
        """The DKIM-Signature headers (name, unfolded value) for `message` as it will be delivered.

        One per key of the From domain, in config order; none when the From domain has no key,
        when the message is larger than max_size, or for a domain in `skip_domains` (it already
        has a valid signature on the message).
        """
        import dkim

        if len(message) > self.max_size:
            log.info("not DKIM-signed: %d bytes is larger than signing.max_size", len(message))
            return []
        try:
            signer = dkim.DKIM(message, logger=_SILENT, linesep=b"\r\n")
        except (dkim.DKIMException, IndexError) as e:  # a header line dkimpy cannot split
            log.warning("not DKIM-signed: header section not parsed: %s", e)
            return []
        domain = from_domain(signer.headers)
        keys = [k for k in self.keys if k.domain == domain]
        if not keys:
            log.debug("not DKIM-signed: no key for the From domain %r", domain)
            return []
        if domain in {d.lower() for d in skip_domains}:
            log.debug("not DKIM-signed: %s already has a valid signature", domain)
            return []
        include = self._include(signer.headers)
        result = []
        for key in keys:
            header = signer.sign(
                key.selector.encode(),
                key.domain.encode(),
                key.private,
                signature_algorithm=key.algorithm,
                canonicalize=self.canonicalize,
                include_headers=include,
            )
            name, _, value = header.decode("ascii").partition(":")
            result.append((name, value.replace("\r\n", "").strip()))
        return result

    def _include(self, headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """amavis' h= list: every signed field present, bottom-up, oversigned ones once more."""
        names = [name.lower() for name, _ in headers]
        include = []
        for i, name in enumerate(names):
            if name in self.headers:
                include.append(name)
                if name in self.oversign and name not in names[i + 1 :]:
                    include.append(name)
        return include[::-1]


def check_signing(settings: SigningSettings, path: Path) -> None:
    """Check [signing]'s values without reading the keys; ConfigError names `path` and the key."""
    if "from" not in {h.lower() for h in settings.headers}:
        raise ConfigError(f"{path}: signing.headers must include From (RFC 6376 5.4)")
    if settings.enabled and not settings.key:
        raise ConfigError(f"{path}: signing.enabled is true but there is no [[signing.key]]")
    for i, entry in enumerate(settings.key):
        for name in ("domain", "selector"):
            if not _LABELS.fullmatch(getattr(entry, name)):
                raise ConfigError(f"{path}: signing.key[{i}].{name}: {getattr(entry, name)!r} is not a domain name")


def build_signer(settings: SigningSettings, path: Path) -> Signer | None:
    """Read every key (enabled or not, so check-config finds a bad one before it is used); the
    Signer when enabled. ConfigError names `path` (the config file) and the key."""
    import dkim

    check_signing(settings, path)
    refused = sorted({h.lower() for h in settings.headers} & {h.decode() for h in dkim.DKIM.SHOULD_NOT})
    if refused:
        raise ConfigError(f"{path}: signing.headers: {refused[0]} must not be signed (RFC 6376 5.4)")
    keys = []
    for i, entry in enumerate(settings.key):
        try:
            keys.append(load_key(path.parent / entry.key, entry.domain, entry.selector))  # an absolute key stays
        except KeyFileError as e:
            raise ConfigError(f"{path}: signing.key[{i}].key: {e}") from None
    if not settings.enabled:
        return None
    return Signer(keys, settings.headers, settings.oversign, settings.canonicalization, settings.max_size)


_SILENT = logging.Logger("dkimpy-sign")
_SILENT.setLevel(logging.CRITICAL + 1)
_LABELS = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The domain of the first address in the first From header, lower case; "" when there is none."""
    value = next((v for n, v in headers if n.lower() == b"from"), None)
    if value is None:
        return ""
    text = value.decode("utf-8", "replace").replace("\r\n", "")
    addresses = [addr for _, addr in email.utils.getaddresses([text]) if "@" in addr]
    return addresses[0].rpartition("@")[2].strip().rstrip(".").lower() if addresses else ""


class KeyFileError(Exception):
    """A key file that must not or cannot be used; the message says which file and why."""


def load_key(path: Path, domain: str, selector: str) -> Key:
    """Read a PEM private key (RSA or Ed25519); refused when others can read it, or it is not a usable key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        data = read_secret(path, 1 << 16)
    except SecretFileError as e:
        raise KeyFileError(str(e)) from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path} is encrypted: milterd needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM private key: {str(e).splitlines()[0]}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{path}: a {private.key_size}-bit RSA key is too small (at least {MIN_RSA_BITS})")
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        return Key(domain.lower(), selector, b"rsa-sha256", pem, private.key_size)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        seed = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return Key(domain.lower(), selector, b"ed25519-sha256", base64.b64encode(seed))
    raise KeyFileError(f"{path}: {type(private).__name__.removeprefix('_')} keys cannot sign DKIM (RSA or Ed25519)")


# --------------------------------------------------------------------------- key generation


def generate_key(directory: Path, domain: str, selector: str, kind: str = "rsa", bits: int = 2048) -> tuple[Path, str]:
    """Write DIRECTORY/DOMAIN.SELECTOR.key (mode 0600 from its creation; never overwritten) and
    return its path and the TXT record to publish at SELECTOR._domainkey.DOMAIN.

    FileExistsError when the file exists; ValueError for a bad name or size.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    for what, name in (("domain", domain), ("selector", selector)):
        if not _LABELS.fullmatch(name):
            raise ValueError(f"{what} {name!r} is not a domain name")
    if kind == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"an RSA key needs at least {MIN_RSA_BITS} bits")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"key type {kind!r} is not rsa or ed25519")
    path = Path(directory) / f"{domain}.{selector}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path, f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode()}"


def zone_lines(domain: str, selector: str, record: str, width: int = 255) -> str:
    """The record as a zone file entry, its text split into character-strings of at most `width`."""
    strings = [record[i : i + width] for i in range(0, len(record), width)]
    if len(strings) == 1:
        return f'{selector}._domainkey.{domain}. IN TXT ( "{strings[0]}" )'
    body = "\n".join(f'    "{s}"' for s in strings)
    return f"{selector}._domainkey.{domain}. IN TXT (\n{body} )"
