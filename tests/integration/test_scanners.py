"""The checks and `milterd scan` against a real clamd (test signatures) and a real spamd."""

from __future__ import annotations

import email.utils
import json
import mailbox
import socket
import subprocess
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from milterd.checks.clamav import ClamavCheck
from milterd.checks.spamd import SpamdCheck
from milterd.message import Envelope, Message, Spool
from milterd.pipeline import Pipeline
from tests import daemons
from tests.conftest import GTUBE, MILTERD, write_config

TESTFILES = Path("/usr/share/clamav-testfiles")


def message(raw: bytes, threshold: int = 1 << 20) -> Message:
    spool = Spool(threshold)
    spool.write(raw)
    return Message(Envelope(mail_from="a@remote.test", rcpts=("u@example.com",)), spool)


def mail(body: str = "Hello Bob, lunch on Thursday?\n", attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@remote.test", "u@example.com", "test"
    msg["Date"], msg["Message-ID"] = email.utils.formatdate(), "<test.1@remote.test>"
    msg.set_content(body)
    if attachment:
        msg.add_attachment(attachment[1], maintype="application", subtype="octet-stream", filename=attachment[0])
    return msg.as_bytes()


@pytest.mark.parametrize("name", ["clam.exe", "clam.zip", "clam.7z", "clam.tar.gz", "clam.exe.rtf"])
def test_clamav_finds_test_files_inside_mime_attachments(clamd, name):
    finding = ClamavCheck([str(clamd.socket_path)], 10).run(
        message(mail(attachment=(name, (TESTFILES / name).read_bytes())))
    )
    assert finding.status == "ok"
    assert finding.viruses == ("ClamAV-Test-File.UNOFFICIAL",)


def test_clamav_finds_eicar_over_tcp_from_a_spool_on_disk(clamd):
    spooled = message(mail(attachment=("e.com", daemons.EICAR)), threshold=16)
    assert spooled.spool.on_disk
    finding = ClamavCheck([f"tcp:127.0.0.1:{clamd.port}"], 10).run(spooled)
    assert finding.viruses == ("Eicar-Test-Signature.UNOFFICIAL",)


def test_clamav_clean_message(clamd):
    finding = ClamavCheck([str(clamd.socket_path)], 10).run(message(mail()))
    assert (finding.status, finding.viruses) == ("ok", ())


def test_clamav_does_not_stream_a_message_over_max_size_and_says_unchecked(clamd):
    """clamd would cut a stream over its StreamMaxLength off with an error; we say why and never retry."""
    big = mail(attachment=("e.com", daemons.EICAR + b"x" * 5000))
    finding = ClamavCheck([str(clamd.socket_path)], 10, max_size=4096).run(message(big))
    assert finding.status == "unchecked" and not finding.failed
    assert "larger than max_size" in finding.detail


def test_clamav_pool_fails_over_to_the_next_socket(clamd, tmp_path):
    check = ClamavCheck([str(tmp_path / "no.sock"), f"tcp:127.0.0.1:{daemons.free_port()}", str(clamd.socket_path)], 10)
    assert check.run(message(mail(attachment=("e.com", daemons.EICAR)))).viruses


def test_clamav_down_is_unavailable(tmp_path):
    finding = ClamavCheck([str(tmp_path / "no.sock")], 10).run(message(mail()))
    assert finding.status == "unavailable"
    assert "no.sock" in finding.detail


def test_spamd_scores_gtube_with_its_rules(spamd):
    finding = SpamdCheck([f"127.0.0.1:{spamd.port}"], 30, 512000).run(message(mail(GTUBE.decode())))
    assert finding.status == "ok"
    assert finding.score >= 1000
    assert ("GTUBE", 1000.0) in finding.symbols
    assert "truncated" not in finding.detail


def test_spamd_clean_message_scores_low(spamd):
    finding = SpamdCheck([f"127.0.0.1:{spamd.port}"], 30, 512000).run(message(mail()))
    assert finding.status == "ok" and finding.score < 2


def test_spamd_down_is_unavailable_and_pool_fails_over(spamd):
    dead = f"127.0.0.1:{daemons.free_port()}"
    assert SpamdCheck([dead], 5, 512000).run(message(mail())).status == "unavailable"
    assert SpamdCheck([dead, f"127.0.0.1:{spamd.port}"], 30, 512000).run(message(mail())).status == "ok"


def test_a_silent_scanner_times_out_within_the_deadline():
    """A server that accepts but never answers: the pipeline gives up at the check's deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        pipeline = Pipeline(
            [ClamavCheck([f"tcp:127.0.0.1:{port}"], 1.0), SpamdCheck([f"127.0.0.1:{port}"], 1.0, 512000)]
        )
        t0 = time.monotonic()
        findings = pipeline.run(message(mail()))
        assert time.monotonic() - t0 < 3.5
    assert findings["clamav"].status == "timeout"
    assert findings["spamd"].status == "timeout"


def test_spamd_is_skipped_for_a_virus_and_scores_an_oversized_message_truncated(clamd, spamd):
    pipeline = Pipeline([ClamavCheck([str(clamd.socket_path)], 10), SpamdCheck([f"127.0.0.1:{spamd.port}"], 30, 4096)])
    infected = pipeline.run(message(mail(attachment=("e.com", daemons.EICAR))))
    assert infected["spamd"].status == "skipped" and "virus" in infected["spamd"].detail
    big = pipeline.run(message(mail("x" * 70 + "\n") * 150))
    assert big["spamd"].status == "ok" and "truncated: first " in big["spamd"].detail
    assert big["clamav"].status == "ok"


def large_spam(size: int = 2 * 1024 * 1024) -> bytes:
    """A 2 MB message (CRLF): a 100 KB text part, a text part with GTUBE, then a text attachment to `size` bytes.

    GTUBE is in a part of its own: SpamAssassin 4 scans body rules only in the first 50000 bytes of
    each part (body_part_scan_size), so after 100 KB of the same part it never hits, whole or truncated.
    """
    import email.policy

    def text(n: int, what: str) -> str:
        lines = "".join(f"{what} line {i:06d}, padding padding padding padding padding.\n" for i in range(n // 60 + 1))
        return lines[:n].rpartition("\n")[0] + "\n"

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@remote.test", "u@example.com", "newsletter"
    msg["Date"], msg["Message-ID"] = email.utils.formatdate(), "<big.1@remote.test>"
    msg.set_content(text(100 * 1024, "Newsletter"))
    msg.add_attachment(GTUBE.decode() + "\n", disposition="inline")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    msg.add_attachment(text((size - len(raw) - 400) * 60 // 61, "Archive"), filename="archive.txt")  # LF -> CRLF
    return msg.as_bytes(policy=email.policy.SMTP)


def test_a_2mb_spam_with_gtube_after_100kb_scores_as_spam_truncated_and_memory_stays_flat(spamd):
    """amavis truncates what SpamAssassin gets; spamc --max-size would skip it and the spam would pass."""
    import tracemalloc

    raw = large_spam()
    assert 2_000_000 < len(raw) <= 2 * 1024 * 1024 and 100 * 1024 < raw.index(GTUBE) < 512000
    spooled = message(raw, threshold=64 * 1024)
    assert spooled.spool.on_disk
    tracemalloc.start()
    try:
        finding = SpamdCheck([f"127.0.0.1:{spamd.port}"], 60, 512000).run(spooled)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert finding.status == "ok" and ("GTUBE", 1000.0) in finding.symbols and finding.score >= 1000
    view = spooled.truncated(512000)
    assert finding.detail == f"required 5; truncated: first {view.size} of {len(raw)} bytes scored"
    assert view.size <= raw.index(b"\r\n\r\n") + 4 + 512000
    assert peak < 1 << 20, peak  # streamed from the spool: never the message, nor the 500 KB sent, in memory


class RecordingSpamd:
    """A one-shot stand-in spamd that keeps the request it got and answers a clean REPORT."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn, self.server:
            while data := conn.recv(65536):
                self.request += data
            conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.0 / 5.0\r\n\r\n")

    def sent(self) -> tuple[int, bytes]:
        self.thread.join(10)
        head, _, body = self.request.partition(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-length:")).split()[1])
        return length, body


def test_spamd_gets_a_message_within_max_size_whole():
    raw = mail("a line\n" * 100)
    fake = RecordingSpamd()
    finding = SpamdCheck([f"127.0.0.1:{fake.port}"], 10, len(raw)).run(message(raw))
    assert (finding.status, finding.detail) == ("ok", "required 5")
    assert fake.sent() == (len(raw), raw)


def test_spamd_gets_the_header_section_and_the_body_cut_at_the_line_end_before_max_size():
    raw = mail("".join(f"body line {n:03d}\n" for n in range(100)))  # LF lines of 14 bytes
    head, line = raw[: raw.index(b"\n\n") + 2], 14
    assert raw[len(head) : len(head) + line] == b"body line 000\n"
    fake = RecordingSpamd()
    finding = SpamdCheck([f"127.0.0.1:{fake.port}"], 10, 10 * line + 5).run(message(raw, threshold=256))
    length, body = fake.sent()
    assert body == raw[: len(head) + 10 * line] and length == len(body)  # the 11th line, cut in the middle, is not sent
    assert finding.detail == f"required 5; truncated: first {len(body)} of {len(raw)} bytes scored"


# ---- milterd scan, the offline front end -------------------------------------------------------


@pytest.fixture(scope="module")
def scan_config(tmp_path_factory, clamd, spamd):
    return write_config(tmp_path_factory.mktemp("scan"), clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}")


def scan(config: Path, *args) -> tuple[int, list[dict], str]:
    result = subprocess.run(
        [MILTERD, "scan", "--config", str(config), "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_scan_json_on_an_mbox_and_a_maildir(scan_config, tmp_path):
    box = mailbox.mbox(tmp_path / "box")
    for raw in (mail(), mail(GTUBE.decode()), mail(attachment=("a.zip", (TESTFILES / "clam.zip").read_bytes()))):
        box.add(raw)
    box.flush()
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    maildir.add(mail())
    code, records, stderr = scan(scan_config, tmp_path / "box", tmp_path / "Maildir")
    assert code == 1, stderr  # the virus is blocked
    assert [r["category"] for r in records] == ["CLEAN", "SPAM", "VIRUS", "CLEAN"]
    assert [r["action"] for r in records] == ["accept", "accept", "reject", "accept"]
    for record in records:
        assert {
            "file",
            "category",
            "spam_score",
            "viruses",
            "banned",
            "action",
            "dkim",
            "spf",
            "checks",
            "headers",
        } <= set(record)
    assert records[2]["viruses"] == ["ClamAV-Test-File.UNOFFICIAL"]
    assert records[2]["checks"]["spamd"]["status"] == "skipped"
    assert ["X-Spam-Flag", "YES"] in records[1]["headers"]
    assert records[1]["subject_tag"] == "***SPAM*** "


def test_scan_envelope_options_decide_local_or_not(scan_config, tmp_path):
    (tmp_path / "g.eml").write_bytes(mail(GTUBE.decode()))
    _, [remote], _ = scan(scan_config, "--rcpt", "x@remote.test", "--mail-from", "", tmp_path / "g.eml")
    assert remote["subject_tag"] == "" and not any(h[0].startswith("X-Spam") for h in remote["headers"])


def test_scan_without_backends_says_unavailable_and_tempfails(tmp_path):
    config = write_config(
        tmp_path / "cfg", clamav=str(tmp_path / "none.sock"), spamd=f"127.0.0.1:{daemons.free_port()}"
    )
    (tmp_path / "m.eml").write_bytes(mail())
    code, [record], stderr = scan(config, tmp_path / "m.eml")
    assert code == 1
    assert record["category"] == "UNCHECKED" and record["action"] == "tempfail"
    assert record["checks"]["clamav"]["status"] == "unavailable"
    assert record["checks"]["spamd"]["status"] == "unavailable"
    assert "Traceback" not in stderr


def test_scan_usage_errors_exit_2(scan_config, tmp_path):
    result = subprocess.run(
        [MILTERD, "scan", "--config", str(scan_config), str(tmp_path / "missing.eml")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "missing.eml" in result.stderr and "Traceback" not in result.stderr


def test_tcp_nodelay_is_set_on_the_listener_and_inherited_by_accepted_sockets():
    """libmilter hides its sockets; milterd sets TCP_NODELAY on the listener it finds among its descriptors,
    which removes a 40 ms Nagle/delayed-ACK stall per message with header changes (measured by make bench)."""
    from milterd.milter import no_delay_on_listeners

    with socket.create_server(("127.0.0.1", 0)) as listener:
        no_delay_on_listeners()
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert not client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_scan_json_reports_banned_parts_unchecked_reasons_and_bad_headers(scan_config, tmp_path):
    import io
    import zipfile

    import libarchive

    plain = io.BytesIO()
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("docs/invoice.pdf.exe", b"not really a program")
    secret = bytearray()
    with libarchive.custom_writer(
        lambda data: secret.extend(data) or len(data), "zip", options="encryption=zipcrypt", passphrase="pw"
    ) as archive:
        archive.add_file_from_memory("a.txt", 5, b"hello")
    (tmp_path / "banned.eml").write_bytes(mail(attachment=("invoice.zip", plain.getvalue())))
    (tmp_path / "encrypted.eml").write_bytes(mail(attachment=("secret.zip", bytes(secret))))
    (tmp_path / "twofrom.eml").write_bytes(b"From: b@remote.test\r\n" + mail())
    code, records, stderr = scan(
        scan_config, tmp_path / "banned.eml", tmp_path / "encrypted.eml", tmp_path / "twofrom.eml"
    )
    assert code == 1, stderr  # the banned part is rejected under the shipped REJECT
    banned, encrypted, twofrom = records
    assert (banned["category"], banned["action"]) == ("BANNED", "reject")
    assert banned["banned"] == ["invoice.zip/docs/invoice.pdf.exe"]
    assert banned["checks"]["banned"]["banned"] == [
        {"part": "invoice.zip/docs/invoice.pdf.exe", "rule": "double-extension"}
    ]
    assert (encrypted["category"], encrypted["action"]) == ("UNCHECKED", "accept")
    assert encrypted["unchecked"] == ["banned: encrypted: secret.zip/a.txt"]
    assert ["X-Amavis-Alert", "UNCHECKED, banned unchecked (encrypted: secret.zip/a.txt)"] in encrypted["headers"]
    assert (twofrom["category"], twofrom["action"]) == ("BAD_HEADER", "accept")
    assert twofrom["bad_headers"] == ['Duplicate header field: "From"']
