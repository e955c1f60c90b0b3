"""A private amavisd-new for `make bench`: the post-queue filter milterd replaces, on the same clamd and SA rules.

amavis runs as Debian configures it (every conf.d file, in amavisd's own order) plus one file of ours read last,
which turns the virus and spam checks on (Debian ships them off), points ClamAV and SpamAssassin at the
benchmark's clamd and site config, and moves every path, port and log into the work directory. It is started
under tests.daemons' reaper and registered there, so ``daemons.stop_all()`` stops it like the other daemons.
Postfix feeds it with ``content_filter`` and takes the result back on a reinjection smtpd
(``postfix_master_lines``), as amavis' README.postfix describes.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests import daemons

AMAVISD = "/usr/sbin/amavisd"
# amavisd without -c reads these with `run-parts --list`; any -c replaces that scan, so we list them ourselves.
CONF_DIRS = ("/usr/share/amavis/conf.d", "/etc/amavis/conf.d")
USER = "amavis"

_OUTCOME = re.compile(r"\) (Passed|Blocked) ")

# Perl, read after Debian's files. {braces} are filled in by start_amavis; doubled ones are Perl's.
_CONF = """\
use strict;
# Everything amavis writes stays in the work directory, owned by the amavis user.
$MYHOME = '{home}';
$TEMPBASE = "$MYHOME/tmp";
$ENV{{TMPDIR}} = $TEMPBASE;
$db_home = "$MYHOME/db";
$QUARANTINEDIR = "$MYHOME/virusmails";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$unix_socketname = undef;  # Debian's AM.PDP socket (amavisd-release) lives in /var/lib/amavis
$DO_SYSLOG = 0;
$LOGFILE = '{log}';
$log_level = 0;  # one "Passed ..." or "Blocked ..." line per message, no more

$inet_socket_bind = '127.0.0.1';
$inet_socket_port = {port};
$forward_method = 'smtp:[127.0.0.1]:{forward_port}';
$notify_method = $forward_method;
$max_servers = {children};

$myhostname = 'amavis.milterd.test';
$mydomain = 'milterd.test';  # Debian reads /etc/mailname, which may not exist
$X_HEADER_LINE = "Debian $myproduct_name at $mydomain";
@local_domains_acl = ('.');  # every recipient is local, or amavis adds no spam headers

@bypass_virus_checks_maps = (0);
@bypass_spam_checks_maps = (0);
@av_scanners = (
  ['ClamAV-clamd',
    \\&ask_daemon, ["CONTSCAN {{}}\\n", '{clamd_socket}'],
    qr/\\bOK$/m, qr/\\bFOUND$/m,
    qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ],
);
@av_scanners_backup = ();

$sa_siteconfigpath = '{sa_siteconfig}';  # the benchmark spamd's rules and local.cf
$sa_local_tests_only = 1;
$sa_mail_body_size_limit = 200*1024;
$sa_tag_level_deflt = 2.0;
$sa_tag2_level_deflt = 4.0;
$sa_kill_level_deflt = 4.0;
$sa_dsn_cutoff_level = 10;

# Blocked mail is dropped (quarantined as Debian does), and nobody is told: nothing extra reaches the sink.
$final_virus_destiny = D_DISCARD;
$final_spam_destiny = D_DISCARD;
$final_banned_destiny = D_DISCARD;
$final_bad_header_destiny = D_PASS;
$virus_admin = undef;
$spam_admin = undef;

$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
1;
"""


@dataclass(frozen=True)
class Amavis(daemons._Managed):
    """A private amavisd-new speaking SMTP on 127.0.0.1:port."""

    port: int
    pid: int
    log: Path
    config: Path
    proc: subprocess.Popen = field(repr=False, compare=False)
    out: Path = field(repr=False)

    def outcomes(self) -> dict[str, int]:
        """How many messages amavis passed and blocked, from its log, so a benchmark can see none was lost."""
        counts = {"Passed": 0, "Blocked": 0}
        with open(self.log, errors="replace") as f:
            for line in f:
                if m := _OUTCOME.search(line):
                    counts[m.group(1)] += 1
        return counts


def _greets(port: int) -> bool:
    """The port accepts as soon as the parent binds it; a 220 comes from a child, forked once SpamAssassin is loaded."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        greeting = s.recv(512)
        s.sendall(b"QUIT\r\n")
    return greeting.startswith(b"220")


def start_amavis(
    workdir: Path,
    *,
    clamd_socket: Path,
    sa_siteconfig: Path,
    forward_port: int,
    children: int = 5,
    timeout: float = 90,
) -> Amavis:
    """Start amavisd in the foreground with Debian's config plus ours; returns once it greets on its port.

    amavisd refuses config files not owned by root and reads them again as the amavis user, so our file
    and its directory are root's and world-readable; its home, temp, quarantine and log are the amavis user's.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    daemons.make_traversable(workdir)
    confdir = workdir / "amavis-etc"
    confdir.mkdir(exist_ok=True)
    os.chown(confdir, 0, 0)
    os.chmod(confdir, 0o755)
    pw = pwd.getpwnam(USER)
    home = workdir / "amavis-home"
    for d in (home, home / "tmp", home / "db", home / "virusmails"):
        d.mkdir(exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o750)
    log = workdir / "amavis.log"
    log.touch()
    os.chown(log, pw.pw_uid, pw.pw_gid)
    port = daemons.free_port()
    conf = confdir / "amavisd.conf"
    conf.write_text(
        _CONF.format(
            home=home,
            log=log,
            port=port,
            forward_port=forward_port,
            children=children,
            clamd_socket=Path(clamd_socket).resolve(),
            sa_siteconfig=Path(sa_siteconfig).resolve(),
        )
    )
    os.chown(conf, 0, 0)
    os.chmod(conf, 0o644)
    argv = [AMAVISD]
    for confd in CONF_DIRS:
        listed = subprocess.run(["run-parts", "--list", confd], check=True, capture_output=True, text=True).stdout
        for path in listed.split():
            argv += ["-c", path]
    argv += ["-c", str(conf)]
    proc, pid, out = daemons._spawn([*argv, "foreground"], workdir, "amavisd")
    d = Amavis(port=port, pid=pid, log=log, config=conf, proc=proc, out=out)._register()
    try:
        daemons._wait(lambda: _greets(port), f"amavisd's 220 on 127.0.0.1:{port}", timeout, proc, [log, out])
    except BaseException:
        d.stop()
        raise
    return d


def postfix_master_lines(listener_port: int, amavis_port: int, reinject_port: int, children: int) -> str:
    """master.cf services for amavis as its README.postfix sets it up: a front smtpd handing every message to
    amavis, the transport to it (no more connections than amavis has children, or Postfix queues mail as if
    amavis were down), and the reinjection smtpd that skips every check the front one already made."""
    return f"""\
127.0.0.1:{listener_port} inet n - n - - smtpd
  -o syslog_name=postfix/amavis
  -o content_filter=smtp-amavis:[127.0.0.1]:{amavis_port}
smtp-amavis unix - - n - {children} smtp
  -o syslog_name=postfix/smtp-amavis
  -o smtp_data_done_timeout=1200
  -o smtp_send_xforward_command=yes
  -o smtp_dns_support_level=disabled
  -o max_use=20
127.0.0.1:{reinject_port} inet n - n - - smtpd
  -o syslog_name=postfix/reinject
  -o content_filter=
  -o smtpd_delay_reject=no
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o smtpd_helo_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o smtpd_data_restrictions=reject_unauth_pipelining
  -o smtpd_end_of_data_restrictions=
  -o smtpd_restriction_classes=
  -o mynetworks=127.0.0.0/8
  -o smtpd_error_sleep_time=0
  -o smtpd_soft_error_limit=1001
  -o smtpd_hard_error_limit=1000
  -o smtpd_client_connection_count_limit=0
  -o smtpd_client_connection_rate_limit=0
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
  -o receive_override_options=no_header_body_checks,no_unknown_recipient_checks,no_milters
  -o local_header_rewrite_clients=
  -o smtpd_milters=
  -o local_recipient_maps=
  -o relay_recipient_maps=
"""
