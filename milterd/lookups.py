"""Per-recipient policy, as amavis' lookup chains: the keys of an address, the rules maps, the banks.

For each setting the first source that has it wins: SQL (`[sql]`, sql.py), then
rules/recipients.toml, then the policy banks that match the transaction over rules/policy.toml,
then the built-in defaults (Debian amavis'). A NULL or absent value falls through. Sender
white/blacklists come from SQL, then rules/senders.toml.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .policy import Policy
from .sanitize import printable
from .tomlschema import ConfigError

if TYPE_CHECKING:
    from .rules import Rules
    from .sql import SqlLookups

# amavis' per-recipient fields (its SQL policy columns, README.sql) -> the Policy setting they set
RECIPIENT_FIELDS: dict[str, str] = {
    "spam_tag_level": "tag_level",
    "spam_tag2_level": "tag2_level",
    "spam_kill_level": "kill_level",
    "spam_dsn_cutoff_level": "dsn_cutoff_level",
    "spam_quarantine_cutoff_level": "quarantine_cutoff_level",
    "virus_lover": "virus_lover",
    "spam_lover": "spam_lover",
    "banned_files_lover": "banned_files_lover",
    "bad_header_lover": "bad_header_lover",
    "unchecked_lover": "unchecked_lover",
    "bypass_virus_checks": "bypass_virus_checks",
    "bypass_spam_checks": "bypass_spam_checks",
    "bypass_banned_checks": "bypass_banned_checks",
    "bypass_header_checks": "bypass_header_checks",
    "spam_subject_tag": "subject_tags.tagged",
    "spam_subject_tag2": "subject_tags.spammy",
}
FLAGS = frozenset(name for name in RECIPIENT_FIELDS if name.endswith(("_lover", "_checks")))
TAGS = frozenset({"spam_subject_tag", "spam_subject_tag2"})
ORIGINATING = "ORIGINATING"


class LookupFailed(Exception):
    """A lookup could not be answered (database down, timeout, SQL error): the recipient gets 4xx."""


def flag(value: Any) -> bool:
    """amavis' Y/N columns: Y, y, 1 and true are yes; everything else no."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip().lower() in ("y", "yes", "1", "true")


def field_value(name: str, value: Any) -> Any:
    """A column's or a recipients.toml entry's value as the Policy setting takes it; ValueError if it cannot be."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if name in FLAGS or name == "local":
        return flag(value) if not isinstance(value, bool) else value
    if name in TAGS:
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number")
    return float(value)


# ------------------------------------------------------------------------------------------- keys


def lookup_keys(address: str, delimiter: str = "", case_sensitive: bool = False, local: bool = True) -> list[str]:
    """amavis' lookup keys of an address, most specific first (README.lookups, SQL's %k):
    user+ext@sub.example.com, user@sub.example.com, user+ext, user (those two for local domains
    only), @sub.example.com, @.sub.example.com, @.example.com, @.com, @.

    The domain is lower-cased, the local part too unless `case_sensitive`; `delimiter` (amavis'
    $recipient_delimiter, e.g. "+") splits off the extension. The null address has "" and "@.".
    A quoted local part is looked up unquoted, as amavis does ("x y"@example.com is x y@example.com).
    """
    address = address.strip().strip("<>")
    if not address:
        return ["", "@."]
    local_part, at, domain = address.rpartition("@")
    if not at:
        local_part, domain = address, ""
    local_part = _QUOTING.sub(lambda m: m.group(1) or "", local_part)
    domain = domain.lower().rstrip(".")
    if not case_sensitive:
        local_part = local_part.lower()
    user = local_part
    if delimiter and len(local_part) > 1:
        cut = min((i for i in (local_part.find(d, 1) for d in delimiter) if i > 0), default=-1)
        if cut > 0:
            user = local_part[:cut]
    keys = [f"{local_part}@{domain}"]
    if user != local_part:
        keys.append(f"{user}@{domain}")
    if local:
        keys.append(local_part)
        if user != local_part:
            keys.append(user)
    if domain:
        keys += [f"@{domain}", f"@.{domain}"]
        labels = domain.split(".")
        keys += [f"@.{'.'.join(labels[i:])}" for i in range(1, len(labels))]
    keys.append("@.")
    return list(dict.fromkeys(keys))


# amavis' unquote_rfc2821_local: drop the quotes, undo the quoted pairs
_QUOTING = re.compile(r'"|\\(.)|\\\Z', re.DOTALL)


def is_local_domain(address: str, local_domains: Iterable[str]) -> bool:
    """In `local_domains`: "example.com" exactly, ".example.org" and its subdomains."""
    domain = address.strip("<>").rpartition("@")[2].lower().rstrip(".")
    for entry in local_domains:
        entry = entry.lower()
        if domain == entry.lstrip(".") or (entry.startswith(".") and domain.endswith(entry)):
            return True
    return False


# -------------------------------------------------------------------------------- rules maps


def parse_recipients(data: dict, path: Path) -> dict[str, dict[str, Any]]:
    """rules/recipients.toml: a table per lookup key ("user@example.com", "@example.com",
    "@.example.org", "@."), each with amavis' column names (`local`, `spam_kill_level`, ...)."""
    out: dict[str, dict[str, Any]] = {}
    for key, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f'{path}: ["{key}"] must be a table of settings')
        entry = {}
        for name, value in table.items():
            if name != "local" and name not in RECIPIENT_FIELDS:
                raise ConfigError(f"{path}: unknown key {key}.{name} (known: local, {', '.join(RECIPIENT_FIELDS)})")
            ok = (
                isinstance(value, bool)
                if name in FLAGS or name == "local"
                else (
                    isinstance(value, str)
                    if name in TAGS
                    else isinstance(value, int | float) and not isinstance(value, bool)
                )
            )
            if not ok:
                raise ConfigError(f"{path}: {key}.{name} has the wrong type: {value!r}")
            entry[name] = field_value(name, value)
        out[_key(key)] = entry
    return out


@dataclass(frozen=True)
class SenderLists:
    """White/blacklisted senders and sender scores, by sender lookup key (rules/senders.toml)."""

    entries: Mapping[str, str | float] = field(default_factory=dict)  # sender key -> "W", "B" or points
    # recipient key -> its own lists, tried before the global ones
    by_recipient: Mapping[str, Mapping[str, str | float]] = field(default_factory=dict)

    def lookup(self, recipient_keys: Sequence[str], sender_keys: Sequence[str]) -> str | float | None:
        for key in recipient_keys:
            if key in self.by_recipient:
                found = _first(self.by_recipient[key], sender_keys)
                if found is not None:
                    return found
        return _first(self.entries, sender_keys)


def _first(entries: Mapping[str, str | float], keys: Sequence[str]) -> str | float | None:
    return next((entries[k] for k in keys if k in entries), None)


def parse_senders(data: dict, path: Path) -> SenderLists:
    """`whitelist` / `blacklist` (lists of sender keys) and `[score]` (sender key -> points), at the
    top for every recipient, and under `[recipient."KEY"]` for the recipients that key matches."""
    by_recipient = {}
    tables = data.pop("recipient", {})
    if not isinstance(tables, dict):
        raise ConfigError(f'{path}: recipient must be tables: [recipient."user@example.com"]')
    for key, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f'{path}: [recipient."{key}"] must be a table')
        by_recipient[_key(key)] = _sender_entries(table, path, f"recipient.{key}.")
    return SenderLists(_sender_entries(data, path, ""), by_recipient)


def _sender_entries(table: dict, path: Path, prefix: str) -> dict[str, str | float]:
    entries: dict[str, str | float] = {}
    for name, value in table.items():
        if name in ("whitelist", "blacklist"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {prefix}{name} must be a list of addresses or @domains")
            entries.update({_key(v): "W" if name == "whitelist" else "B" for v in value})
        elif name == "score":
            if not isinstance(value, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
            ):
                raise ConfigError(f"{path}: {prefix}score must be a table of sender = points")
            entries.update({_key(k): float(v) for k, v in value.items() if _key(k) not in entries})
        else:
            raise ConfigError(f"{path}: unknown key {prefix}{name} (known: whitelist, blacklist, score)")
    return entries


def _key(text: str) -> str:
    """A lookup key as written in a rules file, in the form lookup_keys makes (domain lower-cased)."""
    local_part, at, domain = text.strip().rpartition("@")
    return f"{local_part}{at}{domain.lower()}" if at else text.strip()


def sender_verdict(value: str | float | None) -> tuple[str, float]:
    """An answer of the sender lists as (list, points): W/Y whitelisted, B/N blacklisted (amavis' wb
    column), a number added to the spam score (amavis' soft white/blacklisting)."""
    if value is None:
        return "", 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "", float(value)
    text = (value.decode() if isinstance(value, bytes) else str(value)).strip().upper()
    if text in ("W", "Y"):
        return "W", 0.0
    if text in ("B", "N"):
        return "B", 0.0
    try:
        return "", float(text)
    except ValueError:
        return "", 0.0  # a space or an unknown letter: amavis ignores it too


# ------------------------------------------------------------------------------- policy banks


@dataclass(frozen=True)
class Transaction:
    """What the banks and the sender lists look at: who sends, from where, through which service."""

    mail_from: str = ""
    client_ip: str = ""
    auth_user: str = ""  # Postfix {auth_authen}
    daemon_name: str = ""  # Postfix {daemon_name}: the smtpd service (milter_macro_daemon_name)


@dataclass(frozen=True)
class Bank:
    """A `[[bank]]` of rules/policy.toml: its match, and the policy settings it overrides."""

    name: str
    daemon_name: tuple[str, ...] = ()  # any of these services
    originating: bool | None = None  # SASL-authenticated or from mynetworks (None: either)
    client_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)  # policy.toml keys, as written

    def matches(self, txn: Transaction, originating: bool) -> bool:
        if self.daemon_name and txn.daemon_name not in self.daemon_name:
            return False
        if self.originating is not None and self.originating != originating:
            return False
        if self.client_networks:
            address = client_address(txn.client_ip)
            return address is not None and any(address in net for net in self.client_networks)
        return True


def parse_bank(table: dict, path: Path, where: str, check: Callable[[dict], None]) -> Bank:
    """One [[bank]]: its match keys; every other key is a policy setting, checked by `check`."""
    table = dict(table)
    name = table.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: {where}.name must be the bank's name")
    names = table.pop("daemon_name", ())
    names = (names,) if isinstance(names, str) else names
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: {where}.daemon_name must be a service name or a list of them")
    originating = table.pop("originating", True if name == ORIGINATING else None)
    if originating is not None and not isinstance(originating, bool):
        raise ConfigError(f"{path}: {where}.originating must be true or false")
    networks = table.pop("client_networks", [])
    try:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {where}.client_networks: {e}") from None
    if not (names or originating is not None or nets):
        raise ConfigError(f"{path}: {where} matches everything: give daemon_name, originating or client_networks")
    check(table)
    return Bank(name, tuple(names), originating, nets, table)


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as Postfix gives it ("IPv6:..." and scope ids removed, v4-mapped unwrapped)."""
    try:
        address = ipaddress.ip_address(text.removeprefix("IPv6:").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_originating(txn: Transaction, mynetworks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """amavis' originating: SASL-authenticated, or a client inside mynetworks."""
    if txn.auth_user:
        return True
    address = client_address(txn.client_ip)
    return address is not None and any(address in network for network in mynetworks)


# ------------------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class Recipient:
    """A recipient and its effective policy (equal policies may share a transaction)."""

    address: str
    policy: Policy
    originating: bool = False


class PolicyLookups:
    """The effective policy of a recipient in a transaction: SQL, then recipients.toml, then the
    matching banks over policy.toml, then the built-in defaults; the sender lists likewise.

    Built once per Engine; `sql` (an sql.SqlLookups) is None without [sql].
    """

    def __init__(self, rules: Rules, mynetworks: Sequence[str], sql: SqlLookups | None = None):
        self.rules = rules
        self.mynetworks = tuple(ipaddress.ip_network(n, strict=False) for n in mynetworks)
        self.sql = sql
        self._plain: dict[tuple, Policy] = {}  # policies without per-recipient values, made once each

    def recipient(self, address: str, txn: Transaction) -> Recipient:
        """LookupFailed when the database cannot answer: the caller defers (4xx), never guesses."""
        rules = self.rules
        originating = is_originating(txn, self.mynetworks)
        base = rules.bank_policy(tuple(b.name for b in rules.banks if b.matches(txn, originating)))
        keys = self.keys(address)
        values: dict[str, Any] = {}
        row = self.sql.policy(keys) if self.sql is not None else None
        if row is not None:
            values = _row_values(row)
            if "local" not in row:  # a matching row makes the recipient local, unless it says (NULL: fall through)
                values["local"] = True
        mapped = False
        for key in keys:  # most specific first: the first key that sets a value wins
            for name, value in rules.recipients.get(key, {}).items():
                if name not in values:
                    values[name], mapped = value, True
        source = "sql" if row is not None else "recipients.toml" if mapped else base.source
        local = values.pop("local", rules.is_local(address))
        listed = self._sender_list(keys, txn.mail_from, row)
        sender_list, sender_score = sender_verdict(listed)
        internal = {"local": local, "sender_list": sender_list, "sender_score": sender_score, "source": source}
        if values:
            return Recipient(address, _with(base, values, **internal), originating)
        key = (base.bank, *internal.values())
        if key not in self._plain:  # most recipients: one of a handful of policies, no copy per RCPT
            self._plain[key] = replace(base, **internal)
        return Recipient(address, self._plain[key], originating)

    def keys(self, address: str) -> list[str]:
        rules = self.rules
        return lookup_keys(
            address, rules.recipient_delimiter, rules.localpart_is_case_sensitive, rules.is_local(address)
        )

    def close(self) -> None:
        if self.sql is not None:
            self.sql.close()

    def _sender_list(self, recipient_keys: list[str], sender: str, row: Mapping[str, Any] | None) -> Any:
        sender_keys = self.keys(sender)
        if row is not None and self.sql is not None:
            found = self.sql.white_black(row.get("id"), sender_keys)
            if found is not None:
                return found
        return self.rules.senders.lookup(recipient_keys, sender_keys)


def _row_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a policy row sets (its NULLs fall through); a value of the wrong kind is a
    failed lookup (4xx until it is mended), never a guess."""
    values = {}
    for name, value in row.items():
        if value is not None and (name in RECIPIENT_FIELDS or name == "local"):
            try:
                values[name] = field_value(name, value)
            except ValueError:
                raise LookupFailed(f"select_policy: column {name} is {printable(repr(value), 60)}") from None
    return values


def _with(policy: Policy, values: Mapping[str, Any], **internal) -> Policy:
    """`policy` with the per-recipient values (amavis column names) set."""
    top: dict[str, Any] = dict(internal)
    tags: dict[str, str] = {}
    for name, value in values.items():
        setting = RECIPIENT_FIELDS[name]
        if setting.startswith("subject_tags."):
            tags[setting.removeprefix("subject_tags.")] = value
        else:
            top[setting] = value
    if tags:
        top["subject_tags"] = replace(policy.subject_tags, **tags)
    return replace(policy, **top)
