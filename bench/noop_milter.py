"""The floor under milterd: a pymilter milter with milterd's callbacks and reply flags that does nothing.

`make bench` runs it beside milterd with every check off, so the table separates what pymilter and
the milter protocol cost from what milterd's own Python adds.
Usage: python -m bench.noop_milter inet:PORT@127.0.0.1
"""

from __future__ import annotations

import sys

import Milter


class Noop(Milter.Base):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname):
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from, *params):
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = Noop
    Milter.runmilter("noop", sys.argv[1], 30)
