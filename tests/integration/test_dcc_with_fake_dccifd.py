"""The DCC check against tests/fake_dccifd.py, a FAKE dccifd (DCC cannot run here).

The fake speaks dccifd's ASCII protocol and logs what it was sent; its counts are chosen per
message by a token in the body.
"""

from __future__ import annotations

import time

import pytest

from milterd.checks.dcc import DccCheck
from milterd.message import Envelope, Message, Spool
from milterd.scores import default_scores
from tests.fake_dccifd import start_fake_dccifd

SCORING = default_scores()["dcc"]
MANY = {"Body": "many", "Fuz1": "many", "Fuz2": "many"}
ENVELOPE = Envelope(
    mail_from="sender@remote.test",
    rcpts=("u1@example.com", "<u2@example.com>"),
    client_ip="192.0.2.7",
    client_name="mx.remote.test",
    helo="mx.remote.test",
    queue_id="4Xyz",
)


@pytest.fixture(scope="module")
def dccifd(tmp_path_factory):
    server = start_fake_dccifd(
        tmp_path_factory.mktemp("dccifd"),
        counts={"Body": 1, "Fuz1": 2, "Fuz2": 3},
        tokens={"BULK-DCC-TOKEN": MANY, "SILENT-DCC-TOKEN": {"silent": True}, "TEMPFAIL-DCC-TOKEN": {"result": "T"}},
    )
    yield server
    server.stop()


def message(body: bytes, envelope: Envelope = ENVELOPE, threshold: int = 1 << 20) -> Message:
    spool = Spool(threshold)
    spool.write(b"From: a@remote.test\r\nSubject: offer\r\n\r\n" + body + b"\r\n")
    return Message(envelope, spool)


def test_bulk_message_hits_dcc_check_with_its_points(dccifd):
    finding = DccCheck(str(dccifd.socket_path), 5, SCORING).run(message(b"buy now BULK-DCC-TOKEN"))
    assert finding.status == "ok"
    assert finding.score == SCORING["points"]
    assert finding.symbols == (("DCC_CHECK", SCORING["points"]),)
    assert finding.detail.startswith("Body=many Fuz1=many Fuz2=many")


def test_low_counts_are_no_hit(dccifd):
    finding = DccCheck(str(dccifd.socket_path), 5, SCORING).run(message(b"lunch on Thursday?"))
    assert (finding.status, finding.score, finding.symbols) == ("ok", None, ())
    assert finding.detail.startswith("Body=1 Fuz1=2 Fuz2=3")


def test_lower_thresholds_from_scores_toml_count(dccifd):
    scoring = {**SCORING, "fuz2_max": 3}
    finding = DccCheck(str(dccifd.socket_path), 5, scoring).run(message(b"lunch on Friday?"))
    assert finding.symbols == (("DCC_CHECK", SCORING["points"]),)


def test_the_fake_received_the_envelope_and_message_milterd_sent(dccifd):
    msg = message(b"a message to log " + b"x" * 200_000, threshold=4096)  # spooled on disk, sent in chunks
    assert msg.spool.on_disk
    DccCheck(str(dccifd.socket_path), 5, SCORING).run(msg)
    request = next(r for r in reversed(dccifd.requests()) if b"a message to log" in r["message"])
    assert request["options"] == ["header", "grey-off"]
    assert (request["client_ip"], request["client_name"], request["helo"]) == (
        "192.0.2.7",
        "mx.remote.test",
        "mx.remote.test",
    )
    assert request["sender"] == "<sender@remote.test>"
    assert request["rcpts"] == ["<u1@example.com>", "<u2@example.com>"]
    with msg.open() as stream:
        assert request["message"] == stream.read()


def test_a_message_with_an_x_dcc_header_is_only_queried(dccifd):
    spool = Spool()
    spool.write(b"X-DCC-Upstream-Metrics: mx 1; Body=1 Fuz1=1 Fuz2=1\r\nSubject: again\r\n\r\nreported upstream\r\n")
    DccCheck(str(dccifd.socket_path), 5, SCORING).run(Message(Envelope(mail_from="", rcpts=()), spool))
    request = next(r for r in reversed(dccifd.requests()) if b"reported upstream" in r["message"])
    assert request["options"] == ["header", "grey-off", "query"]
    # no client address: dccifd takes it from Received; the null sender; DCC.pm's recipient
    assert (request["client_ip"], request["sender"], request["rcpts"]) == ("", "<>", ["unknown"])


def test_answers_are_cached_by_message(dccifd):
    check = DccCheck(str(dccifd.socket_path), 5, SCORING)
    first = check.run(message(b"cache me BULK-DCC-TOKEN"))
    asked = len(dccifd.requests())
    second = check.run(message(b"cache me BULK-DCC-TOKEN"))
    assert len(dccifd.requests()) == asked
    assert second.symbols == first.symbols
    assert second.detail.endswith(", cached)")


def test_missing_socket_is_unavailable(tmp_path):
    finding = DccCheck(str(tmp_path / "no-dccifd"), 1, SCORING).run(message(b"hello"))
    assert finding.status == "unavailable"
    assert finding.failed and not finding.critical


def test_refused_socket_is_unavailable(tmp_path):
    import socket

    path = tmp_path / "dead-dccifd"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: connect is refused
        finding = DccCheck(str(path), 1, SCORING).run(message(b"hello"))
    assert finding.status == "unavailable"


def test_dccifd_that_never_answers_times_out_within_the_deadline(dccifd):
    t0 = time.monotonic()
    finding = DccCheck(str(dccifd.socket_path), 1, SCORING).run(message(b"SILENT-DCC-TOKEN"))
    elapsed = time.monotonic() - t0
    assert finding.status == "timeout"
    assert 0.9 <= elapsed < 1.5


def test_dcc_temporary_failure_is_unavailable(dccifd):
    finding = DccCheck(str(dccifd.socket_path), 5, SCORING).run(message(b"TEMPFAIL-DCC-TOKEN"))
    assert finding.status == "unavailable"
    assert "(T)" in finding.detail


def test_over_max_size_dccifd_gets_the_header_section_and_the_body_cut_at_a_line_end(dccifd):
    """As amavis hands SpamAssassin's DCC plugin a truncated message; [dcc] max_size."""
    body = b"".join(b"truncate me line %05d\r\n" % n for n in range(20000))  # 24 bytes a line
    msg = message(body, threshold=4096)
    finding = DccCheck(str(dccifd.socket_path), 5, SCORING, max_size=100_010).run(msg)
    request = next(r for r in reversed(dccifd.requests()) if b"truncate me" in r["message"])
    head = b"From: a@remote.test\r\nSubject: offer\r\n\r\n"
    assert request["message"] == head + body[: 100_010 // 24 * 24]
    assert finding.status == "ok"
    assert finding.detail.endswith(f"; truncated: first {len(head) + 100_010 // 24 * 24} of {msg.size} bytes checked")
