"""The check registry: each check declared once, and everything else enumerating it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from milterd.checks import build_checks, registry, unmet_needs
from milterd.config import load_config
from milterd.scores import default_scores

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "systemd" / "milterd.toml"
# libraries that load shared objects, data files or network clients: a reload that only reads the
# configuration must not pay for them
HEAVY = ("magic", "libarchive", "dkim", "spf", "pyzor", "clamd", "dns", "cryptography", "Milter", "publicsuffixlist")


def test_loading_the_config_imports_nothing_heavy():
    code = (
        "import sys; from pathlib import Path; from milterd.config import load_config; "
        f"load_config(Path({str(SHIPPED)!r})); "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    assert "milterd.mime" not in loaded


def test_every_check_is_registered_once_in_start_order():
    names = list(registry())
    assert names == ["clamav", "spamd", "banned", "headers", "dkim", "spf", "dmarc", "pyzor", "razor", "dcc"]
    assert [spec.order for spec in registry().values()] == sorted(spec.order for spec in registry().values())
    for spec in registry().values():
        assert all(name in registry() for name in (*spec.after, *spec.needs)), spec.name


def test_the_shipped_config_shows_every_key_of_every_check_at_its_default():
    shipped = tomllib.loads(SHIPPED.read_text())
    config = load_config(SHIPPED)
    for name, spec in registry().items():
        keys = {f.name for f in dataclasses.fields(spec.settings)}
        assert set(shipped[name]) == keys, name
        assert config.check(name) == spec.settings(), name


def test_a_section_the_file_leaves_out_has_its_checks_defaults(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[pyzor]\nenabled = true\n")
    config = load_config(path)
    assert config.pyzor.enabled and config.pyzor.timeout == 5.0
    assert config.clamav == registry()["clamav"].settings()


def test_an_unknown_key_in_a_check_section_names_the_file_and_key(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[razor]\ncache_tll = 5\n")
    with pytest.raises(Exception, match=rf"{path}: unknown key razor.cache_tll"):
        load_config(path)


def test_the_checks_built_are_the_enabled_ones_and_those_whose_needs_are_on(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[spf]\nenabled = false\n[dcc]\nenabled = true\n")
    built = [check.name for check in build_checks(load_config(path))]
    assert built == ["clamav", "spamd", "banned", "headers", "dkim", "dcc"]  # DMARC needs SPF


def test_each_check_takes_its_declaration_from_the_registry():
    for check in build_checks(load_config(None)):
        spec = registry()[check.name]
        assert (check.critical, check.after) == (spec.settings().critical, spec.after)


def test_critical_defaults_are_clamav_and_banned_and_every_section_can_change_them(tmp_path):
    assert [n for n, spec in registry().items() if spec.settings().critical] == ["clamav", "banned"]
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[spamd]\ncritical = true\n[clamav]\ncritical = false\n")
    built = {check.name: check.critical for check in build_checks(load_config(path))}
    assert (built["spamd"], built["clamav"], built["banned"]) == (True, False, True)


def test_a_check_whose_needs_are_off_is_named(tmp_path):
    (tmp_path / "rules").mkdir()
    path = tmp_path / "milterd.toml"
    path.write_text("[spf]\nenabled = false\n")
    assert unmet_needs(load_config(path)) == ["[dmarc] is enabled but needs [spf], which is off: dmarc does not run"]


def test_every_score_table_a_check_declares_has_its_defaults():
    scores = default_scores()
    for spec in registry().values():
        for table, keys in spec.scores.items():
            assert set(scores[table]) == set(keys or {}), table
