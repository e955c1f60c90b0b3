"""Banned files: ordered allow/ban rules over every MIME part and archive member, as amavis' banned rules.

For each part, the rules are tried in order against the part and every node above it (the archive it
came from, and so on up to the MIME leaf); the first rule that matches any of them decides. So an
`allow` for zip files placed before the bans allows everything inside zips, as in amavis.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..findings import Finding
from ..message import Message
from ..sanitize import printable
from ..tomlschema import POSITIVE, ConfigError, read_toml
from . import Check, register

if TYPE_CHECKING:
    from ..mime import Inspection, Part, Walker


@dataclass(frozen=True)
class BannedSettings:
    """[banned]: the banned-file check, and the MIME walk it shares with the headers check.

    The unpacking limits are amavis' ($MAXLEVELS, $MAXFILES, the expansion quota), Debian's values.
    """

    enabled: bool = True
    critical: bool = True  # cannot answer: the message is UNCHECKED (then scanner_failure decides)
    max_levels: int = 14  # $MAXLEVELS: nesting depth (MIME message/rfc822 nesting + archive levels)
    max_files: int = 1500  # $MAXFILES: parts + archive members in total
    min_expansion_quota: int = 100 * 1024
    max_expansion_quota: int = 300 * 1024 * 1024
    min_expansion_factor: int = 5
    max_expansion_factor: int = 500  # quota = max(min_quota, size*min_factor, min(max_quota, size*max_factor))
    timeout: float = 30.0  # seconds for the whole walk
    # The email package holds a parsed message in memory (about 3x its size): larger ones are not
    # walked but UNCHECKED, as clamd's StreamMaxLength, so memory stays flat for a 50 MB message.
    max_size: int = 25 * 1024 * 1024
    walk_slots: int = field(default=2, metadata=POSITIVE)  # messages walked at once (Python: the GIL bounds it)
    magic_handles: int = field(default=4, metadata=POSITIVE)  # libmagic handles the walks share
    spill_dir: str = ""  # where archive members past 64 KiB that are archives themselves go ("" = the temp dir)
    # Debian's unar/lsar read what libarchive cannot (ARJ, BinHex, zoo, ARC, StuffIt, deflate64 and
    # implode zip members), as amavis runs external decoders; "" = those stay UNCHECKED.
    unar_command: str = "unar"
    lsar_command: str = "lsar"


# Right-to-left override and friends (the "invoice_exe.pdf" trick), NUL and other C0/C1 controls.
_DECEPTIVE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONDITIONS = ("name_glob", "name_regex", "declared_type", "real_type", "in_archive", "deceptive_name")


@dataclass(frozen=True)
class BannedRule:
    """One rule: every condition given must hold. Globs and regexes ignore case."""

    name: str
    ban: bool
    name_glob: tuple[str, ...] = ()
    name_regex: re.Pattern | None = None
    declared_type: tuple[str, ...] = ()  # globs on the declared Content-Type, e.g. "application/x-ms*"
    real_type: tuple[str, ...] = ()  # globs on the libmagic type
    in_archive: bool | None = None
    deceptive_name: bool | None = None  # a name with bidirectional or control characters

    def matches(self, part: Part) -> bool:
        name = part.name.lower()
        return (
            (not self.name_glob or any(fnmatch.fnmatchcase(name, g) for g in self.name_glob))
            and (self.name_regex is None or bool(self.name_regex.search(part.name)))
            and (not self.declared_type or any(fnmatch.fnmatchcase(part.declared_type, g) for g in self.declared_type))
            and (not self.real_type or any(fnmatch.fnmatchcase(part.real_type, g) for g in self.real_type))
            and (self.in_archive is None or part.in_archive == self.in_archive)
            and (self.deceptive_name is None or bool(_DECEPTIVE.search(part.name)) == self.deceptive_name)
        )


# Built in, before the operator's rules: nobody has a legitimate reason for these names.
DECEPTIVE_NAMES = BannedRule("deceptive-name", ban=True, deceptive_name=True)


BUILTIN = Path(__file__).resolve().parent.parent / "defaults" / "banned.toml"


def parse_rules(data: dict, path: Path) -> tuple[BannedRule, ...]:
    """`[[rule]]` tables of a banned.toml, in order; every key and value checked."""
    unknown = sorted(set(data) - {"rule", "builtin"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]} (rules are [[rule]] tables)")
    tables = data.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: rule must be an array of tables ([[rule]])")
    return tuple(_parse_rule(table, f"{path}: rule {n}") for n, table in enumerate(tables, 1))


def load_rules(path: Path | None) -> tuple[BannedRule, ...]:
    """The operator's rules (`path`, when it exists) before the built-in list, unless it says `builtin = false`."""
    builtin = parse_rules(read_toml(BUILTIN), BUILTIN)
    if path is None or not path.exists():
        return builtin
    data = read_toml(path)
    keep = data.get("builtin", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"{path}: builtin must be true or false")
    return parse_rules(data, path) + (builtin if keep else ())


def _parse_rule(table: dict, where: str) -> BannedRule:
    table = dict(table)
    name, action = table.pop("name", None), table.pop("action", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name})"
    if action not in ("allow", "ban"):
        raise ConfigError(f'{where}: action must be "allow" or "ban"')
    unknown = sorted(set(table) - set(_CONDITIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]} (known: {', '.join(_CONDITIONS)})")
    if not table:
        raise ConfigError(f"{where}: a rule needs at least one condition")
    values: dict = {}
    for key in ("name_glob", "declared_type", "real_type"):
        if key in table:
            globs = table[key] if isinstance(table[key], list) else [table[key]]
            if not globs or not all(isinstance(g, str) and g for g in globs):
                raise ConfigError(f"{where}: {key} must be a string or a list of strings")
            values[key] = tuple(g.lower() for g in globs)
    if "name_regex" in table:
        try:
            values["name_regex"] = re.compile(table["name_regex"], re.IGNORECASE)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{where}: name_regex: {e}") from None
    for key in ("in_archive", "deceptive_name"):
        if key in table:
            if not isinstance(table[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false")
            values[key] = table[key]
    return BannedRule(name=name, ban=action == "ban", **values)


def banned_parts(inspection: Inspection, rules: Sequence[BannedRule]) -> list[tuple[Part, BannedRule]]:
    """Each banned part with the rule that banned it, in the order the walker found them."""
    by_path = {part.path: part for part in inspection.parts}
    banned = []
    for part in inspection.parts:
        lineage = [part] + [by_path[p] for p in _ancestor_paths(part.path) if p in by_path]
        for rule in rules:
            if any(rule.matches(node) for node in lineage):
                if rule.ban:
                    banned.append((part, rule))
                break
    return banned


def _ancestor_paths(path: str) -> list[str]:
    """'a.zip/docs/x.exe' -> ['a.zip/docs', 'a.zip']: the paths a containing node may have."""
    pieces = path.split("/")
    return ["/".join(pieces[:n]) for n in range(len(pieces) - 1, 0, -1)]


# critical: a message we could not look inside is UNCHECKED, never CLEAN
@register(
    name="banned",
    bypass="bypass_banned_checks",
    settings=BannedSettings,
    order=30,
    build=lambda settings, runtime: BannedCheck(runtime.rules.banned, runtime.walker),
)
class BannedCheck(Check):
    def __init__(self, rules: Sequence[BannedRule], walker: Walker):
        self.rules = (DECEPTIVE_NAMES, *rules)
        self.walker = walker
        self.timeout = walker.limits.timeout + 5  # the walker stops itself at limits.timeout

    def run(self, message: Message) -> Finding:
        inspection = message.inspect(self.walker)
        banned = tuple((printable(part.path, 200), rule.name) for part, rule in banned_parts(inspection, self.rules))
        detail = printable("; ".join(inspection.unchecked), 500)
        return self.finding("unchecked" if inspection.unchecked else "ok", detail=detail, banned=banned)
