"""Banned-file rules: the built-in (Debian amavis) list, first match wins over a part and its ancestors."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd.checks.banned import DECEPTIVE_NAMES, banned_parts, load_rules, parse_rules
from milterd.mime import Inspection, Part
from milterd.tomlschema import ConfigError

RULES = (DECEPTIVE_NAMES, *load_rules(None))


def part(path: str, declared: str = "application/octet-stream", real: str = "text/plain", in_archive=False) -> Part:
    name = path.rsplit("/", 1)[-1]
    return Part(path, name, "" if in_archive else declared, real, in_archive, path.count("/"), 10)


def banned(*parts: Part, rules=RULES) -> dict[str, str]:
    return {p.path: rule.name for p, rule in banned_parts(Inspection(tuple(parts), (), ()), rules)}


@pytest.mark.parametrize(
    "name, rule",
    [
        ("invoice.pdf.exe", "double-extension"),
        ("INVOICE.PDF.EXE", "double-extension"),
        ("report.doc.scr.", "double-extension"),
        ("setup.exe", "executable-extension"),
        ("run.BAT", "executable-extension"),
        ("x.{00021401-0000-0000-c000-000000000046}", "windows-clsid"),
        ("invoice\u202efdp.exe", "deceptive-name"),
        ("a\x00.pdf", "deceptive-name"),
    ],
)
def test_debian_list_bans_by_name(name, rule):
    assert banned(part(name)) == {name: rule}


@pytest.mark.parametrize("name", ["report.pdf", "photo.jpeg", "archive.tar.gz", "notes.txt", "exe", ".exe"])
def test_ordinary_names_pass(name):
    assert banned(part(name)) == {}


def test_declared_windows_program_types_and_the_real_type_are_banned_whatever_the_name():
    assert banned(part("a.txt", declared="application/x-msdownload")) == {"a.txt": "windows-program-type"}
    assert banned(part("a.txt", declared="application/hta")) == {"a.txt": "windows-program-type"}
    pe = part("holiday.jpg", real="application/vnd.microsoft.portable-executable")
    assert banned(pe) == {"holiday.jpg": "windows-executable"}


def test_members_of_archives_are_judged_with_their_path():
    zip_part = part("invoice.zip", declared="application/zip", real="application/zip")
    member = part("invoice.zip/docs/invoice.pdf.exe", in_archive=True)
    assert banned(zip_part, member) == {"invoice.zip/docs/invoice.pdf.exe": "double-extension"}


def test_an_allow_rule_on_an_ancestor_allows_what_is_inside_as_amavis():
    allow_zip = parse_rules(
        {"rule": [{"name": "inside-zip", "action": "allow", "real_type": "application/zip"}]}, Path("banned.toml")
    )
    zip_part = part("tools.zip", declared="application/zip", real="application/zip")
    member = part("tools.zip/setup.exe", in_archive=True)
    assert banned(zip_part, member, rules=(*allow_zip, *RULES[1:])) == {}
    assert banned(zip_part, member) == {"tools.zip/setup.exe": "executable-extension"}


def test_in_archive_condition():
    rules = parse_rules(
        {"rule": [{"name": "js-inside", "action": "ban", "name_glob": "*.js", "in_archive": True}]}, Path("b.toml")
    )
    assert banned(part("a.js"), rules=rules) == {}
    assert banned(part("x.zip/a.js", in_archive=True), rules=rules) == {"x.zip/a.js": "js-inside"}


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"action": "ban", "name_glob": "*.x"}, "name must be"),
        ({"name": "r", "action": "drop", "name_glob": "*.x"}, "action must be"),
        ({"name": "r", "action": "ban"}, "at least one condition"),
        ({"name": "r", "action": "ban", "name_regex": "("}, "name_regex"),
        ({"name": "r", "action": "ban", "colour": "red"}, "unknown key colour"),
        ({"name": "r", "action": "ban", "in_archive": "yes"}, "true or false"),
        ({"name": "r", "action": "ban", "real_type": []}, "list of strings"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_rule(rule, message):
    with pytest.raises(ConfigError, match=message):
        parse_rules({"rule": [rule]}, Path("banned.toml"))


def test_unknown_top_level_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key"):
        parse_rules({"rules": []}, Path("banned.toml"))


def test_the_operators_rules_come_before_the_built_in_list_and_can_replace_it(tmp_path):
    path = tmp_path / "banned.toml"
    path.write_text('[[rule]]\nname = "inside-zip"\naction = "allow"\nreal_type = "application/zip"\n')
    rules = load_rules(path)
    assert rules[0].name == "inside-zip" and rules[1:] == load_rules(None)
    inside = part("a.zip/setup.exe", in_archive=True)
    assert banned(part("a.zip", real="application/zip"), inside, rules=rules) == {}
    path.write_text('builtin = false\n[[rule]]\nname = "no-docs"\naction = "ban"\nname_glob = "*.doc"\n')
    assert [r.name for r in load_rules(path)] == ["no-docs"]
    assert banned(part("setup.exe"), rules=(DECEPTIVE_NAMES, *load_rules(path))) == {}


def test_a_rules_directory_without_banned_toml_still_bans_what_debian_bans(tmp_path):
    assert banned(part("setup.exe"), rules=(DECEPTIVE_NAMES, *load_rules(tmp_path / "banned.toml"))) == {
        "setup.exe": "executable-extension"
    }
