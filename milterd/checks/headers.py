"""Bad headers, as amavis' %allowed_header_tests: the header section's problems plus MIME framing errors."""

from __future__ import annotations

from ..findings import Finding
from ..headers import bad_headers
from ..message import Message
from ..mime import Limits
from ..sanitize import printable
from . import Check


class HeadersCheck(Check):
    name = "headers"

    def __init__(self, limits: Limits):
        self.limits = limits  # the MIME framing errors come from the walker the banned check shares
        self.timeout = limits.timeout + 5

    def run(self, message: Message) -> Finding:
        problems = bad_headers(message.header_section())
        problems += [f"MIME error: {defect}" for defect in message.inspect(self.limits).mime_defects]
        return self.finding("ok", bad_headers=tuple(printable(p, 200) for p in problems[:20]))
