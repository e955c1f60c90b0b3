"""`milterd check-config --show`: the effective settings, each with where it came from.

Built-in (Debian amavis' defaults), milterd.toml, a rules file, or SQL. With [sql], each query runs
once and every column it returns is named: used, or unknown and ignored. Passwords are never shown.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from .checks import registry
from .config import Config
from .lookups import RECIPIENT_FIELDS, LookupFailed, lookup_keys
from .policy import Policy
from .scores import default_scores

BUILTIN = "built-in"


def lines(config: Config, engine) -> Iterator[str]:
    """TOML-shaped lines, each setting followed by its source as a comment."""
    rules = config.rules
    where = str(config.path or "") or "milterd.toml"
    yield f"# {where}"
    for section in ("milter", "dns", "signing", "sql"):
        yield from _section(section, getattr(config, section), config)
    for name in registry():
        yield from _section(name, config.check(name), config)
    yield "\n# rules/policy.toml over the built-in defaults"
    for name in ("local_domains", "recipient_delimiter", "localpart_is_case_sensitive"):
        yield _line(name, getattr(rules, name), rules.sources.get(name, BUILTIN))
    for f in dataclasses.fields(Policy):
        if not f.metadata.get("internal"):
            yield _line(f.name, getattr(rules.policy, f.name), rules.sources.get(f.name, BUILTIN))
    for bank in rules.banks:
        match = {
            k: v
            for k, v in (
                ("daemon_name", list(bank.daemon_name)),
                ("originating", bank.originating),
                ("client_networks", [str(n) for n in bank.client_networks]),
            )
            if v not in ([], None)
        }
        source = BUILTIN if bank.name == "ORIGINATING" and not bank.overrides else "policy.toml"
        yield f"\n[[bank]]  # {source}\nname = {_value(bank.name)}"
        yield from (_line(k, v, "match") for k, v in match.items())
        yield from (_line(k, v, "override") for k, v in bank.overrides.items())
    operator = len(rules.banned) - len(_builtin_banned())
    yield f"\n# banned files: {operator} rules from rules/banned.toml, then {len(rules.banned) - operator} built in"
    yield "# " + ", ".join(rule.name for rule in rules.banned)
    defaults = default_scores()
    for table, keys in rules.scores.items():
        yield f"\n[scores.{table}]"
        for key, value in keys.items():
            yield _line(key, value, BUILTIN if defaults.get(table, {}).get(key) == value else "scores.toml")
    yield f"\n# rules/recipients.toml: {len(rules.recipients)} lookup keys; rules/senders.toml: "
    yield (
        f"#   {len(rules.senders.entries)} sender keys for everyone, "
        f"{len(rules.senders.by_recipient)} recipient keys with lists of their own"
    )
    yield from _sql(config, engine)


def _section(name: str, settings: Any, config: Config) -> Iterator[str]:
    yield f"\n[{name}]"
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if name == "sql" and f.name == "dsn" and value:
            value = engine_safe(value)
        yield _line(f.name, value, "milterd.toml" if f"{name}.{f.name}" in config.given else BUILTIN)


def engine_safe(dsn: str) -> str:
    """The DSN with its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(dsn).render_as_string(hide_password=True)
    except Exception:
        return "(not a URL)"


def _sql(config: Config, engine) -> Iterator[str]:
    sql = engine.lookups.sql
    if sql is None:
        return
    domain = (config.rules.local_domains or ("example.com",))[0].lstrip(".")
    keys = lookup_keys(f"postmaster@{domain}", config.rules.recipient_delimiter)
    yield f"\n# [sql] on {sql.where}: select_policy for postmaster@{domain}"
    try:
        columns = sql.columns(keys)
        row = sql.policy(keys)
    except LookupFailed as e:
        yield f"# FAILED: {e}"
        return
    for column in columns:
        use = RECIPIENT_FIELDS.get(column) or {
            "local": "local",
            "id": "the recipient's id for select_white_black_list",
        }.get(column)
        yield f"#   {column}: " + (f"sets {use}" if use else "unknown to milterd: ignored")
    yield f"#   row: {'none (not in the database)' if row is None else json.dumps({k: str(v) for k, v in row.items()})}"
    if config.sql.select_white_black_list:
        try:
            sql.white_black(row.get("id") if row else 0, lookup_keys(f"postmaster@{domain}"))
            yield "# select_white_black_list: runs"
        except LookupFailed as e:
            yield f"# select_white_black_list FAILED: {e}"


def _builtin_banned():
    from .checks.banned import load_rules

    return load_rules(None)


def _line(name: str, value: Any, source: str) -> str:
    return f"{name} = {_value(value)}  # {source}"


def _value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return (
            "{ " + ", ".join(f"{f.name} = {_value(getattr(value, f.name))}" for f in dataclasses.fields(value)) + " }"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
