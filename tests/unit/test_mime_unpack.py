"""Compression bombs and what libarchive cannot read (issue 14): single compressed streams are
decompressed into the walk's quota, unar opens ARJ, BinHex and deflate64 zip members."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from milterd.checks.banned import banned_parts, load_rules
from milterd.mime import Walker
from tests.unit.test_mime import CLAM_EXE, DEFAULTS, Limits, by_path, is_executable, mail, message, scan, zip_of

pytestmark = pytest.mark.unit

RULES = load_rules(None)
GIB = 1 << 30
CHUNK = 1 << 24


def banned(result) -> dict[str, str]:
    return {part.path: rule.name for part, rule in banned_parts(result, RULES)}


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zeros(compressor) -> bytes:
    """1 GiB of zeros through `compressor`, streamed: the zeros are never held beyond one chunk."""
    zeros = bytes(CHUNK)
    out = [compressor.compress(zeros) for _ in range(GIB // CHUNK)]
    return b"".join(out) + compressor.flush()


BOMBS = {
    "gz": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),  # 31: the gzip wrapper
    "bz2": lambda: bz2.BZ2Compressor(9),
    "xz": lambda: lzma.LZMACompressor(preset=0),
}


@pytest.fixture(scope="session")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """gzip, bzip2 and xz of 1 GiB of zeros (~1 MB, ~1 KB, ~150 KB), made once per session, in parallel
    (the compressors release the GIL)."""
    directory = tmp_path_factory.mktemp("bombs")
    with ThreadPoolExecutor(len(BOMBS)) as pool:
        made = {kind: pool.submit(_zeros, make()) for kind, make in BOMBS.items()}
        paths = {}
        for kind, future in made.items():
            paths[kind] = directory / f"server.log.{kind}"
            paths[kind].write_bytes(future.result())
    return paths


# single compressed streams


def test_a_gzip_of_zeros_is_decompressed_not_taken_for_an_empty_tar():
    """Why a 700 KB gzip of 512 MiB passed CLEAN in 18 ms: libarchive bid its formats over the
    decompressed stream, and zeros are a tar's end-of-archive blocks: an empty tar, nothing read."""
    data = gzip.compress(bytes(1 << 19))
    result = scan(mail(("server.log.gz", data)))
    log = by_path(result)["server.log.gz/server.log"]
    assert log.size == 1 << 19 and log.in_archive and log.depth == 2
    assert result.unchecked == ()


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_compression_bombs_are_unchecked_within_the_deadline(bombs, kind):
    raw = mail((f"server.log.{kind}", bombs[kind].read_bytes())).as_bytes()
    started = time.monotonic()
    result = scan(raw)
    elapsed = time.monotonic() - started
    quota = max(DEFAULTS.min_expansion_quota, min(DEFAULTS.max_expansion_quota, len(raw) * 500))
    assert result.unchecked == (f"max_expansion_quota {quota} bytes exceeded at server.log.{kind}/server.log",)
    assert elapsed < DEFAULTS.timeout, elapsed


def test_a_gzip_bomb_inside_a_zip_inside_a_tar(bombs):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("server.log.gz", bombs["gz"].read_bytes())
    result = scan(mail(("logs.tar", tar_of({"logs.zip": inner.getvalue()}))))
    assert len(result.unchecked) == 1
    assert result.unchecked[0].endswith("exceeded at logs.tar/logs.zip/server.log.gz/server.log")


def test_a_bomb_past_the_deadline_stops_at_the_deadline(bombs):
    raw = mail(("server.log.bz2", bombs["bz2"].read_bytes())).as_bytes()
    limits = Limits(timeout=0.3, min_expansion_quota=1 << 40)
    started = time.monotonic()
    result = scan(raw, limits)
    assert time.monotonic() - started < 1.5
    assert result.unchecked == ("timeout 0.3 s exceeded at server.log.bz2/server.log",)


PEAK = """
import sys
from milterd.checks.banned import BannedSettings
from milterd.message import Envelope, Message, Spool
from milterd.mime import Walker

def hwm():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

walker = Walker(BannedSettings())
spool = Spool()
spool.write(b"Subject: warm up\\r\\n\\r\\nhi\\r\\n")
walker.inspect(Message(Envelope(), spool))
before = hwm()
spool = Spool()
spool.write(open(sys.argv[1], "rb").read())
result = walker.inspect(Message(Envelope(), spool))
print(before, hwm(), result.unchecked)
"""


def test_memory_stays_flat_on_a_gzip_bomb(bombs, tmp_path):
    """Peak RSS of a process walking the 1 GiB gzip bomb (1.4 MB of mail): the message itself, not the bomb."""
    path = tmp_path / "bomb.eml"
    path.write_bytes(mail(("server.log.gz", bombs["gz"].read_bytes())).as_bytes())
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    before, after, unchecked = out.stdout.split(maxsplit=2)
    assert "exceeded at server.log.gz/server.log" in unchecked
    assert int(after) - int(before) < 32 * 1024, (before, after)  # kB: 1.4 MB of mail, parsed


def test_a_compressed_executable_is_banned_by_its_inner_name_and_type():
    result = scan(mail(("setup.exe.gz", gzip.compress(CLAM_EXE)), ("tools.tar.gz", tar_of({"setup.exe": CLAM_EXE}))))
    parts = by_path(result)
    assert is_executable(parts["setup.exe.gz/setup.exe"]) and parts["setup.exe.gz/setup.exe"].name == "setup.exe"
    assert is_executable(parts["tools.tar.gz/setup.exe"])
    assert {"setup.exe.gz/setup.exe", "tools.tar.gz/setup.exe"} <= set(banned(result))
    assert result.unchecked == ()


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("a.exe.bz2", bz2.compress),
        ("a.exe.xz", lzma.compress),
        ("a.exe.lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE)),
    ],
)
def test_other_compressions_hold_an_executable(name, compress):
    result = scan(mail((name, compress(CLAM_EXE))))
    assert is_executable(by_path(result)[f"{name}/a.exe"]) and result.unchecked == ()


def test_a_compressed_stream_without_a_suffix_gives_data():
    result = scan(mail(("download", gzip.compress(CLAM_EXE))))
    assert is_executable(by_path(result)["download/data"])


def test_a_truncated_gzip_is_unchecked():
    data = gzip.compress(os.urandom(200_000))[:50_000]
    result = scan(mail(("cut.gz", data)))
    assert result.unchecked == ("cut.gz: cannot unpack: truncated gzip input",)


# unar: what libarchive cannot read

needs_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("unar", "lsar", "arj", "binhex")), reason="make deps installs them"
)


@pytest.fixture
def spill(tmp_path) -> Limits:
    """Limits with their own spill_dir, to see that unar's temporary directory is removed."""
    return Limits(spill_dir=str(tmp_path))


def arj_of(tmp_path: Path, name: str, data: bytes) -> bytes:
    work = tmp_path / "arj"
    work.mkdir()
    (work / name).write_bytes(data)
    subprocess.run(["arj", "a", "-y", "files.arj", name], cwd=work, check=True, capture_output=True)
    return (work / "files.arj").read_bytes()


def binhex_of(tmp_path: Path, name: str, data: bytes) -> bytes:
    """macutils' binhex (BinHex 4.0). Its first line reads "(This file must be converted; you knew that
    already.)": file(1) and unar recognize BinHex by the usual "... with BinHex 4.0)" line, as mailers write it."""
    work = tmp_path / "hqx"
    work.mkdir()
    (work / name).write_bytes(data)
    out = subprocess.run(["binhex", "-d", name], cwd=work, check=True, capture_output=True).stdout
    first, rest = out.split(b"\n", 1)
    assert first.startswith(b"(This file must be converted")
    return b"(This file must be converted with BinHex 4.0)\n" + rest


@needs_tools
def test_arj_with_an_executable_is_banned(tmp_path, spill):
    result = scan(mail(("invoice.arj", arj_of(tmp_path, "setup.exe", CLAM_EXE))), spill)
    parts = by_path(result)
    assert parts["invoice.arj"].real_type == "application/x-arj"
    assert is_executable(parts["invoice.arj/setup.exe"]) and parts["invoice.arj/setup.exe"].depth == 2
    assert "invoice.arj/setup.exe" in banned(result) and result.unchecked == ()
    assert list(tmp_path.glob("milterd-*")) == []


@needs_tools
def test_binhex_with_an_executable_is_banned(tmp_path, spill):
    result = scan(mail(("invoice.hqx", binhex_of(tmp_path, "setup.exe", CLAM_EXE))), spill)
    parts = by_path(result)
    assert parts["invoice.hqx"].real_type == "application/mac-binhex40"
    assert is_executable(parts["invoice.hqx/setup.exe"]) and "invoice.hqx/setup.exe" in banned(result)
    assert result.unchecked == () and list(tmp_path.glob("milterd-*")) == []


@needs_tools
def test_members_unar_extracts_are_walked_like_any_other(tmp_path, spill):
    """An ARJ holding a zip holding a .exe.gz: names and real types all the way down."""
    inner = zip_of({"docs/tool.exe.gz": gzip.compress(CLAM_EXE)})
    result = scan(mail(("a.arj", arj_of(tmp_path, "inner.zip", inner))), spill)
    exe = by_path(result)["a.arj/inner.zip/docs/tool.exe.gz/tool.exe"]
    assert is_executable(exe) and exe.depth == 4 and result.unchecked == ()


@needs_tools
def test_a_deflate64_zip_member_is_extracted_by_unar(spill, tmp_path):
    data = (Path("/usr/share/clamav-testfiles") / "clam.d64.zip").read_bytes()
    result = scan(mail(("d64.zip", data)), spill)
    assert is_executable(by_path(result)["d64.zip/clam.exe"]) and result.unchecked == ()
    assert list(tmp_path.glob("milterd-*")) == []


@needs_tools
def test_an_arj_over_the_quota_is_not_extracted(tmp_path, spill):
    """lsar's declared sizes against what is left of the quota: nothing is written."""
    data = arj_of(tmp_path, "zeros.bin", bytes(20 << 20))
    limits = Limits(spill_dir=spill.spill_dir, max_expansion_factor=5)
    result = scan(mail(("big.arj", data)), limits)
    assert len(result.unchecked) == 1 and result.unchecked[0].endswith("bytes exceeded at big.arj")
    assert list(tmp_path.glob("milterd-*")) == []


@needs_tools
def test_a_lying_listing_is_caught_while_unar_writes(tmp_path):
    """An unar that writes more than lsar declared is killed as soon as the directory outgrows the quota."""
    fake = _fake(tmp_path, 'head -c 50000000 /dev/zero > "$out/zeros"; sleep 30')
    data = arj_of(tmp_path, "setup.exe", CLAM_EXE)
    result = scan(mail(("a.arj", data)), Limits(spill_dir=str(tmp_path / "spill"), unar_command=str(fake)))
    assert len(result.unchecked) == 1 and "bytes exceeded at a.arj" in result.unchecked[0]
    assert list((tmp_path / "spill").iterdir()) == []


def _fake(tmp_path: Path, body: str) -> Path:
    """A stand-in for unar: finds its -output-directory, runs `body`, leaves its pid for the test."""
    (tmp_path / "spill").mkdir(exist_ok=True)
    script = tmp_path / "fake-unar"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            while [ "$1" != "-output-directory" ]; do shift; done
            out=$2
            echo $$ > {tmp_path}/pid
            {body}
            """
        )
    )
    script.chmod(0o755)
    return script


@needs_tools
def test_unar_is_killed_as_a_group_at_the_deadline_and_its_directory_removed(tmp_path):
    fake = _fake(tmp_path, 'echo x > "$out/a.exe"; sleep 60 & echo $! > ' + f"{tmp_path}/child; wait")
    data = arj_of(tmp_path, "setup.exe", CLAM_EXE)
    limits = Limits(spill_dir=str(tmp_path / "spill"), unar_command=str(fake), timeout=1.0)
    started = time.monotonic()
    result = scan(mail(("a.arj", data)), limits)
    assert time.monotonic() - started < 2
    assert result.unchecked == ("timeout 1 s exceeded at a.arj",)
    assert list((tmp_path / "spill").iterdir()) == []
    child = int((tmp_path / "child").read_text())
    for _ in range(50):  # killed; gone once init reaps it
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the child of unar outlived the walk")


@needs_tools
def test_real_unar_at_a_tiny_deadline_leaves_nothing_behind(tmp_path):
    """Whatever the deadline interrupts, lsar or unar, the temporary directory goes."""
    data = arj_of(tmp_path, "setup.exe", CLAM_EXE)
    (tmp_path / "spill").mkdir()
    for timeout in (0.01, 0.02, 0.05, 0.1):
        result = scan(mail(("a.arj", data)), Limits(spill_dir=str(tmp_path / "spill"), timeout=timeout))
        assert list((tmp_path / "spill").iterdir()) == [], timeout
        assert result.unchecked == () or "timeout" in result.unchecked[0]


def test_without_unar_these_formats_stay_unchecked(tmp_path):
    data = (Path("/usr/share/clamav-testfiles") / "clam.arj").read_bytes()
    result = scan(mail(("a.arj", data)), Limits(unar_command=""))
    assert result.unchecked == ("a.arj: cannot unpack: no decoder for application/x-arj (unar_command is empty)",)
    result = scan(mail(("a.arj", data)), Limits(unar_command="/nonexistent/unar", spill_dir=str(tmp_path)))
    assert result.unchecked == ("a.arj: cannot unpack: cannot run /nonexistent/unar: No such file or directory",)
    assert list(tmp_path.iterdir()) == []


def test_walker_is_reusable_after_unar():
    walker = Walker(Limits())
    raw = mail(("clam.arj", (Path("/usr/share/clamav-testfiles") / "clam.arj").read_bytes())).as_bytes()
    for _ in range(3):
        assert is_executable(by_path(walker.inspect(message(raw)))["clam.arj/clam.exe"])
