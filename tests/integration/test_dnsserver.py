"""tests.dnsserver answers dnspython as a real authoritative server would, failures and truncation included.

The DKIM, SPF and DMARC tests rely on exactly these behaviours, so they are checked here once.
"""

from __future__ import annotations

import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

KEY_2048 = "v=DKIM1; k=rsa; p=" + "M" * 392  # the base64 length of a 2048-bit RSA public key
KEY_4096 = "v=DKIM1; k=rsa; p=" + "M" * 736
ZONE = {
    "example.dnsserver.test.": [
        ["A", "192.0.2.1"],
        ["AAAA", "2001:db8::1"],
        ["MX", "10 mx.example.dnsserver.test."],
        ["TXT", "v=spf1 ip4:192.0.2.0/24 -all"],
    ],
    "Alias.Dnsserver.Test.": [["CNAME", "example.dnsserver.test."]],
    "s2048._domainkey.dnsserver.test.": [["TXT", KEY_2048]],
    "s4096._domainkey.dnsserver.test.": [["TXT", KEY_4096]],
    "1.2.0.192.in-addr.arpa.": [["PTR", "example.dnsserver.test."]],
    "servfail.dnsserver.test.": [["SERVFAIL", ""]],
    "timeout.dnsserver.test.": [["TIMEOUT", ""]],
}


@pytest.fixture(scope="module")
def server(dns):
    """The session server with this module's names (named apart from `dns`, which is dnspython here)."""
    dns.update(ZONE)
    return dns


def resolver(server, lifetime: float = 2.0) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = server.port
    res.lifetime = lifetime
    return res


def values(answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("example.dnsserver.test", "A", ["192.0.2.1"]),
        ("EXAMPLE.dnsserver.test", "AAAA", ["2001:db8::1"]),
        ("example.dnsserver.test", "MX", ["10 mx.example.dnsserver.test."]),
        ("example.dnsserver.test", "TXT", ['"v=spf1 ip4:192.0.2.0/24 -all"']),
        ("alias.dnsserver.test", "A", ["192.0.2.1"]),
        ("1.2.0.192.in-addr.arpa", "PTR", ["example.dnsserver.test."]),
    ],
)
def test_records_are_served_case_insensitively_and_authoritatively(server, name, rdtype, expected):
    answer = resolver(server).resolve(name, rdtype)
    assert values(answer) == expected
    assert answer.response.flags & dns.flags.AA


def test_a_cname_is_answered_with_its_target_in_the_zone(server):
    reply = dns.query.udp(dns.message.make_query("alias.dnsserver.test", "A"), "127.0.0.1", 2, server.port)
    assert [rrset.to_text() for rrset in reply.answer] == [
        "Alias.Dnsserver.Test. 300 IN CNAME example.dnsserver.test.",
        "example.dnsserver.test. 300 IN A 192.0.2.1",
    ]


def test_a_2048_bit_key_fits_in_udp_as_two_character_strings(server):
    """Surprise for the DKIM tests: a 2048-bit key's answer is ~470 bytes, so it needs no TCP."""
    reply = dns.query.udp(dns.message.make_query("s2048._domainkey.dnsserver.test", "TXT"), "127.0.0.1", 2, server.port)
    assert not reply.flags & dns.flags.TC
    (txt,) = reply.answer[0]
    assert [len(s) for s in txt.strings] == [255, len(KEY_2048) - 255]
    assert b"".join(txt.strings).decode() == KEY_2048


def test_a_larger_txt_is_truncated_over_udp_and_complete_over_tcp(server):
    query = dns.message.make_query("s4096._domainkey.dnsserver.test", "TXT")
    udp = dns.query.udp(query, "127.0.0.1", 2, server.port)
    assert udp.flags & dns.flags.TC and not udp.answer
    assert udp.question == query.question  # else dnspython rejects it as not a response to its query
    tcp = dns.query.tcp(query, "127.0.0.1", 2, server.port)
    assert not tcp.flags & dns.flags.TC
    assert b"".join(tcp.answer[0][0].strings).decode() == KEY_4096


def test_the_resolver_retries_a_truncated_answer_over_tcp(server):
    for tcp in (False, True):
        answer = resolver(server).resolve("s4096._domainkey.dnsserver.test", "TXT", tcp=tcp)
        assert b"".join(answer[0].strings).decode() == KEY_4096


def test_an_edns_payload_lets_a_large_answer_through_udp(server):
    query = dns.message.make_query("s4096._domainkey.dnsserver.test", "TXT", use_edns=0, payload=1232)
    reply = dns.query.udp(query, "127.0.0.1", 2, server.port)
    assert not reply.flags & dns.flags.TC
    assert reply.edns == 0 and len(reply.answer) == 1


@pytest.mark.parametrize("name", ["missing.dnsserver.test", "x.example.dnsserver.test"])
def test_unknown_names_are_nxdomain(server, name):
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(server).resolve(name, "A")


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [("alias.dnsserver.test", "PTR"), ("example.dnsserver.test", "PTR"), ("_domainkey.dnsserver.test", "TXT")],
    ids=["cname-target-without-type", "name-without-type", "empty-non-terminal"],
)
def test_known_names_without_the_type_are_nodata(server, name, rdtype):
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(server).resolve(name, rdtype)


def test_servfail_names_answer_servfail_for_every_type(server):
    for rdtype in ("A", "TXT"):
        reply = dns.query.udp(dns.message.make_query("servfail.dnsserver.test", rdtype), "127.0.0.1", 2, server.port)
        assert reply.rcode() == dns.rcode.SERVFAIL
    with pytest.raises(dns.resolver.NoNameservers):
        resolver(server).resolve("servfail.dnsserver.test", "TXT")


def test_timeout_names_never_answer_over_udp_or_tcp(server):
    start = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver(server, lifetime=0.3).resolve("timeout.dnsserver.test", "TXT")
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(dns.message.make_query("timeout.dnsserver.test", "A"), "127.0.0.1", 0.2, server.port)
    assert time.monotonic() - start < 1.5


def test_update_serves_new_names_and_replaces_a_names_records(server):
    res = resolver(server)
    server.update({"new.dnsserver.test.": [["A", "192.0.2.7"], ["MX", "10 new.dnsserver.test."]]})
    assert values(res.resolve("new.dnsserver.test", "A")) == ["192.0.2.7"]
    server.update({"NEW.dnsserver.test.": [["A", "192.0.2.8"]]})
    assert values(res.resolve("new.dnsserver.test", "A")) == ["192.0.2.8"]
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("new.dnsserver.test", "MX")


def test_a_bad_update_raises_and_leaves_the_zone_alone(server):
    before = server.zone_path.read_text()
    with pytest.raises(ValueError):
        server.update({"bad.dnsserver.test.": [["A", "not-an-address"]]})
    with pytest.raises(ValueError, match="absolute"):
        server.update({"relative.dnsserver.test": [["A", "192.0.2.9"]]})
    assert server.zone_path.read_text() == before
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(server).resolve("bad.dnsserver.test", "A")
