"""The checks: one module each, registered once with everything the rest of milterd needs to know.

A check module declares, with `@register` on its Check class, its name, its settings dataclass (the
`[name]` section of milterd.toml is derived from it; its `critical` default says whether a failure
makes the message UNCHECKED), the checks it runs `after`, the rules/scores.toml tables it reads,
and a factory. Config validation, the pipeline,
`check-config` and `scan --json` enumerate the registry, so adding a check is one new file.

Check modules are imported to read their declarations whenever the config is loaded, so they
import nothing heavy at the top: their libraries (dkimpy, pyspf, pyzor, libmagic) are imported
where they are used.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from ..findings import Finding, Status
from ..message import Message

if TYPE_CHECKING:
    from ..config import Config
    from ..dns import Resolver
    from ..mime import Walker

# A scores table: key -> points, or key -> (symbol name, points); None: any key, each a number
ScoreTable = Mapping[str, float | tuple[str, float]] | None


class Check:
    """What the pipeline needs of a check; `@register` sets name and after, build_checks `critical`.

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


@dataclass(frozen=True)
class CheckSpec:
    """A check as registered: its declaration and how to build it."""

    name: str
    settings: type  # a frozen dataclass with `enabled`: the [name] section
    order: int  # where it starts, and where it stands in the log and in scan --json
    build: Callable[[Any, Runtime], Check]  # (its settings, the shared runtime) -> the check
    after: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # built only when these are enabled too (DMARC judges DKIM and SPF)
    scores: Mapping[str, ScoreTable] = field(default_factory=dict)  # the rules/scores.toml tables it reads
    bypass: str = ""  # the Policy flag that skips it for a recipient (amavis' bypass_*_checks)


_registered: dict[str, CheckSpec] = {}


def register(
    *,
    name: str,
    settings: type,
    order: int,
    build: Callable[[Any, Runtime], Check],
    after: tuple[str, ...] = (),
    needs: tuple[str, ...] = (),
    scores: Mapping[str, ScoreTable] | None = None,
    bypass: str = "",
):
    """Class decorator: declare a check once."""

    def declare(cls: type[Check]) -> type[Check]:
        cls.name, cls.critical, cls.after = name, settings().critical, after
        _registered[name] = CheckSpec(name, settings, order, build, after, needs, scores or {}, bypass)
        return cls

    return declare


@cache
def registry() -> Mapping[str, CheckSpec]:
    """Every check module's declaration, in start order."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return {spec.name: spec for spec in sorted(_registered.values(), key=lambda s: s.order)}


class Runtime:
    """What checks are built with beside their own settings, shared by the checks of one Engine.

    The resolver and the MIME walker are made when the first check asks for them.
    """

    def __init__(self, config: Config):
        self.config = config
        self.rules = config.rules

    @cached_property
    def resolver(self) -> Resolver:
        from ..dns import Resolver

        dns = self.config.dns
        return Resolver(dns.nameservers, dns.timeout, dns.cache_size)

    @cached_property
    def walker(self) -> Walker:
        """The MIME walk the banned and headers checks share, with [banned]'s limits."""
        from ..mime import Walker

        return Walker(self.config.check("banned"))

    def scores(self, table: str) -> Mapping[str, float]:
        return self.rules.scores[table]


def enabled(config: Config) -> list[CheckSpec]:
    """The checks this config turns on, those whose `needs` are on too, in start order."""
    on = {name for name, spec in registry().items() if config.check(name).enabled}
    return [spec for name, spec in registry().items() if name in on and on.issuperset(spec.needs)]


def unmet_needs(config: Config) -> list[str]:
    """Checks that are on but do not run because a check they need is off (DMARC without SPF)."""
    return [
        f"[{name}] is enabled but needs [{need}], which is off: {name} does not run"
        for name, spec in registry().items()
        if config.check(name).enabled
        for need in spec.needs
        if not config.check(need).enabled
    ]


def build_checks(config: Config, runtime: Runtime | None = None) -> list[Check]:
    """Every enabled check, in the order they are started."""
    runtime = runtime or Runtime(config)
    checks = []
    for spec in enabled(config):
        check = spec.build(config.check(spec.name), runtime)
        check.critical = config.check(spec.name).critical
        checks.append(check)
    return checks
