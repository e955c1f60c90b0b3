"""The MIME walker: every leaf and archive member found, named and typed; every limit reported, never raised."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import tarfile
import time
import tracemalloc
import zipfile
from email.message import EmailMessage
from pathlib import Path

import libarchive
import pytest

from milterd.checks.banned import BannedSettings as Limits
from milterd.message import Envelope, Message, Spool
from milterd.mime import Walker

pytestmark = pytest.mark.unit

TESTFILES = Path("/usr/share/clamav-testfiles")
CLAM_EXE = (TESTFILES / "clam.exe").read_bytes()
EXECUTABLE_TYPES = ("application/vnd.microsoft.portable-executable", "application/x-dosexec")


def message(raw: bytes) -> Message:
    spool = Spool()
    spool.write(raw)
    return Message(Envelope(), spool)


def mail(*attachments: tuple[str, bytes] | EmailMessage, text: str = "Hello.\n") -> EmailMessage:
    """A multipart/mixed mail with a text body and `attachments` (name, bytes) or attached messages."""
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "a@example.com", "b@example.org", "files"
    mail.set_content(text)
    for attachment in attachments:
        if isinstance(attachment, EmailMessage):
            mail.add_attachment(attachment, filename="fwd.eml")
        else:
            name, data = attachment
            mail.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return mail


DEFAULTS = Limits()


@functools.cache
def walker(limits: Limits) -> Walker:
    return Walker(limits)


def inspect(msg, limits: Limits = DEFAULTS):
    return walker(limits).inspect(msg)


def scan(raw: bytes | EmailMessage, limits: Limits = DEFAULTS):
    return inspect(message(raw if isinstance(raw, bytes) else raw.as_bytes()), limits)


def by_path(inspection) -> dict:
    return {part.path: part for part in inspection.parts}


def is_executable(part) -> bool:
    return part.real_type in EXECUTABLE_TYPES


def zip_of(members: dict[str, bytes], **kwargs) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, **kwargs) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def libarchive_of(members: dict[str, bytes], fmt: str, filter_name: str | None = None, **kwargs) -> bytes:
    out = bytearray()

    def write(data: bytes) -> int:
        out.extend(data)
        return len(data)

    with libarchive.custom_writer(write, fmt, filter_name=filter_name, **kwargs) as archive:
        for name, data in members.items():
            archive.add_file_from_memory(name, len(data), data)
    return bytes(out)


# ClamAV's test files: each one either gives up its executable or says why not

INSIDE = "an executable member"
ITSELF = "the attachment is the executable"
OPAQUE = "typed, not opened: not an archive amavis' Debian decoders open; clamd parses it itself"
UNCHECKED = "a reason in unchecked"
CLAMAV = {
    **{name: INSIDE for name in ("clam.7z", "clam.cab", "clam.tar.gz", "clam.zip", "clam.bz2.zip", "clam.exe.bz2")},
    **{name: INSIDE for name in ("clam.bin-be.cpio", "clam.bin-le.cpio", "clam.newc.cpio", "clam.odc.cpio")},
    "clam.tnef": INSIDE,
    "clam_IScab_ext.exe": INSIDE,  # InstallShield: a cab after the PE, which libarchive finds
    "clam_IScab_int.exe": INSIDE,
    "clam_cache_emax.tgz": INSIDE,  # nine nested tgz
    "clam.exe.mbox.uu": INSIDE,  # a uuencoded block in a text attachment
    **{path.name: ITSELF for path in TESTFILES.glob("clam*.exe") if "IScab" not in path.name},
    "clam.arj": INSIDE,  # libarchive has no ARJ reader: unar reads it
    "clam.d64.zip": INSIDE,  # nor deflate64: unar extracts that member
    "clam.exe.binhex": INSIDE,  # and Python 3.11 has no BinHex decoder: unar
    "clam.impl.zip": UNCHECKED,  # PKWARE implode: unar 1.10.1 fails on it ("read more data than was available")
    **{name: OPAQUE for name in ("clam.chm", "clam.ole.doc", "clam.ppt", "clam.pdf", "clam.sis", "clam.exe.szdd")},
    **{name: OPAQUE for name in ("clam.exe.html", "clam.exe.rtf", "clam.exe.mbox.base64", "clam.mail")},
}


def test_every_clamav_test_file_is_classified():
    assert set(CLAMAV) == {path.name for path in TESTFILES.iterdir()}


@pytest.mark.parametrize("name", sorted(CLAMAV))
def test_clamav_test_files(name):
    result = scan(mail((name, (TESTFILES / name).read_bytes())))
    parts = by_path(result)
    inner = [part for path, part in parts.items() if path.startswith(name + "/")]
    expected = CLAMAV[name]
    if expected == INSIDE:
        assert any(is_executable(part) and part.in_archive for part in inner), parts
        assert result.unchecked == ()
    elif expected == ITSELF:
        assert is_executable(parts[name]) and result.unchecked == ()
    elif expected == UNCHECKED:
        assert [reason for reason in result.unchecked if name in reason], result
    else:
        assert name in parts and result.unchecked == ()


@pytest.mark.parametrize("name", ["clam.mail", "clam.exe.mbox.base64", "clam.exe.mbox.uu"])
def test_clamav_test_mails(name):
    """The mail-shaped test files as whole messages: base64, x-uuencode, and an mbox From_ line."""
    result = scan((TESTFILES / name).read_bytes())
    exe = by_path(result)["clam.exe"]
    # the .uu file ends in a truncated "end", which the email package decodes as five more bytes
    assert is_executable(exe) and len(CLAM_EXE) <= exe.size <= len(CLAM_EXE) + 5 and not exe.in_archive
    assert result.unchecked == ()


def test_an_attached_mail_is_one_level_down():
    result = scan(mail(("clam.mail", (TESTFILES / "clam.mail").read_bytes())))
    exe = by_path(result)["clam.mail/clam.exe"]
    assert is_executable(exe) and exe.depth == 2


# nesting and paths


def test_zip_in_tar_gz_in_attached_message():
    inner_zip = zip_of({"docs/invoice.pdf.exe": CLAM_EXE, "docs/readme.txt": b"hello\n"})
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo("inner.zip")
        info.size = len(inner_zip)
        tar.addfile(info, io.BytesIO(inner_zip))
    forwarded = mail(("bundle.tar.gz", tgz.getvalue()))
    result = scan(mail(forwarded))
    parts = by_path(result)
    exe = parts["fwd.eml/bundle.tar.gz/inner.zip/docs/invoice.pdf.exe"]
    assert exe.name == "docs/invoice.pdf.exe" and exe.declared_type == "" and exe.in_archive
    assert is_executable(exe) and exe.depth == 4 and exe.size == len(CLAM_EXE)
    tar = parts["fwd.eml/bundle.tar.gz"]
    assert (tar.declared_type, tar.real_type, tar.in_archive, tar.depth) == (
        "application/octet-stream",
        "application/gzip",
        False,
        2,
    )
    assert parts["fwd.eml/bundle.tar.gz/inner.zip"].real_type == "application/zip"
    assert parts["part1"].declared_type == "text/plain" and parts["fwd.eml/part1"].depth == 2
    assert result.unchecked == () and result.mime_defects == ()


@pytest.mark.parametrize(
    ("fmt", "filter_name", "real_type"),
    [
        ("7zip", None, "application/x-7z-compressed"),
        ("cpio", None, "application/x-cpio"),
        ("iso9660", None, "application/x-iso9660-image"),
        ("gnutar", "xz", "application/x-xz"),
        ("ustar", "zstd", "application/zstd"),
        ("ustar", "bzip2", "application/x-bzip2"),
        ("ustar", "lzma", "application/x-lzma"),
        ("xar", None, "application/x-xar"),
        ("ar_bsd", None, "application/x-archive"),
    ],
)
def test_libarchive_formats(fmt, filter_name, real_type):
    data = libarchive_of({"a/evil.exe": CLAM_EXE}, fmt, filter_name)
    result = scan(mail(("files.bin", data)))
    parts = by_path(result)
    assert parts["files.bin"].real_type == real_type
    member = next(part for path, part in parts.items() if path.startswith("files.bin/") and path.endswith("evil.exe"))
    assert is_executable(member) and result.unchecked == ()


def test_office_documents_are_unpacked():
    docx = zip_of(
        {
            "[Content_Types].xml": b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
            b'content-types"></Types>',
            "_rels/.rels": b"<x/>",
            "word/document.xml": b"<x/>",
            "word/embeddings/oleObject1.bin": CLAM_EXE,
        }
    )
    parts = by_path(scan(mail(("report.docx", docx))))
    assert parts["report.docx"].real_type.startswith("application/vnd.openxmlformats-officedocument.")
    assert is_executable(parts["report.docx/word/embeddings/oleObject1.bin"])


def test_zip_behind_a_prefix_is_found_although_libmagic_says_data():
    result = scan(mail(("setup.bin", bytes(1000) + zip_of({"evil.exe": CLAM_EXE}))))
    parts = by_path(result)
    assert parts["setup.bin"].real_type == "application/octet-stream"
    assert is_executable(parts["setup.bin/evil.exe"]) and result.unchecked == ()


def test_bad_crc_is_unchecked():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.txt", b"hello world\n" * 10)
    data = buffer.getvalue().replace(b"hello", b"jello", 1)
    result = scan(mail(("crc.zip", data)))
    assert result.unchecked[0].startswith("crc.zip/a.txt: cannot unpack: ZIP bad CRC")
    assert by_path(result)["crc.zip/a.txt"].real_type == ""


def test_gzip_of_a_single_file_is_named_as_gunzip_would():
    result = scan(mail(("tool.exe.gz", libarchive_of({"x": CLAM_EXE}, "raw", "gzip"))))
    assert is_executable(by_path(result)["tool.exe.gz/tool.exe"])


def test_uuencoded_blocks_in_a_text_part():
    lines = [binascii.b2a_uu(CLAM_EXE[i : i + 45]).decode() for i in range(0, len(CLAM_EXE), 45)]
    text = "See attached.\n\nbegin 644 clam.exe\n" + "".join(lines) + "`\nend\nBye.\n"
    result = scan(mail(text=text))
    exe = by_path(result)["part1/clam.exe"]
    assert is_executable(exe) and exe.size == len(CLAM_EXE) and exe.in_archive and exe.depth == 2


def test_tnef_by_declared_type_and_name():
    raw = mail(("winmail.dat", (TESTFILES / "clam.tnef").read_bytes())).as_bytes()
    raw = raw.replace(b"application/octet-stream", b"application/ms-tnef")
    result = scan(raw)
    assert is_executable(by_path(result)["winmail.dat/clam.exe"])


def test_base64_encoded_attached_message_is_decoded():
    """RFC 2046 forbids it, mail clients decode it anyway: so must the walk."""
    inner = (TESTFILES / "clam.mail").read_bytes()
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(inner)
        + b"\r\n--B--\r\n"
    )
    result = scan(raw)
    assert is_executable(by_path(result)["part2/clam.exe"])


# limits


def test_encrypted_zip_is_unchecked():
    data = libarchive_of({"a/evil.exe": CLAM_EXE}, "zip", options="encryption=zipcrypt", passphrase="secret")
    result = scan(mail(("secret.zip", data)))
    assert "encrypted: secret.zip/a/evil.exe" in result.unchecked
    member = by_path(result)["secret.zip/a/evil.exe"]
    assert member.real_type == "" and member.name == "a/evil.exe"


def test_zip_bomb_stops_at_the_quota_quickly_and_in_bounded_memory():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("zeros.bin", "w") as member:
        for _ in range(50):
            member.write(bytes(1 << 20))
    raw = mail(("bomb.zip", buffer.getvalue())).as_bytes()
    tracemalloc.start()
    started = time.monotonic()
    result = inspect(message(raw))
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    quota = 500 * len(raw)
    assert quota < 50 << 20
    assert result.unchecked == (f"max_expansion_quota {quota} bytes exceeded at bomb.zip/zeros.bin",)
    assert elapsed < 2 and peak < 4 << 20, (elapsed, peak)
    assert "bomb.zip" in by_path(result)


def test_quota_follows_amavis_formula():
    result = scan(mail(("a.zip", zip_of({"a.txt": b"a" * 200_000}))), Limits(max_expansion_factor=1))
    assert result.unchecked[0].startswith("max_expansion_quota 102400 bytes exceeded")


def test_hundred_nested_multiparts():
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(100):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level, level + 1)
    raw += b"--b100\r\nContent-Type: text/plain\r\n\r\ndeep\r\n"
    for level in range(100, -1, -1):
        raw += b"--b%d--\r\n" % level
    result = scan(raw)
    assert [part.path for part in result.parts] == ["part" + ".".join(["1"] * 101)]
    assert result.unchecked == ()


def test_nesting_deeper_than_the_email_package_goes_is_unchecked():
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(3000):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level, level + 1)
    result = scan(raw)
    assert result.unchecked == ("message: cannot parse: MIME nesting too deep",)


def test_twenty_nested_zips_exceed_max_levels():
    data = CLAM_EXE
    for level in range(20, 0, -1):
        data = zip_of({f"level{level}.zip" if level < 20 else "evil.exe": data})
    result = scan(mail(("level0.zip", data)))
    depths = [part.depth for part in result.parts]
    assert max(depths) == 14
    deepest = max(result.parts, key=lambda part: part.depth)
    assert deepest.path == "level0.zip/" + "/".join(f"level{n}.zip" for n in range(1, 14))
    assert result.unchecked == (f"max_levels 14 exceeded at {deepest.path}/level14.zip",)


def test_more_members_than_max_files():
    data = zip_of({f"f{n}.txt": b"x" for n in range(50)})
    result = scan(mail(("many.zip", data)), Limits(max_files=10))
    assert len(result.parts) == 10
    assert result.unchecked == ("max_files 10 exceeded at many.zip/f8.txt",)


def test_timeout_returns_what_it_has():
    result = scan(mail(("a.zip", zip_of({"a": b"a"}))), Limits(timeout=0))
    assert result.unchecked == ("timeout 0 s exceeded at message",)
    assert result.parts == ()


def test_limit_reasons_do_not_stop_sibling_branches_for_depth():
    deep = zip_of({"b.zip": zip_of({"c.exe": CLAM_EXE})})
    result = scan(mail(("deep.zip", deep), ("other.exe", CLAM_EXE)), Limits(max_levels=2))
    assert result.unchecked == ("max_levels 2 exceeded at deep.zip/b.zip/c.exe",)
    assert "other.exe" in by_path(result)


# MIME framing


def test_missing_start_and_close_boundaries_are_defects():
    raw = b"Content-Type: multipart/mixed; boundary=nowhere\r\n\r\nno parts here\r\n"
    result = scan(raw)
    assert "part1: StartBoundaryNotFoundDefect" in result.mime_defects  # the parser made it a leaf
    assert result.unchecked == () and [part.declared_type for part in result.parts] == ["multipart/mixed"]

    raw = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\ntruncated"
    result = scan(raw)
    assert "message: CloseBoundaryNotFoundDefect" in result.mime_defects
    assert [part.path for part in result.parts] == ["part1"]


def test_multipart_without_boundary():
    result = scan(b"Content-Type: multipart/mixed\r\n\r\nbody\r\n")
    assert "part1: NoBoundaryInMultipartDefect" in result.mime_defects
    assert [part.declared_type for part in result.parts] == ["multipart/mixed"]


def test_duplicate_boundaries():
    """An inner multipart reusing its parent's boundary: whatever the parser makes of it, the exe is seen."""
    exe = base64.encodebytes(CLAM_EXE)
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: multipart/alternative; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--B\r\nContent-Type: application/octet-stream; name=x.exe\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + exe
        + b"--B--\r\n--B--\r\n"
    )
    result = scan(raw)
    assert any(part.name == "x.exe" and is_executable(part) for part in result.parts)


def test_invalid_base64_padding_names_the_part():
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: application/octet-stream; name=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAA\r\n--B--\r\n"
    )
    result = scan(raw)
    assert "a.bin: InvalidBase64PaddingDefect" in result.mime_defects
    assert by_path(result)["a.bin"].size > 0


def test_nul_bytes_in_headers_and_names_are_kept():
    raw = (
        b"Subject: a\x00b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b'Content-Type: application/octet-stream; name="ev\x00il.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + base64.encodebytes(CLAM_EXE)
        + b"--B--\r\n"
    )
    result = scan(raw)
    assert is_executable(by_path(result)["ev\x00il.exe"])


def test_crlf_and_lf_mixed():
    raw = mail(("clam.exe", CLAM_EXE)).as_bytes().replace(b"\n", b"\r\n")
    lines = raw.split(b"\r\n")
    raw = b"".join(line + (b"\n" if n % 2 else b"\r\n") for n, line in enumerate(lines))
    exe = by_path(scan(raw))["clam.exe"]
    assert is_executable(exe) and exe.size == len(CLAM_EXE)


def test_empty_and_header_only_messages():
    for raw in (b"", b"Subject: nothing\r\n", b"Subject: nothing\r\n\r\n"):
        result = scan(raw)
        assert [(part.path, part.size, part.real_type) for part in result.parts] == [
            ("part1", 0, "application/x-empty")
        ]
        assert result.unchecked == ()


# names


def test_rfc2231_continuations_with_charset():
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''r%C3%A9sum%C3%A9;\r\n"
        b" filename*1*=%E2%80%AE;\r\n filename*2=fdp.exe\r\n\r\nx\r\n--B--\r\n"
    )
    assert [part.name for part in scan(raw).parts] == ["résumé\u202efdp.exe"]


def test_rfc2047_names_and_bad_charsets():
    def named(header: bytes) -> str:
        raw = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n" + header + b"\r\n\r\nx\r\n--B--\r\n"
        return scan(raw).parts[0].name

    encoded = base64.b64encode("invoice\u202efdp.exe".encode()).decode()
    assert named(f'Content-Type: application/pdf; name="=?UTF-8?B?{encoded}?="'.encode()) == "invoice\u202efdp.exe"
    assert named(b'Content-Type: text/plain; name="=?iso-8859-1?q?r=E9sum=E9.pdf?="') == "résumé.pdf"
    assert named(b'Content-Type: text/plain; name="=?x-no-such-charset?q?a=E9.exe?="') == "a\xe9.exe"
    assert named(b'Content-Type: text/plain; name="=?utf-8?q?=FF.exe?="') == "\ufffd.exe"
    assert named(b'Content-Type: text/plain; name="=?utf-8?b?Q?="') == "=?utf-8?b?Q?="
    assert named('Content-Type: text/plain; name="ra\u0301w-utf8.exe"'.encode()) == "ra\u0301w-utf8.exe"


def test_right_to_left_override_in_a_zip_member_name():
    result = scan(mail(("a.zip", zip_of({"invoice\u202efdp.exe": CLAM_EXE}))))
    member = by_path(result)["a.zip/invoice\u202efdp.exe"]
    assert member.name == "invoice\u202efdp.exe" and is_executable(member)


def test_a_message_over_max_size_is_not_walked_but_unchecked():
    """The parser holds a message in memory: past max_size nothing is parsed, and the reason says why."""
    result = scan(mail(("a.zip", zip_of({"x.exe": CLAM_EXE}))), Limits(max_size=100))
    assert result.parts == ()
    assert len(result.unchecked) == 1 and "larger than max_size" in result.unchecked[0]
