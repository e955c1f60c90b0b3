"""Parsing dccifd's answers and scoring them as SpamAssassin's DCC plugin does."""

from __future__ import annotations

import pytest

from milterd.checks.dcc import MANY, DccError, DccReply, is_hit, parse_reply, request_head
from milterd.message import Envelope, Message, Spool
from milterd.scores import default_scores

SCORING = default_scores()["dcc"]


def test_bulk_reply():
    reply = parse_reply(
        b"A\nAA\nX-DCC-Rhyolite-Metrics: calcite.rhyolite.com 104; bulk Body=many Fuz1=many Fuz2=many\n\n"
    )
    assert (reply.result, reply.body, reply.fuz1, reply.fuz2) == ("A", MANY, MANY, MANY)
    assert is_hit(reply, SCORING)


def test_folded_header_with_numbers():
    reply = parse_reply(
        b"A\nA\nX-DCC-EATSERVER-Metrics: a-rather-long-host-name.example.net 1054;\n\tBody=12 Fuz1=7 Fuz2=MANY\n\n"
    )
    assert (reply.body, reply.fuz1, reply.fuz2) == (12, 7, MANY)
    assert reply.header.endswith("1054; Body=12 Fuz1=7 Fuz2=MANY")
    assert is_hit(reply, SCORING)


def test_low_counts_and_whitelisted_are_no_hit():
    assert not is_hit(parse_reply(b"A\nA\nX-DCC-x-Metrics: h 1; Body=1 Fuz1=1 Fuz2=2\n\n"), SCORING)
    whitelisted = parse_reply(b"A\nA\nX-DCC-x-Metrics: h 1; Body=ok Fuz1=ok2 Fuz2=ok\n\n")
    assert (whitelisted.body, whitelisted.fuz1, whitelisted.fuz2) == (0, 0, 0)


def test_thresholds_are_at_or_over():
    reply = DccReply("A", "X-DCC", body=5)
    assert is_hit(reply, {**SCORING, "body_max": 5})
    assert not is_hit(reply, {**SCORING, "body_max": 6})


def test_crlf_and_missing_counts_and_huge_numbers():
    reply = parse_reply(b"R\r\nR\r\nX-DCC-x-Metrics: h 1; Body=123456789012345678901234567890\r\n\r\n")
    assert (reply.result, reply.body, reply.fuz1, reply.fuz2) == ("R", MANY, 0, 0)


def test_counts_only_from_the_header_value():
    reply = parse_reply(b"A\nA\nX-DCC-Body=many-Metrics: h 1; Body=2\n\n")
    assert reply.body == 2


def test_temporary_failure_without_header():
    assert parse_reply(b"T\n\n\n") == DccReply("T")


@pytest.mark.parametrize(
    "raw",
    [b"", b"SPAMD/1.1 0 EX_OK\r\n", b"A", b"A\nA\n\n", b"A\nA\n550 5.7.1 rejected\n", b"Z\n\n"],
)
def test_not_a_result(raw):
    with pytest.raises(DccError):
        parse_reply(raw)


def test_errors_are_printable():
    with pytest.raises(DccError) as e:
        parse_reply(b"A\nA\nbogus\x1b[31m\r\x00header\n\n")
    assert "\x1b" not in str(e.value) and "\x00" not in str(e.value)


def test_request_head_keeps_fields_on_their_lines():
    envelope = Envelope(
        mail_from="<a@b.test>",
        rcpts=("x@y.test\r\nevil",),
        client_ip="2001:db8::1",
        client_name="unknown",
        helo="helo\nname",
    )
    head = request_head(Message(envelope, Spool()))
    assert head == b"header grey-off\n2001:db8::1\nheloname\n<a@b.test>\n<x@y.testevil>\n\n"


def test_built_when_enabled_with_the_scores_tables_thresholds():
    import dataclasses

    from milterd.checks import build_checks
    from milterd.checks.dcc import DccCheck, DccSettings
    from milterd.config import load_config

    config = load_config(None)
    assert not any(isinstance(c, DccCheck) for c in build_checks(config))
    dcc = DccSettings(enabled=True, socket="/run/dccifd", timeout=2.0)
    config = dataclasses.replace(config, checks={**config.checks, "dcc": dcc})
    (check,) = [c for c in build_checks(config) if isinstance(c, DccCheck)]
    assert (check.socket_path, check.timeout, check.scoring) == ("/run/dccifd", 2.0, SCORING)


def test_request_head_survives_any_string():
    envelope = Envelope(mail_from="caf\udce9@b.test", rcpts=("\ud800@y.test",), helo="h")
    head = request_head(Message(envelope, Spool()))
    assert b"<caf\xe9@b.test>\n<?@y.test>\n\n" in head
