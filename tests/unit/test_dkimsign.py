"""DKIM signing: keys (generated, checked), which key signs, the header section that is signed."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest

from milterd.config import load_config
from milterd.dkimsign import Signer, SigningSettings, build_signer, generate_key, load_key, zone_lines
from milterd.edits import edited, header_edits, on_top
from milterd.lookups import Transaction, is_originating
from milterd.message import header_section, split_header_section
from milterd.policy import Category
from milterd.tomlschema import ConfigError

pytestmark = pytest.mark.unit

MILTERD = str(Path(sys.executable).parent / "milterd")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """RSA and Ed25519 keys for example.com, one RSA key for example.org, and their TXT records."""
    directory = tmp_path_factory.mktemp("keys")
    made = {
        ("example.com", "rsa"): generate_key(directory, "example.com", "rsa", "rsa", 2048),
        ("example.com", "ed"): generate_key(directory, "example.com", "ed", "ed25519"),
        ("example.org", "org"): generate_key(directory, "example.org", "org", "rsa", 1024),
    }
    return {
        "loaded": {k: load_key(path, *k) for k, (path, _) in made.items()},
        "records": {f"{s}._domainkey.{d}.".encode(): record.encode() for (d, s), (_, record) in made.items()},
        "paths": {k: path for k, (path, _) in made.items()},
    }


def signer(keys, *which, **options) -> Signer:
    return Signer([keys["loaded"][k] for k in which], **options)


def dnsfunc(keys):
    return lambda name, timeout=5: keys["records"].get(name, b"")


def message(sender="Alice <alice@example.com>", extra=b"", body=b"Hello.\r\n") -> bytes:
    return (
        (
            f"Received: from client (client [192.0.2.1])\r\n\tby mx; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"From: {sender}\r\nTo: bob@example.net\r\nSubject: report\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <1@example.com>\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def signed(data: bytes, signatures) -> bytes:
    headers, body = split_header_section(data)
    return header_section(edited(headers, on_top(signatures))) + b"\r\n" + body


def verify_all(data: bytes, keys) -> list[bool]:
    verifier = dkim.DKIM(data)
    count = sum(name.lower() == b"dkim-signature" for name, _ in verifier.headers)
    return [verifier.verify(idx=i, dnsfunc=dnsfunc(keys)) for i in range(count)]


# --------------------------------------------------------------------------- keys


def test_keygen_writes_a_0600_key_whatever_the_umask_and_never_overwrites(tmp_path):
    old = os.umask(0)
    try:
        path, record = generate_key(tmp_path, "example.com", "s1", "ed25519")
    finally:
        os.umask(old)
    assert path == tmp_path / "example.com.s1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.startswith("v=DKIM1; k=ed25519; p=") and len(base64.b64decode(record.split("p=")[1])) == 32
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(tmp_path, "example.com", "s1", "rsa")
    assert path.read_bytes() == before


def test_keygen_command_prints_the_record_in_255_character_strings_and_the_config_snippet(tmp_path):
    result = subprocess.run(
        [MILTERD, "dkim-keygen", "example.com", "mail", "--dir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    key = tmp_path / "example.com.mail.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    zone = result.stdout.split("mail._domainkey.example.com. IN TXT (")[1].split(" )")[0]
    strings = re.findall(r'"([^"]*)"', zone)
    assert len(strings) == 2 and len(strings[0]) == 255 and "".join(strings).startswith("v=DKIM1; k=rsa; p=MII")
    assert f'[[signing.key]]\ndomain = "example.com"\nselector = "mail"\nkey = "{key}"' in result.stdout
    again = subprocess.run([MILTERD, "dkim-keygen", "example.com", "mail", "--dir", str(tmp_path)], capture_output=True)
    assert again.returncode == 2 and b"not overwritten" in again.stderr


def test_zone_lines_split_a_long_record_and_keep_a_short_one_on_one_line():
    assert zone_lines("d.test", "s", "v=DKIM1; p=abc") == 's._domainkey.d.test. IN TXT ( "v=DKIM1; p=abc" )'
    long = zone_lines("d.test", "s", "x" * 400)
    assert f'"{"x" * 255}"' in long and f'"{"x" * 145}" )' in long


def test_keygen_refuses_bad_names_and_small_rsa_keys(tmp_path):
    with pytest.raises(ValueError):
        generate_key(tmp_path, "../etc", "s", "ed25519")
    with pytest.raises(ValueError):
        generate_key(tmp_path, "example.com", "s", "rsa", 512)
    assert list(tmp_path.iterdir()) == []


def config_with_key(tmp_path: Path, key: Path, extra: str = "") -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    path = tmp_path / "milterd.toml"
    path.write_text(
        f'[signing]\nenabled = true\n{extra}\n[[signing.key]]\ndomain = "example.com"\nselector = "s"\nkey = "{key}"\n'
    )
    return path


def built_signer(path: Path) -> Signer | None:
    """What build_engine does with [signing]: the keys are read (ConfigError for a bad one)."""
    config = load_config(path)
    return build_signer(config.signing, config.path)


def test_a_world_readable_key_is_a_config_error_naming_the_file_and_key(tmp_path, keys):
    key = tmp_path / "k.key"
    key.write_bytes(keys["paths"][("example.com", "rsa")].read_bytes())
    key.chmod(0o644)
    path = config_with_key(tmp_path, key)
    with pytest.raises(ConfigError, match=rf"{path}: signing.key\[0\].key: {key} is readable by everyone"):
        built_signer(path)
    key.chmod(0o640)  # the group may read it (e.g. a milterd group)
    assert built_signer(path).keys[0].algorithm == b"rsa-sha256"


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "cannot read"),
        (b"not a key\n", "is not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "is not a PEM private key"),
    ],
)
def test_an_unreadable_or_invalid_key_is_a_config_error(tmp_path, content, problem):
    key = tmp_path / "k.key"
    if content is not None:
        key.write_bytes(content)
        key.chmod(0o600)
    path = config_with_key(tmp_path, key)
    load_config(path)  # the keys are read when the engine is built, not when the config is loaded
    with pytest.raises(ConfigError, match=rf"signing.key\[0\].key: .*{problem}"):
        built_signer(path)


def test_a_relative_key_path_is_relative_to_the_config_file_and_check_config_reads_it(tmp_path, keys):
    (tmp_path / "k.key").write_bytes(keys["paths"][("example.com", "ed")].read_bytes())
    (tmp_path / "k.key").chmod(0o600)
    path = config_with_key(tmp_path, Path("k.key"))
    assert built_signer(path).keys[0].algorithm == b"ed25519-sha256"
    (tmp_path / "k.key").chmod(0o604)
    result = subprocess.run([MILTERD, "check-config", "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "signing.key[0].key" in result.stderr


@pytest.mark.parametrize(
    "extra, problem, loads",
    [
        ('headers = ["Subject"]', "signing.headers must include From", False),
        # dkimpy's list of fields that must not be signed is read when the signer is built
        ('headers = ["From", "Received"]', "signing.headers: received must not be signed", True),
        ('canonicalization = "loose"', "signing.canonicalization must be one of", False),
        ("key = 1", "signing.key must be an array of tables", False),
        ('key = [{domain = "-x", selector = "s", key = "k"}]', r"signing.key\[0\].domain: '-x' is not a domain", False),
    ],
)
def test_signing_settings_are_checked_even_when_signing_is_off(tmp_path, extra, problem, loads):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text(f"[signing]\n{extra}\n")
    if loads:
        load_config(path)
        with pytest.raises(ConfigError, match=rf"{path}: {problem}"):
            built_signer(path)
    else:
        with pytest.raises(ConfigError, match=rf"{path}: {problem}"):
            load_config(path)


def test_a_key_table_needs_domain_selector_and_key_and_enabled_needs_a_key(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text('[[signing.key]]\ndomain = "example.com"\nkey = "k"\n')
    with pytest.raises(ConfigError, match=r"missing key signing.key\[0\].selector"):
        load_config(path)
    path.write_text("[signing]\nenabled = true\n")
    with pytest.raises(ConfigError, match="no \\[\\[signing.key\\]\\]"):
        load_config(path)
    path.write_text("[signing]\n")
    assert built_signer(path) is None and load_config(path).signing.enabled is False


# --------------------------------------------------------------------------- which mail, which key


@pytest.mark.parametrize(
    "ip, auth, originating",
    [
        ("127.0.0.1", "", True),
        ("::1", "", True),
        ("::ffff:127.0.0.1", "", True),
        ("192.0.2.7", "", False),
        ("192.0.2.7", "alice", True),
        ("", "", False),
        ("garbage", "", False),
    ],
)
def test_originating_is_sasl_authenticated_or_inside_mynetworks(ip, auth, originating):
    loopback = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")]
    assert is_originating(Transaction(client_ip=ip, auth_user=auth), loopback) is originating


def test_mynetworks_replaces_the_default(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text('[milter]\nmynetworks = ["192.0.2.0/24", "2001:db8::/32"]\n')
    networks = [ipaddress.ip_network(n) for n in load_config(path).milter.mynetworks]
    assert is_originating(Transaction(client_ip="192.0.2.7"), networks)
    assert is_originating(Transaction(client_ip="2001:db8::25"), networks)
    assert not is_originating(Transaction(client_ip="127.0.0.1"), networks)
    path.write_text('[milter]\nmynetworks = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError, match=rf"{path}: milter.mynetworks\[0\]: '10.0.0.0/33' is not a network"):
        load_config(path)
    path.write_text('[signing]\nmynetworks = ["10.0.0.0/8"]\n')
    with pytest.raises(ConfigError, match=rf"{path}: signing.mynetworks is now milter.mynetworks"):
        load_config(path)


def test_virus_spam_and_spammy_mail_is_never_signed_as_amavis(keys):
    s, local = signer(keys), True  # originating
    assert s.wants(local, (Category.CLEAN,))
    assert s.wants(local, (Category.UNCHECKED, Category.CLEAN))
    assert not s.wants(local, (Category.SPAMMY, Category.CLEAN))
    assert not s.wants(local, (Category.VIRUS, Category.CLEAN))


def test_the_key_is_chosen_by_the_from_domain(keys):
    s = signer(keys, ("example.com", "rsa"), ("example.org", "org"))
    [(name, value)] = s.sign(message("Carol <carol@Example.ORG>"))
    assert name == "DKIM-Signature" and "d=example.org;" in value and "s=org;" in value
    assert s.sign(message("dave@sub.example.com")) == []  # exact domain only
    assert s.sign(message("undisclosed-recipients:;")) == []
    assert verify_all(signed(message("Carol <carol@example.org>"), s.sign(message("Carol <carol@example.org>"))), keys)


def test_an_rsa_and_an_ed25519_key_give_two_signatures_that_both_verify(keys):
    s = signer(keys, ("example.com", "rsa"), ("example.com", "ed"))
    data = message()
    signatures = s.sign(data)
    assert [v.split("a=")[1].split(";")[0] for _, v in signatures] == ["rsa-sha256", "ed25519-sha256"]
    assert all("\n" not in v and "\r" not in v for _, v in signatures)  # unfolded: edits.fold folds them
    assert verify_all(signed(data, signatures), keys) == [True, True]


def test_signed_fields_are_amavis_with_from_date_subject_content_type_oversigned(keys):
    data = message(extra=b"Content-Type: text/plain\r\nX-Mailer: mutt\r\nSender: list@example.com\r\n")
    [(_, value)] = signer(keys, ("example.com", "ed")).sign(data)
    signed_fields = value.split("h=")[1].split(";")[0].replace(" ", "").split(":")
    assert sorted(signed_fields) == sorted(
        ["from", "from", "subject", "subject", "date", "date", "content-type", "content-type", "message-id", "x-mailer"]
    )
    assert "c=relaxed/simple;" in value


def test_a_domain_with_a_valid_signature_already_is_not_signed_again(keys):
    s = signer(keys, ("example.com", "ed"))
    assert s.sign(message(), skip_domains=["Example.com"]) == []


def test_larger_than_max_size_is_not_signed(keys):
    assert signer(keys, ("example.com", "ed"), max_size=100).sign(message()) == []


# --------------------------------------------------------------------------- the header section as it leaves


INCOMING = [
    ("Received", "from client\n\tby mx"),
    ("X-Spam-Flag", "YES"),
    ("From", "alice@example.com"),
    ("Authentication-Results", "mx.example.com; dkim=pass"),
    ("Authentication-Results", "relay.test; spf=pass"),
    ("Subject", "report"),
    ("X-Spam-Status", "No, forged"),
]


def final(headers, added=(), tag="", authserv_id="other.example"):
    """The header section after header_edits; Authentication-Results of `authserv_id` are forged."""
    return edited(headers, header_edits(headers, added, tag, authserv_id))


def test_final_headers_drop_forged_ones_insert_ours_on_top_in_order_and_tag_the_subject():
    ours = (("Authentication-Results", "mx.example.com; dkim=none"), ("X-Virus-Scanned", "milterd at mx"))
    assert final(INCOMING, ours, "***SPAM*** ", authserv_id="mx.example.com") == [
        ("Authentication-Results", "mx.example.com; dkim=none"),
        ("X-Virus-Scanned", "milterd at mx"),
        ("Received", "from client\n\tby mx"),
        ("From", "alice@example.com"),
        ("Authentication-Results", "relay.test; spf=pass"),
        ("Subject", "***SPAM*** report"),
    ]


def test_final_headers_add_a_subject_when_there_is_none_and_do_not_tag_twice():
    no_subject = [h for h in INCOMING if h[0] != "Subject"]
    assert final(no_subject, tag="***UNCHECKED*** ")[-1] == ("Subject", "***UNCHECKED***")
    tagged = [("Subject", "***SPAM*** report") if n == "Subject" else (n, v) for n, v in INCOMING]
    assert ("Subject", "***SPAM*** report") in final(tagged, tag="***SPAM*** ")


def test_final_headers_fold_long_values_as_the_milter_sends_them():
    status = ("X-Spam-Status", "No, score=0.1 tagged_above=-999 required=4 tests=[" + "A=0.1, " * 20 + "B=0]")
    top = final([("From", "a@example.com")], (status,))[0]
    assert top[0] == "X-Spam-Status" and "\n\t" in top[1] and top[1].replace("\n\t", " ") == status[1]


def test_final_headers_keep_a_non_utf8_subject_untagged_rather_than_lose_the_edit():
    raw = "caf\udce9"  # a raw latin-1 byte, as the milter decodes it (surrogateescape)
    assert ("Subject", raw) in final([("Subject", raw)], tag="***SPAM*** ")


def test_a_signature_over_the_final_headers_verifies_after_the_edits_are_made(keys):
    """What milter.py does at end of message: sign the edited header section, put the signatures on top."""
    data = message(extra=b"X-Spam-Flag: YES\r\n", body=b"Hello.\r\n\r\n\r\n")
    headers, body = split_header_section(data)
    ours = (("X-Spam-Flag", "NO"), ("X-Spam-Status", "No, score=0 tagged_above=-999 " + "x " * 60))
    edits = header_edits(headers, ours, "***UNCHECKED*** ", "mx.example.com")
    outgoing = header_section(edited(headers, edits)) + b"\r\n" + body
    signatures = signer(keys, ("example.com", "rsa"), ("example.com", "ed")).sign(outgoing)
    delivered_headers = edited(headers, edits + on_top(signatures))
    assert [n for n, _ in delivered_headers[:2]] == ["DKIM-Signature", "DKIM-Signature"]
    assert any("\n\t" in v for _, v in delivered_headers[:2])  # folded as other long headers
    delivered = header_section(delivered_headers) + b"\r\n" + body
    assert b"Subject: ***UNCHECKED*** report\r\n" in delivered
    assert verify_all(delivered, keys) == [True, True]
    assert verify_all(delivered.replace(b"***UNCHECKED*** report", b"report"), keys) == [False, False]


def test_split_header_section_reads_back_what_the_milter_spooled():
    spooled = b"Received: from a\r\n\tby b\r\nSubject: x\r\nX-Empty: \r\n\r\nbody\r\n"
    headers, body = split_header_section(spooled)
    assert headers == [("Received", "from a\n\tby b"), ("Subject", "x"), ("X-Empty", "")]
    assert body == b"body\r\n"
    assert header_section(headers) + b"\r\n" + body == spooled
    assert split_header_section(b"\r\nonly body") == ([], b"only body")


def test_the_example_config_shows_the_signing_defaults():
    shipped = load_config(Path(__file__).resolve().parents[2] / "systemd" / "milterd.toml")
    assert shipped.signing == SigningSettings() and build_signer(shipped.signing, shipped.path) is None


def test_scan_json_shows_the_signatures_originating_mail_would_get_and_they_verify(tmp_path, keys):
    """scan carries out the same Disposition as the milter: the signatures are over the message as
    it would leave, our header edits made."""
    key = tmp_path / "k.key"
    key.write_bytes(keys["paths"][("example.com", "rsa")].read_bytes())
    key.chmod(0o600)
    path = config_with_key(tmp_path, key)
    off = "".join(f"[{name}]\nenabled = false\n" for name in ("clamav", "spamd", "dkim", "spf", "dmarc"))
    path.write_text(path.read_text() + off)
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@example.com\r\nTo: b@remote.test\r\nSubject: hi\r\n\r\nbody\r\n")
    milterd = Path(sys.executable).parent / "milterd"
    args = [str(milterd), "scan", "--json", "--config", str(path), "--client-ip", "127.0.0.1", str(eml)]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    ((name, value),) = record["signatures"]
    assert name == "DKIM-Signature" and "d=example.com" in value and "s=s" in value
    incoming = [("From", "a@example.com"), ("To", "b@remote.test"), ("Subject", "hi")]
    delivered = header_section([(name, value), *map(tuple, record["headers"]), *incoming]) + b"\r\nbody\r\n"
    key_record = keys["records"][b"rsa._domainkey.example.com."]  # the key, published under selector s
    assert dkim.verify(
        delivered, dnsfunc=lambda name, timeout=5: key_record if name == b"s._domainkey.example.com." else b""
    )
