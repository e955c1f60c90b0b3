"""Dry run beside amavis (issue 15): every check runs and the verdict is logged with dry_run=yes,
but through the real Postfix the mail is delivered unchanged, X-Milterd-Verdict on top if asked."""

from __future__ import annotations

import pytest

from tests import daemons
from tests.conftest import GTUBE, start_milterd, stop_milterd, write_config
from tests.e2e.test_postfix import header, send

pytestmark = pytest.mark.e2e

REJECT_ALL = {"destiny": {"virus": "REJECT", "spam": "REJECT"}, "tag_level": -999}


def log_lines(milterd) -> list[str]:
    return milterd.log.read_text().splitlines()


@pytest.fixture(scope="module")
def mta(tmp_path_factory, clamd, spamd):
    base = tmp_path_factory.mktemp("dry")
    daemons.make_traversable(base)
    milterds = {}
    for name, extra in (("dry", "dry_run = true\ndry_run_header = true\n"), ("quiet", "dry_run = true\n")):
        config = write_config(
            base / name, clamav=str(clamd.socket_path), spamd=f"127.0.0.1:{spamd.port}", policy=REJECT_ALL
        )
        config.write_text(config.read_text().replace("[milter]\n", f"[milter]\n{extra}", 1))
        milterds[name] = start_milterd(config)
    postfix = daemons.start_postfix(base / "postfix", {name: m.socket for name, m in milterds.items()})
    yield postfix, milterds
    postfix.stop()
    stop_milterd(*milterds.values())


def test_a_virus_is_delivered_unchanged_and_the_log_says_it_would_have_been_rejected(mta):
    postfix, milterds = mta
    delivered = postfix.wait_delivered(send(mta, "dry", daemons.EICAR, subject="virus"))
    assert header(delivered, "X-Milterd-Verdict") == ["category=VIRUS score=- action=reject"]
    assert header(delivered, "Subject") == ["virus"] and header(delivered, "X-Spam-Status") == []
    assert header(delivered, "X-Virus-Scanned") == [] and header(delivered, "X-Quarantine-ID") == []
    line = next(x for x in log_lines(milterds["dry"]) if "category=VIRUS" in x)
    assert "action=reject, reply=250, dry_run=yes," in line


def test_spam_is_delivered_unchanged_without_the_header_unless_asked(mta):
    postfix, milterds = mta
    delivered = postfix.wait_delivered(send(mta, "quiet", GTUBE, subject="pills"))
    assert header(delivered, "X-Milterd-Verdict") == [] and header(delivered, "Subject") == ["pills"]
    assert header(delivered, "X-Spam-Flag") == []
    assert any("category=SPAM" in x and "dry_run=yes" in x for x in log_lines(milterds["quiet"]))
