"""The one DNS resolver every check uses (DKIM keys, SPF), built from the [dns] section.

It tells "no such record" (an empty answer) from "no answer" (DnsError): the first is a final
result (DKIM permerror, SPF none), the second a temporary one (temperror), so a dead or slow
resolver never makes mail look forged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dns.resolver


class DnsError(Exception):
    """A lookup that got no usable answer: timeout, SERVFAIL, refused, no nameserver at all."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` (a bare IPv6 address works too) -> (address, port)."""
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6] or [IPv6]:port")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: {port!r} is not a port number")
    return host, int(port)


class Resolver:
    """dnspython's resolver with our timeout and a cache, and the lookup shapes dkimpy and pyspf want.

    `timeout` bounds one lookup, every server and retry included; a caller may ask for less
    (what is left of its own deadline), never for more.
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 5.0, cache_size: int = 10000):
        """`cache_size`: answers kept, each for its TTL (the same keys and SPF records come back all day)."""
        import dns.nameserver  # dnspython, here rather than at the top: loading the config does not need it
        import dns.resolver

        if nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
        else:
            try:
                resolver = dns.resolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.resolver.Resolver(configure=False)  # no nameserver: every lookup is a DnsError
        resolver.lifetime = timeout
        resolver.cache = dns.resolver.LRUCache(cache_size)
        self._resolver = resolver
        self.timeout = timeout

    def lookup(self, name: str | bytes, rdtype: str, timeout: float | None = None) -> list:
        """The records of one type at `name` (CNAMEs followed): [] when the name or the type does not exist."""
        import dns.exception
        import dns.name
        import dns.resolver

        lifetime = self.timeout if timeout is None else min(timeout, self.timeout)
        if lifetime <= 0:
            raise DnsError("no time left for the lookup")
        try:
            qname = dns.name.from_text(name)  # absolute: no search list
        except (dns.exception.DNSException, UnicodeError):
            return []  # a name that cannot exist has no records
        try:
            answer = self._resolver.resolve(qname, rdtype, lifetime=lifetime, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout:
            raise DnsError(f"{qname} {rdtype}: no answer in {lifetime:g}s") from None
        except dns.resolver.NoNameservers as e:
            raise DnsError(f"{qname} {rdtype}: {_servers_said(e)}") from None
        except dns.exception.DNSException as e:
            raise DnsError(f"{qname} {rdtype}: {e}") from None
        return list(answer.rrset or ())

    def dkim_txt(self, name: bytes, timeout: float = 5.0) -> bytes:
        """dkimpy's `dnsfunc`: the first TXT record's strings joined, b"" when there is none; DnsError on failure."""
        records = self.lookup(name, "TXT", timeout)
        return b"".join(records[0].strings) if records else b""

    def spf_lookup(self, name: str, qtype: str, strict=True, timeout: float = 20.0) -> list:
        """pyspf's `DNSLookup`: [((name, qtype), value), ...]; DnsError on failure (SpfCheck makes it TempError)."""
        values = []
        for rdata in self.lookup(name, qtype, timeout):
            if qtype in ("A", "AAAA"):
                values.append(rdata.address)
            elif qtype == "MX":
                values.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
            elif qtype == "PTR":
                values.append(rdata.target.to_text(omit_final_dot=True))
            else:  # TXT, SPF: the strings of one record, which pyspf joins
                values.append(rdata.strings)
        return [((name, qtype), value) for value in values]


def _servers_said(error: dns.resolver.NoNameservers) -> str:
    """What each server answered (SERVFAIL, REFUSED, connection refused), or that there is no server."""
    errors = error.kwargs.get("errors") or []
    said = sorted({f"{server}#{port} {problem}" for server, _, port, problem, *_ in errors})
    return "; ".join(said) if said else "no nameserver configured"
