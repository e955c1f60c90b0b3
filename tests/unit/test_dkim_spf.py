"""DKIM and SPF checks against stubbed DNS: every result, with messages signed here at run time."""

from __future__ import annotations

import io
import re
import socket
import time
from pathlib import Path

import pytest

from milterd.checks import build_checks
from milterd.checks.dkim import MAX_SIGNATURES, DkimCheck, DkimSettings
from milterd.checks.spf import SpfCheck, SpfSettings
from milterd.config import DnsSettings, load_config
from milterd.dns import DnsError, Resolver, parse_nameserver
from milterd.message import Envelope, Message, Spool
from milterd.tomlschema import ConfigError
from tests import dkimkeys

DOMAIN = "example.com"


class Keys:
    """A dnsfunc stub: key records by name, b"" for any other name, DnsError for the names in `failing`."""

    def __init__(self, records: dict[str, str], failing: tuple[str, ...] = ()):
        self.records = {name.encode(): value.encode() for name, value in records.items()}
        self.failing = {name.encode() for name in failing}
        self.asked: list[bytes] = []

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes:
        self.asked.append(name)
        if name in self.failing:
            raise DnsError(f"{name.decode()} TXT: SERVFAIL")
        return self.records.get(name, b"")


def message(data: bytes, **envelope) -> Message:
    return Message(Envelope(**envelope), Spool.copy_of(io.BytesIO(data)))


def verify(data: bytes, keys: Keys, **options):
    finding = DkimCheck(keys, **options).run(message(data))
    assert finding.status == "ok" and not finding.critical
    return [(d.result, d.domain, d.selector, d.algorithm) for d in finding.data], [d.detail for d in finding.data]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        {
            "sel._domainkey.example.com.": dkimkeys.rsa(2048).record,
            "small._domainkey.example.com.": dkimkeys.rsa(1024).record,
            "ed._domainkey.example.com.": dkimkeys.ed25519().record,
            "revoked._domainkey.example.com.": "v=DKIM1; k=rsa; p=",
            "junk._domainkey.example.com.": "v=DKIM1; k=rsa; p=bm90IGEga2V5",
        }
    )


# --------------------------------------------------------------------------- DKIM


@pytest.mark.parametrize("bits,selector", [(2048, "sel"), (1024, "small")])
@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"simple"), (b"simple", b"simple"), (b"relaxed", b"relaxed")])
def test_rsa_signature_passes(keys, bits, selector, canonicalize):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(bits), DOMAIN, selector, canonicalize)
    assert verify(signed, keys)[0] == [("pass", DOMAIN, selector, "rsa-sha256")]


def test_ed25519_signature_passes(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.ed25519(), DOMAIN, "ed")
    assert verify(signed, keys) == ([("pass", DOMAIN, "ed", "ed25519-sha256")], [""])


def test_body_changed_after_signing_fails(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN)
    results, details = verify(signed.replace(b"the report is", b"the invoice is"), keys)
    assert results == [("fail", DOMAIN, "sel", "rsa-sha256")] and details == ["body hash mismatch"]


def test_signed_header_changed_after_signing_fails(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN)
    results, details = verify(signed.replace(b"Subject: report", b"Subject: invoice"), keys)
    assert results == [("fail", DOMAIN, "sel", "rsa-sha256")] and details == ["signature did not verify"]


def test_selector_without_a_record_is_permerror(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN, "gone")
    results, details = verify(signed, keys)
    assert results == [("permerror", DOMAIN, "gone", "rsa-sha256")]
    assert details == ["no key record at gone._domainkey.example.com."]


@pytest.mark.parametrize(
    "selector,detail",
    [
        ("revoked", "key revoked (empty p=) at revoked._domainkey.example.com."),
        ("junk", "bad key record at junk._domainkey.example.com.: could not parse RSA public key"),
    ],
)
def test_revoked_or_malformed_key_is_permerror(keys, selector, detail):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN, selector)
    assert verify(signed, keys) == ([("permerror", DOMAIN, selector, "rsa-sha256")], [detail])


def test_dns_failure_is_temperror_not_permerror():
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN)
    results, details = verify(signed, Keys({}, failing=("sel._domainkey.example.com.",)))
    assert results == [("temperror", DOMAIN, "sel", "rsa-sha256")]
    assert details == ["key lookup: sel._domainkey.example.com. TXT: SERVFAIL"]


def test_every_signature_gets_its_own_result_in_header_order(keys):
    """An Ed25519 + RSA pair, as RFC 8463 suggests, plus a third signature whose key is gone."""
    data = dkimkeys.message()
    signed = dkimkeys.sign(
        dkimkeys.sign(dkimkeys.sign(data, dkimkeys.ed25519(), DOMAIN, "ed"), dkimkeys.rsa(), DOMAIN),
        dkimkeys.rsa(),
        "other.example",
        "x",
    )
    assert verify(signed, keys)[0] == [
        ("permerror", "other.example", "x", "rsa-sha256"),
        ("pass", DOMAIN, "sel", "rsa-sha256"),
        ("pass", DOMAIN, "ed", "ed25519-sha256"),
    ]


def test_a_key_is_looked_up_once_per_message(keys):
    data = dkimkeys.message()
    signed = dkimkeys.sign(dkimkeys.sign(data, dkimkeys.rsa(), DOMAIN), dkimkeys.rsa(), DOMAIN)
    counting = Keys({"sel._domainkey.example.com.": dkimkeys.rsa().record})
    assert verify(signed, counting)[0] == [("pass", DOMAIN, "sel", "rsa-sha256")] * 2
    assert counting.asked == [b"sel._domainkey.example.com."]


def test_l_tag_covers_part_of_the_body_so_appended_text_still_passes(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN, length=True)
    assert b" l=" in signed or b";l=" in signed
    assert verify(signed + b"-- \r\nappended by a mailing list\r\n", keys)[0][0][0] == "pass"


def test_no_signature_is_ok_with_no_results(keys):
    finding = DkimCheck(keys).run(message(dkimkeys.message()))
    assert (finding.status, finding.data, finding.detail) == ("ok", (), "")


@pytest.mark.parametrize(
    "edit,detail",
    [
        ((rb"DKIM-Signature: v=1;", b"DKIM-Signature: v=1; x=1000000000;"), "x= value is past"),
        ((rb" t=\d+;", b" t=9999999999;"), "t= value is in the future"),
        ((rb" h=[^;]+;", b" h=to : subject;"), "From is not signed"),
        ((rb"a=rsa-sha256", b"a=rsa-md5"), "unknown signature algorithm: b'rsa-md5'"),
        ((rb" d=example.com;", b""), "missing b'd'="),
    ],
)
def test_unacceptable_signatures_are_permerror(keys, edit, detail):
    """Expired (RFC 6376 6.1.1 PERMFAIL, not "fail": nothing says the content changed), syntax, policy."""
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN)
    edited, count = re.subn(edit[0], edit[1], signed, count=1)
    assert count == 1
    results, details = verify(edited, keys)
    assert [r[0] for r in results] == ["permerror"] and details == [detail]


def test_rsa_sha1_is_not_accepted(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN, algorithm=b"rsa-sha1")
    assert verify(signed, keys) == ([("permerror", DOMAIN, "sel", "rsa-sha1")], ["rsa-sha1 is not accepted (RFC 8301)"])


def test_key_under_1024_bits_is_permerror():
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(512), DOMAIN)
    results, details = verify(signed, Keys({"sel._domainkey.example.com.": dkimkeys.rsa(512).record}))
    assert results[0][0] == "permerror" and details == ["public key too small: 512"]


def test_garbage_signature_header_is_permerror_with_what_could_be_read(keys):
    data = b"DKIM-Signature: v=1; d=example.com; s=sel; oops\r\n" + dkimkeys.message()
    assert verify(data, keys)[0] == [("permerror", "", "", "")]


def test_only_the_first_signatures_are_verified(keys):
    signed = dkimkeys.message()
    for _ in range(MAX_SIGNATURES + 2):
        signed = dkimkeys.sign(signed, dkimkeys.ed25519(), DOMAIN, "ed")
    finding = DkimCheck(keys).run(message(signed))
    assert len(finding.data) == MAX_SIGNATURES and finding.detail == "2 more signatures not verified"


def test_larger_than_max_size_is_skipped(keys):
    signed = dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN)
    finding = DkimCheck(keys, max_size=100).run(message(signed))
    assert finding.status == "skipped" and finding.detail.startswith("larger than max_size")


@pytest.mark.parametrize(
    "data",
    [
        b"DKIM-Signature: v=1; d=x\r\nSubject : spaced\r\n\r\nbody\r\n",
        b" continued first\r\nDKIM-Signature: v=1; d=x\r\nSubject: x\r\n\r\n",
    ],
)
def test_header_section_dkimpy_cannot_split_is_ok_without_results(keys, data):
    finding = DkimCheck(keys).run(message(data))
    assert finding.status == "ok" and finding.data == () and "header section not parsed" in finding.detail


@pytest.mark.parametrize(
    "edit,detail",
    [
        ((rb" b=", b" b=b; b="), "malformed tag list: DuplicateTag b'b'"),
        ((rb"bh=\w", b"bh=="), "malformed signature: Error: Incorrect padding"),
    ],
)
def test_hostile_signature_values_are_permerror_and_do_not_spoil_the_others(keys, edit, detail):
    """dkimpy lets base64 and index errors out on hostile values; the other signatures still count."""
    inner = dkimkeys.sign(dkimkeys.message(), dkimkeys.ed25519(), DOMAIN, "ed")
    outer = dkimkeys.sign(inner, dkimkeys.rsa(), DOMAIN)
    top = outer[: len(outer) - len(inner)]
    edited, count = re.subn(edit[0], edit[1], top.rstrip(b"\r\n"), count=1, flags=re.M)
    assert count == 1
    results, details = verify(edited + b"\r\n" + inner, keys)
    assert [r[0] for r in results] == ["permerror", "pass"] and details[0] == detail


# --------------------------------------------------------------------------- the resolver


@pytest.fixture
def silent_server():
    """A UDP socket that never answers: a dead resolver."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_a_dead_resolver_costs_the_dns_timeout_and_gives_temperror(silent_server):
    """Two signatures from different domains: the first waits out [dns] timeout, the second finds the
    check's own budget gone; the message never waits for the pipeline's deadline."""
    data = dkimkeys.sign(dkimkeys.sign(dkimkeys.message(), dkimkeys.rsa(), DOMAIN), dkimkeys.rsa(), "b.example")
    check = DkimCheck(Resolver([silent_server], timeout=0.3).dkim_txt, timeout=0.4)
    t0 = time.monotonic()
    finding = check.run(message(data))
    elapsed = time.monotonic() - t0
    assert [d.result for d in finding.data] == ["temperror", "temperror"]
    assert finding.data[0].detail == "key lookup: sel._domainkey.b.example. TXT: no answer in 0.3s"
    assert finding.data[1].detail == "key lookup: no time left for the lookup"
    assert elapsed < check.timeout


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_nameserver_forms(text, expected):
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:", "127.0.0.1:99999", "[::1", "[::1]5353", "[x]:53"])
def test_bad_nameservers_are_refused(text):
    with pytest.raises(ValueError):
        parse_nameserver(text)


# --------------------------------------------------------------------------- config


def config(tmp_path: Path, text: str):
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "milterd.toml").write_text(text)
    return load_config(tmp_path / "milterd.toml")


def test_dns_dkim_spf_sections(tmp_path):
    loaded = config(
        tmp_path,
        '[dns]\nnameservers = ["127.0.0.1:5353", "[::1]"]\ntimeout = 1.5\n'
        "[dkim]\ntimeout = 3\nmax_size = 1000\n[spf]\nenabled = false\n",
    )
    assert loaded.dns.nameservers == ("127.0.0.1:5353", "[::1]") and loaded.dns.timeout == 1.5
    assert (loaded.dkim.enabled, loaded.dkim.timeout, loaded.dkim.max_size) == (True, 3.0, 1000)
    checks = {check.name: check for check in build_checks(loaded)}
    assert "dkim" in checks and "spf" not in checks
    assert checks["dkim"].timeout > loaded.dkim.timeout  # the pipeline waits past the DNS budget


@pytest.mark.parametrize(
    "text,message",
    [
        ('[dns]\nnameservers = ["ns.example"]\n', "dns.nameservers: 'ns.example': 'ns.example' is not an IP address"),
        ("[dns]\ntimeout = 0\n", "dns.timeout must be above zero"),
        ("[dkim]\nmax_size = 0\n", "dkim.max_size must be above zero"),
        ("[spf]\ntimeout = 'x'\n", "spf.timeout must be a number"),
        ("[spf]\nhelo = true\n", "unknown key spf.helo"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(tmp_path, text)


def test_the_example_config_shows_the_defaults():
    shipped = load_config(Path(__file__).resolve().parents[2] / "systemd" / "milterd.toml")
    assert (shipped.dns, shipped.dkim, shipped.spf) == (DnsSettings(), DkimSettings(), SpfSettings())


# --------------------------------------------------------------------------- SPF


class Zone:
    """pyspf's DNSLookup as a stub: records by (name, type); DnsError for names in `failing`."""

    def __init__(self, records: dict[tuple[str, str], list], failing: tuple[str, ...] = ()):
        self.records, self.failing = records, failing
        self.asked: list[tuple[str, str]] = []

    def __call__(self, name, qtype, strict=True, timeout=20):
        self.asked.append((name, qtype))
        if name in self.failing:
            raise DnsError(f"{name} {qtype}: SERVFAIL")
        return [((name, qtype), value) for value in self.records.get((name, qtype), [])]


def txt(record: str) -> list:
    return [(record.encode(),)]


SPF_ZONE = Zone(
    {
        ("pass.example", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all"),
        ("fail.example", "TXT"): txt("v=spf1 -all"),
        ("softfail.example", "TXT"): txt("v=spf1 ~all"),
        ("neutral.example", "TXT"): txt("v=spf1 ?all"),
        ("broken.example", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 bogus -all"),
        ("a.example", "TXT"): txt("v=spf1 a -all"),
        ("a.example", "A"): ["192.0.2.7"],
        ("mx.example", "TXT"): txt("v=spf1 mx -all"),
        ("mx.example", "MX"): [(10, "mail.mx.example")],
        ("mail.mx.example", "A"): ["192.0.2.8"],
        ("mx.helo.example", "TXT"): txt("v=spf1 ip4:192.0.2.9 -all"),
        ("many.example", "TXT"): txt("v=spf1 " + " ".join(f"include:i{n}.many.example" for n in range(11)) + " -all"),
        **{(f"i{n}.many.example", "TXT"): txt("v=spf1 ip4:203.0.113.1 -all") for n in range(11)},
        ("down.example", "TXT"): txt("v=spf1 include:dead.example -all"),
    },
    failing=("dead.example", "fails.example"),
)


def spf(mail_from: str, client_ip: str = "192.0.2.1", helo: str = "mx.helo.example"):
    finding = SpfCheck(SPF_ZONE, timeout=2).run(message(b"", mail_from=mail_from, client_ip=client_ip, helo=helo))
    assert finding.status == "ok" and not finding.critical
    return finding.data


@pytest.mark.parametrize(
    "sender,client_ip,result",
    [
        ("a@pass.example", "192.0.2.1", "pass"),
        ("a@pass.example", "198.51.100.1", "fail"),
        ("a@fail.example", "192.0.2.1", "fail"),
        ("a@softfail.example", "192.0.2.1", "softfail"),
        ("a@neutral.example", "192.0.2.1", "neutral"),
        ("a@norecord.example", "192.0.2.1", "none"),
        ("a@broken.example", "192.0.2.1", "permerror"),
        ("a@a.example", "192.0.2.7", "pass"),
        ("a@mx.example", "192.0.2.8", "pass"),
        ("a@mx.example", "2001:db8::8", "fail"),
        ("a@fails.example", "192.0.2.1", "temperror"),
        ("a@down.example", "192.0.2.1", "temperror"),
    ],
)
def test_spf_results_for_the_envelope_sender(sender, client_ip, result):
    got = spf(sender, client_ip)
    assert (got.result, got.identity, got.domain) == (result, "mailfrom", sender.split("@")[1])


def test_more_than_ten_lookups_is_permerror():
    got = spf("a@many.example", "198.51.100.1")
    assert got.result == "permerror" and "Too many DNS lookups" in got.detail


def test_temperror_says_what_failed():
    assert spf("a@fails.example").detail == "SPF Temporary Error: DNS fails.example TXT: SERVFAIL"


def test_null_sender_checks_the_helo_name():
    got = spf("", "192.0.2.9", helo="mx.helo.example")
    assert (got.result, got.identity, got.domain) == ("pass", "helo", "mx.helo.example")


@pytest.mark.parametrize("helo", ["[192.0.2.9]", "localhost"])
def test_a_helo_that_is_not_a_domain_name_is_none_without_a_lookup(helo):
    asked = len(SPF_ZONE.asked)
    got = spf("", "192.0.2.9", helo=helo)
    assert (got.result, got.identity, got.detail) == ("none", "helo", "not a domain name")
    assert len(SPF_ZONE.asked) == asked


@pytest.mark.parametrize(
    "envelope,detail",
    [
        ({}, "no client address (scan without --client-ip)"),
        ({"client_ip": "192.0.2.1", "auth_user": "alice"}, "SASL-authenticated client"),
        ({"client_ip": "127.0.0.1"}, "client on loopback"),  # Postfix's pickup: sendmail(1)
        ({"client_ip": "::1"}, "client on loopback"),
    ],
)
def test_spf_is_skipped_without_a_remote_unauthenticated_client(envelope, detail):
    finding = SpfCheck(SPF_ZONE).run(message(b"", mail_from="a@fail.example", **envelope))
    assert (finding.status, finding.detail, finding.data) == ("skipped", detail, None)


def test_a_client_address_that_is_not_an_ip_is_an_error():
    finding = SpfCheck(SPF_ZONE).run(message(b"", mail_from="a@pass.example", client_ip="unknown"))
    assert finding.status == "error" and "client address unknown" in finding.detail


def test_two_checks_in_two_threads_use_their_own_lookups():
    """pyspf's module-level DNSLookup is shared; the dispatcher sends each check to its own resolver."""
    from concurrent.futures import ThreadPoolExecutor

    other = Zone({("pass.example", "TXT"): txt("v=spf1 -all")})
    checks = [SpfCheck(SPF_ZONE), SpfCheck(other)] * 10
    env = {"mail_from": "a@pass.example", "client_ip": "192.0.2.1", "helo": "h.example"}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: c.run(message(b"", **env)).data.result, checks))
    assert results == ["pass", "fail"] * 10
