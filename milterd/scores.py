"""rules/scores.toml: the spam points and thresholds the checks read, over the defaults each declares.

Every check registers the tables it reads (SPF, DKIM and DMARC points under SpamAssassin's names
and values, so an X-Spam-Status reads as it did when SpamAssassin ran these tests; Pyzor, Razor and
DCC thresholds). A table given here replaces only the keys it names. Turn SpamAssassin's SPF, DKIM
and DMARC plugins off when milterd scores them, or they count twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .checks import ScoreTable, registry
from .tomlschema import ConfigError

Scores = Mapping[str, Mapping[str, float]]  # table -> key -> number


def _tables() -> dict[str, ScoreTable]:
    return {table: keys for spec in registry().values() for table, keys in spec.scores.items()}


def default_scores() -> Scores:
    return {
        table: {key: value[1] if isinstance(value, tuple) else value for key, value in (keys or {}).items()}
        for table, keys in _tables().items()
    }


def parse_scores(data: dict, path: Path) -> Scores:
    """Any of the registered tables, each key a number; what is missing keeps its default."""
    tables = _tables()
    scores = {table: dict(keys) for table, keys in default_scores().items()}
    for table, values in data.items():
        if table not in tables:
            raise ConfigError(f"{path}: unknown table [{table}] (known: {', '.join(tables)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
        known = tables[table]
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path}: {table}.{key} must be a number, not {value!r}")
            if known is None:  # any key: a domain name
                scores[table][key.lower().rstrip(".")] = float(value)
            elif key not in known:
                raise ConfigError(f"{path}: unknown key {table}.{key} (known: {', '.join(known)})")
            else:
                scores[table][key] = float(value)
    return scores
