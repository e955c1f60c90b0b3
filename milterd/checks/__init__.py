"""The checks: one module each, one `run(message) -> Finding` entry point, built from the config."""

from __future__ import annotations

from collections.abc import Mapping

from ..findings import Finding, Status
from ..message import Message


class Check:
    """What the pipeline needs of a check.

    `after` names checks whose findings `skip_reason` and `run_after` want to see first (spamd
    waits for the virus scan, so an infected message never costs a SpamAssassin run; DMARC judges
    the DKIM and SPF results).
    """

    name: str = ""
    critical: bool = False  # a failure makes the message UNCHECKED
    after: tuple[str, ...] = ()
    timeout: float = 30.0

    def skip_reason(self, message: Message, earlier: Mapping[str, Finding]) -> str | None:
        return None

    def run(self, message: Message) -> Finding:
        raise NotImplementedError

    def run_after(self, message: Message, earlier: Mapping[str, Finding]) -> Finding:
        """What the pipeline calls, with the findings of the `after` checks: `run`, unless the check needs them.

        The findings come as an argument because one check object serves every message at once:
        nothing of one message may be kept on the check.
        """
        return self.run(message)

    def finding(self, status: Status, **details) -> Finding:
        return Finding(self.name, status, self.critical, **details)


def build_checks(config) -> list[Check]:
    """Every enabled check, in the order they are started."""
    from ..dns import Resolver
    from .banned import BannedCheck
    from .clamav import ClamavCheck
    from .dkim import DkimCheck
    from .dmarc import DmarcCheck
    from .headers import HeadersCheck
    from .razor import RazorCheck
    from .spamd import SpamdCheck
    from .spf import SpfCheck

    checks: list[Check] = []
    if config.clamav.enabled:
        checks.append(ClamavCheck(config.clamav.socket, config.clamav.timeout, config.clamav.max_size))
    if config.spamd.enabled:
        checks.append(SpamdCheck(config.spamd.address, config.spamd.timeout, config.spamd.max_size))
    if config.banned.enabled:
        checks.append(BannedCheck(config.rules.banned, config.banned))
    if config.headers.enabled:
        checks.append(HeadersCheck(config.banned))
    if config.dkim.enabled or config.spf.enabled:
        resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        if config.dkim.enabled:
            checks.append(DkimCheck(resolver.dkim_txt, config.dkim.timeout, config.dkim.max_size))
        if config.spf.enabled:
            checks.append(SpfCheck(resolver.spf_lookup, config.spf.timeout))
        if config.dkim.enabled and config.spf.enabled and config.dmarc.enabled:  # DMARC judges both results
            checks.append(DmarcCheck(resolver.lookup, config.dmarc.timeout))
    if config.pyzor.enabled:
        from .pyzor import PyzorCheck  # imports pyzor only when it is used

        pyzor, scoring = config.pyzor, config.rules.scores.collaborative["pyzor"]
        checks.append(PyzorCheck(pyzor.servers, pyzor.timeout, pyzor.max_size, scoring))
    if config.razor.enabled:
        razor, scoring = config.razor, config.rules.scores.collaborative["razor"]
        checks.append(RazorCheck(razor.command, razor.homedir, razor.timeout, scoring))
    if config.dcc.enabled:
        from .dcc import DccCheck

        checks.append(DccCheck(config.dcc.socket, config.dcc.timeout, config.rules.scores.collaborative["dcc"]))
    return checks
