"""Local domains, the rules directory and milterd.toml: loaded strictly, mistakes named by file and key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from milterd import config as config_module
from milterd.config import load_config
from milterd.lookups import PolicyLookups, Transaction
from milterd.policy import Destinies, Destiny, Policy, SubjectTags
from milterd.rules import Rules, load_rules
from milterd.tomlschema import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RULES = ROOT / "rules"
MILTERD = str(Path(sys.executable).parent / "milterd")


def rules_dir(tmp_path: Path, text: str | None) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    if text is not None:
        (directory / "policy.toml").write_text(text)
    return directory


def config_file(tmp_path: Path, text: str = "", rules: str | None = "") -> Path:
    if rules is not None:
        rules_dir(tmp_path, rules)
    path = tmp_path / "milterd.toml"
    path.write_text(text)
    return path


# Local domains (@local_domains_maps): "example.com" exactly, ".example.org" and every subdomain

RULES = Rules(local_domains=("example.com", ".example.org"))


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("user@example.com", True),
        ("user@EXAMPLE.COM", True),
        ("<User@Example.Com>", True),
        ("user@example.com.", True),
        ("user@sub.example.com", False),
        ("user@notexample.com", False),
        ("user@example.com.evil.test", False),
        ("user@example.org", True),
        ("user@a.example.org", True),
        ("user@a.b.example.org", True),
        ("<user@A.B.Example.ORG>", True),
        ("user@badexample.org", False),
        ("user@example.org.evil.test", False),
        ("user@example.net", False),
        ("<>", False),
        ("", False),
    ],
)
def test_is_local(address, local):
    assert RULES.is_local(address) is local


def test_local_domain_entries_are_case_insensitive():
    rules = Rules(local_domains=("Example.COM", ".EXAMPLE.org"))
    assert rules.is_local("u@example.com") and rules.is_local("u@a.b.example.org")
    assert not rules.is_local("u@badexample.org")


def test_no_local_domains_means_no_recipient_is_local():
    assert not Rules().is_local("user@example.com")


def policy_for(rules: Rules, recipient: str) -> Policy:
    """The recipient's effective policy, as the milter looks it up at RCPT (no SQL, no maps here)."""
    return PolicyLookups(rules, ["127.0.0.0/8"]).recipient(recipient, Transaction(client_ip="192.0.2.1")).policy


def test_policy_for_a_local_recipient_is_the_policy_with_local_set():
    base = Policy(tag2_level=4.0, kill_level=4.0)
    rules = Rules(policy=base, local_domains=("example.com",))
    assert policy_for(rules, "<u@example.com>") == Policy(tag2_level=4.0, kill_level=4.0, local=True)
    assert policy_for(rules, "u@remote.test") == base
    assert policy_for(rules, "u@remote.test").local is False


def test_recipients_of_the_same_kind_share_an_equal_policy():
    rules = Rules(local_domains=(".example.org",))
    assert policy_for(rules, "a@example.org") == policy_for(rules, "b@x.example.org")
    assert policy_for(rules, "a@example.org") != policy_for(rules, "a@remote.test")


# The rules directory


def test_no_rules_directory_means_the_package_defaults():
    assert load_rules(None) == Rules()


def test_defaults_are_debian_amavis():
    p = Policy()
    assert (p.tag_level, p.tag2_level, p.kill_level, p.dsn_cutoff_level) == (
        2.0,
        6.31,
        6.31,
        10.0,
    )
    assert p.destiny == Destinies(
        virus=Destiny.DISCARD,
        banned=Destiny.DISCARD,
        unchecked=Destiny.PASS,
        spam=Destiny.PASS,
        bad_header=Destiny.PASS,
    )
    assert p.subject_tags == SubjectTags("***INFECTED*** ", "***UNCHECKED*** ", "***SPAM*** ")
    assert (p.scanner_failure, p.local) == ("tempfail", False)


def test_the_shipped_policy_toml_loads():
    rules = load_rules(SHIPPED_RULES)
    p = rules.policy
    assert rules.local_domains == ("example.com", "example.org")
    assert (p.tag_level, p.tag2_level, p.kill_level, p.dsn_cutoff_level) == (
        2.0,
        4.0,
        4.0,
        10.0,
    )
    assert isinstance(p.dsn_cutoff_level, float)
    assert p.scanner_failure == "tempfail"
    assert p.destiny == Destinies(
        virus=Destiny.REJECT,
        banned=Destiny.REJECT,
        unchecked=Destiny.PASS,
        spam=Destiny.PASS,
        bad_header=Destiny.PASS,
    )
    assert p.subject_tags == SubjectTags()
    assert p.local is False


def test_an_empty_policy_toml_is_the_defaults(tmp_path):
    assert load_rules(rules_dir(tmp_path, "")) == Rules()


def test_a_rules_directory_without_policy_toml_is_the_defaults(tmp_path):
    assert load_rules(rules_dir(tmp_path, None)) == Rules()


def test_only_the_keys_given_change(tmp_path):
    rules = load_rules(
        rules_dir(
            tmp_path,
            'tag_level = -999\n[destiny]\nspam = "BOUNCE"\n[subject_tags]\nspammy = "[SPAM] "\n',
        )
    )
    assert rules.policy == Policy(
        tag_level=-999.0,
        destiny=Destinies(spam=Destiny.BOUNCE),
        subject_tags=SubjectTags(spammy="[SPAM] "),
    )


def test_destiny_values_are_case_insensitive(tmp_path):
    rules = load_rules(
        rules_dir(
            tmp_path,
            '[destiny]\nvirus = "reject"\nspam = "Discard"\nunchecked = "bounce"\n',
        )
    )
    assert rules.policy.destiny == Destinies(virus=Destiny.REJECT, spam=Destiny.DISCARD, unchecked=Destiny.BOUNCE)


def test_scanner_failure_unchecked_is_accepted(tmp_path):
    assert load_rules(rules_dir(tmp_path, 'scanner_failure = "unchecked"\n')).policy.scanner_failure == "unchecked"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tag_levle = 3\n", "unknown key tag_levle"),
        ("[destinies]\nvirus = 'PASS'\n", "unknown key destinies"),
        ("[destiny]\nvirs = 'PASS'\n", "unknown key destiny.virs"),
        ("[subject_tags]\nspam = '[SPAM] '\n", "unknown key subject_tags.spam"),
        ("local = true\n", "unknown key local"),
        ('tag_level = "high"\n', "tag_level must be a number, not 'high'"),
        ("kill_level = true\n", "kill_level must be a number, not True"),
        (
            "[destiny]\nvirus = 'KEEP'\n",
            "destiny.virus must be one of PASS, DISCARD, BOUNCE, REJECT, not 'KEEP'",
        ),
        (
            "[destiny]\nspam = 1\n",
            "destiny.spam must be one of PASS, DISCARD, BOUNCE, REJECT",
        ),
        ('destiny = "REJECT"\n', "destiny must be a table"),
        (
            'scanner_failure = "pass"\n',
            "scanner_failure must be one of 'tempfail', 'unchecked'",
        ),
        ("[subject_tags]\nspammy = 1\n", "subject_tags.spammy must be a string"),
        (
            'local_domains = "example.com"\n',
            "local_domains must be a list of domain names",
        ),
        (
            'local_domains = ["example.com", 3]\n',
            "local_domains must be a list of domain names",
        ),
        ('local_domains = ["."]\n', "local_domains must be a list of domain names"),
        ("tag_level = \n", "policy.toml"),
    ],
)
def test_a_mistake_in_policy_toml_names_the_file_and_the_key(tmp_path, text, message):
    directory = rules_dir(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_rules(directory)
    assert str(e.value).startswith(f"{directory / 'policy.toml'}: ")
    assert message in str(e.value)


def test_an_unknown_rules_file_is_an_error(tmp_path):
    directory = rules_dir(tmp_path, "")
    (directory / "polcy.toml").write_text("tag_level = 3\n")
    with pytest.raises(ConfigError, match="polcy.toml: unknown rules file"):
        load_rules(directory)


def test_files_that_are_not_toml_in_the_rules_directory_are_ignored(tmp_path):
    directory = rules_dir(tmp_path, "tag_level = 3\n")
    (directory / "README").write_text("notes\n")
    (directory / "policy.toml~").write_text("garbage = [\n")
    assert load_rules(directory).policy.tag_level == 3.0


# milterd.toml


def test_an_empty_config_file_is_every_default(tmp_path):
    path = config_file(tmp_path)
    config = load_config(path)
    assert config.path == path
    assert config.rules == Rules()
    assert config.milter.listen == "inet:8891@127.0.0.1"
    assert config.clamav.socket == ("/run/clamav/clamd.ctl",)
    assert config.spamd.address == ("127.0.0.1:783",)
    assert (config.spamd.max_size, config.milter.max_concurrent) == (512000, 100)


def test_no_config_file_anywhere_is_the_built_in_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "DEFAULT_PATH", tmp_path / "absent.toml")
    config = load_config(None)
    assert (config.path, config.rules) == (None, Rules())


def test_a_socket_may_be_a_string_or_a_list(tmp_path):
    path = config_file(
        tmp_path,
        '[clamav]\nsocket = "tcp:127.0.0.1:3310"\n[spamd]\naddress = ["127.0.0.1:783", "/run/spamd.sock"]\n',
    )
    config = load_config(path)
    assert config.clamav.socket == ("tcp:127.0.0.1:3310",)
    assert config.spamd.address == ("127.0.0.1:783", "/run/spamd.sock")


def test_config_values_are_typed(tmp_path):
    path = config_file(
        tmp_path,
        "[milter]\nlog_level = 'debug'\nmax_concurrent = 4\nhostname = 'mx.example.com'\n"
        "[clamav]\nenabled = false\ntimeout = 5\n[spamd]\nmax_size = 1000\n",
    )
    config = load_config(path)
    assert (
        config.milter.log_level,
        config.milter.max_concurrent,
        config.milter.hostname,
    ) == ("debug", 4, "mx.example.com")
    assert config.clamav.enabled is False
    assert config.clamav.timeout == 5.0 and isinstance(config.clamav.timeout, float)
    assert config.spamd.max_size == 1000


def test_the_rules_directory_is_relative_to_the_config_file(tmp_path, monkeypatch):
    shutil.copytree(SHIPPED_RULES, tmp_path / "shipped")
    path = config_file(tmp_path, '[milter]\nrules = "shipped"\n', rules=None)
    monkeypatch.chdir("/")
    assert load_config(path).rules == load_rules(SHIPPED_RULES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[clamd]\nsocket = '/x'\n", "unknown section [clamd]"),
        ("listen = 'inet:1@127.0.0.1'\n", "unknown section [listen]"),
        ("milter = 1\n", "[milter] must be a table"),
        ("[milter]\nlisten_on = 'x'\n", "unknown key milter.listen_on"),
        ("[spamd]\nadress = '127.0.0.1:783'\n", "unknown key spamd.adress"),
        (
            "[clamav]\nsocket = 3310\n",
            "clamav.socket must be a string or a list of strings, not 3310",
        ),
        (
            "[clamav]\nsocket = ['/a', 1]\n",
            "clamav.socket must be a string or a list of strings",
        ),
        (
            "[clamav]\nenabled = 'yes'\n",
            "clamav.enabled must be true or false, not 'yes'",
        ),
        (
            "[spamd]\nmax_size = '500k'\n",
            "spamd.max_size must be a whole number, 0 or more, not '500k'",
        ),
        (
            "[spamd]\nmax_size = -1\n",
            "spamd.max_size must be a whole number, 0 or more, not -1",
        ),
        ("[spamd]\nmax_size = 1.5\n", "spamd.max_size must be a whole number"),
        ("[spamd]\ntimeout = 'slow'\n", "spamd.timeout must be a number, not 'slow'"),
        (
            "[milter]\nlog_level = 'verbose'\n",
            "milter.log_level must be one of 'debug', 'info', 'warning', 'error'",
        ),
        ("[milter]\nlisten = 8891\n", "milter.listen must be a string, not 8891"),
        ("[milter\n", "milterd.toml: "),
    ],
)
def test_a_mistake_in_milterd_toml_names_the_file_and_the_key(tmp_path, text, message):
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_a_missing_rules_directory_is_an_error(tmp_path):
    path = config_file(tmp_path, '[milter]\nrules = "nope"\n', rules=None)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: milter.rules: {tmp_path / 'nope'} is not a directory"


def test_the_default_rules_directory_must_exist_too(tmp_path):
    path = config_file(tmp_path, "", rules=None)
    with pytest.raises(ConfigError, match="milter.rules: .* is not a directory"):
        load_config(path)


def test_a_mistake_in_the_rules_is_reported_through_load_config(tmp_path):
    path = config_file(tmp_path, "", rules="[destiny]\nvirus = 'KEEP'\n")
    with pytest.raises(ConfigError, match=r"rules/policy\.toml: destiny\.virus must be one of"):
        load_config(path)


def test_a_missing_config_file_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: cannot read: No such file or directory"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "text",
    [
        "[milter]\nmax_concurrent = 0\n",  # Pipeline's BoundedSemaphore(0): every message waits forever
        "[clamav]\ntimeout = 0\n",
        "[spamd]\ntimeout = -5\n",
        "[clamav]\nsocket = []\n",  # clamav enabled with nowhere to connect: every message UNCHECKED
    ],
)
def test_a_setting_that_would_stop_all_mail_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(config_file(tmp_path, text))


# The real command line


def test_check_config_accepts_a_good_file(tmp_path):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    path = config_file(tmp_path, '[clamav]\nsocket = "/run/clamav/clamd.ctl"\n', rules=None)
    result = subprocess.run(
        [MILTERD, "check-config", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"milterd: {path}: OK"


@pytest.mark.parametrize(
    ("config_text", "rules_text", "named"),
    [
        ("[spamd]\nmax_sise = 1\n", "", "unknown key spamd.max_sise"),
        ("", 'tag_level = "high"\n', "tag_level must be a number"),
    ],
)
def test_check_config_rejects_a_bad_file_with_exit_2_naming_the_key(tmp_path, config_text, rules_text, named):
    path = config_file(tmp_path, config_text, rules=rules_text)
    result = subprocess.run(
        [MILTERD, "check-config", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert named in result.stderr
    assert result.stderr.startswith("milterd: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_the_shipped_banned_list_is_debian_amavis_in_order_then_todays_blocked_types():
    rules = load_rules(SHIPPED_RULES)
    assert [r.name for r in rules.banned] == [
        "double-extension",
        "windows-clsid",
        "windows-program-type",
        "executable-extension",
        "windows-executable",
        "jscript",
        "jscript-encoded",
        "vbscript-encoded",
        "windows-script-file",
        "windows-script-host-settings",
        "html-application",
        "powershell-script",
        "windows-shortcut",
        "windows-shortcut-content",
        "iso-image",
        "iso-image-content",
        "disk-image",
        "virtual-hard-disk",
        "virtual-hard-disk-content",
        "excel-addin",
    ]
    assert all(r.ban for r in rules.banned)


def test_without_banned_toml_the_built_in_debian_list_applies(tmp_path):
    assert load_rules(rules_dir(tmp_path, "")).banned == load_rules(None).banned != ()


def test_a_mistake_in_banned_toml_names_the_file_and_the_rule(tmp_path):
    directory = rules_dir(tmp_path, "")
    (directory / "banned.toml").write_text('[[rule]]\nname = "exe"\naction = "ban"\nname_regex = "("\n')
    with pytest.raises(ConfigError, match=r"banned.toml: rule 1 \(exe\): name_regex"):
        load_rules(directory)


def test_banned_limits_and_headers_sections(tmp_path):
    config = load_config(config_file(tmp_path, "[banned]\nmax_levels = 3\ntimeout = 5\n[headers]\nenabled = false\n"))
    assert (config.banned.max_levels, config.banned.timeout, config.banned.max_files) == (3, 5.0, 1500)
    assert config.headers.enabled is False
    with pytest.raises(ConfigError, match="unknown key banned.maxlevels"):
        load_config(config_file(tmp_path, "[banned]\nmaxlevels = 3\n"))


def test_the_example_config_lists_every_key_with_its_default():
    config = load_config(ROOT / "systemd" / "milterd.toml")
    assert config.banned == type(config.banned)() and config.headers == type(config.headers)()
