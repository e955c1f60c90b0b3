"""The operator's rules directory, layered over the package defaults, and per-recipient lookups.

The defaults live in code (policy.Policy); `rules/policy.toml` holds only what the operator
changed, so an upgrade never clobbers an operator file. `rules/banned.toml` is the operator's
banned-file list (amavis bans nothing by default; Debian's list ships in its conf.d, and ours in
rules/), read whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .checks.banned import BannedRule, parse_rules
from .policy import Policy
from .scores import Scores, default_scores, parse_scores
from .tomlschema import ConfigError, build, read_toml

RULE_FILES = ("policy.toml", "banned.toml", "scores.toml")


@dataclass(frozen=True)
class Rules:
    policy: Policy = field(default_factory=Policy)
    local_domains: tuple[str, ...] = ()  # "example.com" exactly, ".example.org" and its subdomains
    banned: tuple[BannedRule, ...] = ()  # in order; the first that matches decides
    scores: Scores = field(default_factory=default_scores)  # points and thresholds, per table (rules/scores.toml)

    def is_local(self, address: str) -> bool:
        domain = address.strip("<>").rpartition("@")[2].lower().rstrip(".")
        for entry in self.local_domains:
            entry = entry.lower()
            if domain == entry.lstrip(".") or (entry.startswith(".") and domain.endswith(entry)):
                return True
        return False

    def policy_for(self, recipient: str) -> Policy:
        """The policy of one recipient. Recipients with equal policies may share a transaction."""
        return replace(self.policy, local=self.is_local(recipient))


def load_rules(directory: Path | None) -> Rules:
    """Read `policy.toml` and `banned.toml` from the rules directory (None: the package defaults only)."""
    if directory is None:
        return Rules()
    unknown = sorted(p.name for p in directory.glob("*.toml") if p.name not in RULE_FILES)
    if unknown:
        raise ConfigError(f"{directory / unknown[0]}: unknown rules file (known: {', '.join(RULE_FILES)})")
    banned_path = directory / "banned.toml"
    banned = parse_rules(read_toml(banned_path), banned_path) if banned_path.exists() else ()
    scores_path = directory / "scores.toml"
    scores = parse_scores(read_toml(scores_path), scores_path) if scores_path.exists() else default_scores()
    path = directory / "policy.toml"
    if not path.exists():
        return Rules(banned=banned, scores=scores)
    data = read_toml(path)
    domains = data.pop("local_domains", [])
    if "local" in data:
        raise ConfigError(f"{path}: unknown key local (use local_domains)")
    if not isinstance(domains, list) or not all(isinstance(d, str) and d.strip(".") for d in domains):
        raise ConfigError(f"{path}: local_domains must be a list of domain names")
    return Rules(policy=build(Policy, data, path), local_domains=tuple(domains), banned=banned, scores=scores)
