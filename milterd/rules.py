"""The operator's rules directory, layered over the package's built-in (Debian amavis') defaults.

The defaults live in the package (policy.Policy, checks/*.py's score tables, defaults/banned.toml);
each rules file holds only what the operator changed, so an upgrade never clobbers an operator file:
- policy.toml: levels, destinies, Subject tags, local_domains, recipient_delimiter, [[bank]]s;
- banned.toml: banned-file rules, tried before the built-in list;
- scores.toml: points and thresholds of the checks' tests;
- recipients.toml: per-recipient settings by amavis lookup key (what amavis' SQL policy table holds);
- senders.toml: sender white/blacklists and scores, for everyone or per recipient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .checks.banned import BannedRule
from .checks.banned import load_rules as load_banned
from .lookups import (
    ORIGINATING,
    Bank,
    SenderLists,
    is_local_domain,
    parse_bank,
    parse_recipients,
    parse_senders,
)
from .policy import Policy
from .quarantine import CATEGORIES
from .scores import Scores, default_scores, parse_scores
from .tomlschema import ConfigError, build, read_toml

RULE_FILES = ("policy.toml", "banned.toml", "scores.toml", "recipients.toml", "senders.toml")
BUILTIN = "built-in"


@dataclass(frozen=True)
class Rules:
    policy: Policy = field(default_factory=Policy)  # policy.toml over the built-in defaults
    local_domains: tuple[str, ...] = ()  # "example.com" exactly, ".example.org" and its subdomains
    recipient_delimiter: str = ""  # amavis' $recipient_delimiter: "+" makes user+ext@ look up user@ too
    localpart_is_case_sensitive: bool = False
    banks: tuple[Bank, ...] = field(default_factory=lambda: (_builtin_originating(),))  # ORIGINATING first
    recipients: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # lookup key -> settings
    senders: SenderLists = field(default_factory=SenderLists)
    banned: tuple[BannedRule, ...] = field(default_factory=lambda: load_banned(None))  # the first match decides
    scores: Scores = field(default_factory=default_scores)  # points and thresholds, per table
    # where each setting came from, for check-config --show: "policy.toml" or "built-in"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    policy_data: Mapping[str, Any] = field(default_factory=dict, compare=False)  # policy.toml's settings
    _bank_policies: dict = field(default_factory=dict, compare=False, repr=False)

    def is_local(self, address: str) -> bool:
        return is_local_domain(address, self.local_domains)

    def bank_policy(self, banks: tuple[str, ...]) -> Policy:
        """policy.toml with the named banks' settings over it, in order; made once per combination."""
        if not banks:
            return self.policy
        if banks not in self._bank_policies:
            data = dict(self.policy_data)
            for bank in self.banks:
                if bank.name in banks:
                    data = _merged(data, bank.overrides)
            policy = build(Policy, data, Path("policy.toml"))
            self._bank_policies[banks] = replace(policy, bank="/".join(banks), source="policy.toml")
        return self._bank_policies[banks]


def load_rules(directory: Path | None) -> Rules:
    """Read the rules directory (None: the package defaults only)."""
    if directory is None:
        return Rules()
    unknown = sorted(p.name for p in directory.glob("*.toml") if p.name not in RULE_FILES)
    if unknown:
        raise ConfigError(f"{directory / unknown[0]}: unknown rules file (known: {', '.join(RULE_FILES)})")
    scores_path = directory / "scores.toml"
    recipients_path = directory / "recipients.toml"
    senders_path = directory / "senders.toml"
    rules = dict(
        banned=load_banned(directory / "banned.toml"),
        scores=parse_scores(read_toml(scores_path), scores_path) if scores_path.exists() else default_scores(),
        recipients=parse_recipients(read_toml(recipients_path), recipients_path) if recipients_path.exists() else {},
        senders=parse_senders(read_toml(senders_path), senders_path) if senders_path.exists() else SenderLists(),
    )
    path = directory / "policy.toml"
    data = read_toml(path) if path.exists() else {}
    given = set(data)
    domains = data.pop("local_domains", [])
    if "local" in data:
        raise ConfigError(f"{path}: unknown key local (use local_domains)")
    if not isinstance(domains, list) or not all(isinstance(d, str) and d.strip(".") for d in domains):
        raise ConfigError(f"{path}: local_domains must be a list of domain names")
    delimiter = data.pop("recipient_delimiter", "")
    if not isinstance(delimiter, str) or len(delimiter) > 8 or any(c in delimiter for c in "@ \t"):
        raise ConfigError(f'{path}: recipient_delimiter must be a few characters such as "+" or "+-"')
    case = data.pop("localpart_is_case_sensitive", False)
    if not isinstance(case, bool):
        raise ConfigError(f"{path}: localpart_is_case_sensitive must be true or false")
    tables = data.pop("bank", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: bank must be an array of tables ([[bank]])")
    policy = replace(build(Policy, data, path), source="policy.toml" if data else BUILTIN)
    _check_quarantine(policy, path, "quarantine")

    def check(overrides: dict, where: str) -> None:
        _check_quarantine(build(Policy, _merged(data, overrides), path, f"{where}."), path, f"{where}.quarantine")

    banks = [parse_bank(t, path, f"bank[{i}]", lambda o, i=i: check(o, f"bank[{i}]")) for i, t in enumerate(tables)]
    names = [bank.name for bank in banks]
    if len(set(names)) < len(names):
        raise ConfigError(f"{path}: two [[bank]]s are named {next(n for n in names if names.count(n) > 1)}")
    if ORIGINATING not in names:
        banks.insert(0, _builtin_originating())
    return Rules(
        policy=policy,
        local_domains=tuple(domains),
        recipient_delimiter=delimiter,
        localpart_is_case_sensitive=case,
        banks=tuple(sorted(banks, key=lambda b: b.name != ORIGINATING)),
        sources={
            name: ("policy.toml" if name in given else BUILTIN) for name in (*_NAMES, *(f.name for f in fields(Policy)))
        },
        policy_data=data,
        **rules,
    )


_NAMES = ("local_domains", "recipient_delimiter", "localpart_is_case_sensitive")


def _check_quarantine(policy: Policy, path: Path, key: str) -> None:
    unknown = [c for c in policy.quarantine if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"{path}: {key}: {unknown[0]!r} is not one of {', '.join(CATEGORIES)}")


def _builtin_originating() -> Bank:
    """amavis' ORIGINATING: SASL-authenticated clients and mynetworks; it changes nothing until configured."""
    return Bank(ORIGINATING, originating=True)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; tables ([destiny], [subject_tags]) merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
