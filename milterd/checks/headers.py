"""Bad headers, as amavis' %allowed_header_tests: the header section's problems plus MIME framing errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..findings import Finding
from ..headers import bad_headers
from ..message import Message
from ..sanitize import printable
from . import Check, register

if TYPE_CHECKING:
    from ..mime import Walker


@dataclass(frozen=True)
class HeadersSettings:
    """amavis' bad-header tests (8-bit, control characters, long lines, syntax, missing, duplicates, MIME)."""

    enabled: bool = True
    critical: bool = False  # cannot answer: it adds nothing, and the log and the finding say why


@register(
    name="headers",
    bypass="bypass_header_checks",
    settings=HeadersSettings,
    order=40,
    build=lambda _, runtime: HeadersCheck(runtime.walker),
)
class HeadersCheck(Check):
    def __init__(self, walker: Walker):
        self.walker = walker  # the MIME framing errors come from the walk the banned check shares
        self.timeout = walker.limits.timeout + 5

    def run(self, message: Message) -> Finding:
        problems = bad_headers(message.header_section())
        problems += [f"MIME error: {defect}" for defect in message.inspect(self.walker).mime_defects]
        return self.finding("ok", bad_headers=tuple(printable(p, 200) for p in problems[:20]))
