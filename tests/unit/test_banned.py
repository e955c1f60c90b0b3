"""Banned-file rules: the built-in (Debian amavis) list, first match wins over a part and its ancestors."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest

from milterd.checks.banned import DECEPTIVE_NAMES, BannedCheck, BannedSettings, banned_parts, load_rules, parse_rules
from milterd.message import Envelope, Message, Spool
from milterd.mime import Inspection, Part, Walker
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


@pytest.mark.parametrize(
    "name",
    ["report.pdf", "photo.jpeg", "archive.tar.gz", "notes.txt", "exe", ".exe", "package.json", "app.jsx", "js", ".js"],
)
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


# Types mail providers block today (Outlook, Gmail, Defender for Office 365), after Debian's list


@pytest.mark.parametrize(
    "name, rule",
    [
        ("invoice.js", "jscript"),
        ("INVOICE.JS", "jscript"),
        ("run.js.", "jscript"),  # Windows drops trailing dots and spaces when it saves the file
        ("run.js ", "jscript"),
        ("a.jse", "jscript-encoded"),
        ("a.vbe", "vbscript-encoded"),
        ("a.wsf", "windows-script-file"),
        ("a.wsh", "windows-script-host-settings"),
        ("a.hta", "html-application"),
        ("a.ps1", "powershell-script"),
        ("Invoice.pdf.lnk", "windows-shortcut"),
        ("scan.iso", "iso-image"),
        ("scan.img", "disk-image"),
        ("disk.vhd", "virtual-hard-disk"),
        ("disk.VHDX", "virtual-hard-disk"),
        ("report.xll", "excel-addin"),
        ("invoice.pdf.exe", "double-extension"),  # Debian's rules come first and keep their names
    ],
)
def test_todays_blocked_types_by_name(name, rule):
    assert banned(part(name)) == {name: rule}


@pytest.mark.parametrize(
    "real, rule",
    [
        ("application/x-ms-shortcut", "windows-shortcut-content"),
        ("application/x-iso9660-image", "iso-image-content"),
        ("application/x-virtualbox-vhd", "virtual-hard-disk-content"),
        ("application/x-dosexec", "windows-executable"),
    ],
)
def test_the_real_type_wins_over_the_name(real, rule):
    assert banned(part("holiday.pdf", real=real)) == {"holiday.pdf": rule}


def test_an_xll_that_is_a_dll_is_named_by_the_first_rule_that_matches():
    assert banned(part("addin.xll", real="application/vnd.microsoft.portable-executable")) == {
        "addin.xll": "windows-executable"
    }


def test_each_added_type_can_be_allowed_by_the_operator(tmp_path):
    path = tmp_path / "banned.toml"
    path.write_text('[[rule]]\nname = "our-scripts"\naction = "allow"\nname_glob = ["*.ps1", "*.js"]\n')
    rules = (DECEPTIVE_NAMES, *load_rules(path))
    assert banned(part("deploy.ps1"), part("app.js"), part("a.vbe"), rules=rules) == {"a.vbe": "vbscript-encoded"}


# The same through the MIME walk: real files, typed by libmagic

CLAM_EXE = Path("/usr/share/clamav-testfiles/clam.exe").read_bytes()
# A Windows shortcut ([MS-SHLLINK] 2.1): header size 0x4C, the shell link CLSID, no optional parts
LNK = bytes.fromhex("4c0000000114020000000000c000000000000046") + bytes(56)


def iso_of(members: dict[str, bytes]) -> bytes:
    """An ISO 9660 image, as genisoimage makes, written by libarchive's iso9660 writer."""
    import libarchive

    out = bytearray()

    def write(data: bytes) -> int:
        out.extend(data)
        return len(data)

    with libarchive.custom_writer(write, "iso9660") as archive:
        for name, data in members.items():
            archive.add_file_from_memory(name, len(data), data)
    return bytes(out)


def mail(*attachments: tuple[str, bytes]) -> Message:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.org", "files"
    msg.set_content("See attached.\n")
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    spool = Spool()
    spool.write(msg.as_bytes())
    return Message(Envelope(), spool)


@pytest.fixture(scope="module")
def walker():
    return Walker(BannedSettings())


def check_banned(walker, message: Message, rules_path: Path | None = None) -> dict[str, str]:
    finding = BannedCheck(load_rules(rules_path), walker).run(message)
    assert finding.status == "ok", finding.detail
    return dict(finding.banned)


def test_a_js_a_lnk_and_an_iso_holding_an_exe_are_banned_with_the_rule_named(walker):
    js = b"var shell = new ActiveXObject('WScript.Shell');\nshell.Run('powershell -enc AAAA');\n"
    message = mail(("invoice.js", js), ("Invoice.pdf.lnk", LNK), ("scan.iso", iso_of({"setup.exe": CLAM_EXE})))
    found = {part.path: part.real_type for part in message.inspect(walker).parts}
    assert found["Invoice.pdf.lnk"] == "application/x-ms-shortcut"
    assert found["scan.iso"] == "application/x-iso9660-image"
    assert found["scan.iso/setup.exe"] in ("application/vnd.microsoft.portable-executable", "application/x-dosexec")
    assert check_banned(walker, message) == {
        "invoice.js": "jscript",
        "Invoice.pdf.lnk": "windows-shortcut",
        "scan.iso": "iso-image",
        "scan.iso/setup.exe": "executable-extension",
    }


def test_renamed_shortcuts_and_images_are_banned_by_content(walker):
    message = mail(("photo.jpg", LNK), ("backup.dat", iso_of({"readme.txt": b"hello\n"})))
    assert check_banned(walker, message) == {
        "photo.jpg": "windows-shortcut-content",
        "backup.dat": "iso-image-content",
        "backup.dat/readme.txt": "iso-image-content",  # as amavis: a ban on the container covers its members
    }


def test_an_allow_rule_in_rules_lets_the_js_through(walker, tmp_path):
    path = tmp_path / "banned.toml"
    path.write_text('[[rule]]\nname = "web-team-scripts"\naction = "allow"\nname_glob = "*.js"\n')
    message = mail(("app.js", b"console.log(1);\n"), ("Invoice.pdf.lnk", LNK))
    assert check_banned(walker, message, path) == {"Invoice.pdf.lnk": "windows-shortcut"}
    assert check_banned(walker, mail(("app.js", b"console.log(1);\n"))) == {"app.js": "jscript"}
