"""The Pyzor scoring rule (SpamAssassin's), the check's server walk with an injected query, and TtlCache."""

from __future__ import annotations

import threading

import pytest
import pyzor

from milterd.cache import TtlCache
from milterd.checks.pyzor import PyzorCheck, is_hit
from milterd.message import Envelope, Message, Spool
from milterd.scores import default_scores

SA = default_scores()["pyzor"]  # count_min 5, whitelist_min 10, whitelist_factor 0.2


@pytest.mark.parametrize(
    "count, wl_count, hit",
    [
        (0, 0, False),
        (4, 0, False),  # below count_min
        (5, 0, True),
        (100, 9, True),  # fewer than whitelist_min whitelistings never clear
        (40, 10, False),  # 10 >= 0.2 * 40: whitelisted
        (50, 10, False),  # 10 >= 0.2 * 50: whitelisted
        (51, 10, True),  # 10 < 0.2 * 51 = 10.2
        (5, 1000, False),
        (1_000_000, 0, False),  # SpamAssassin's hard limits: near-empty bodies
        (5, 10_000, False),
    ],
)
def test_spamassassin_pyzor_rule(count, wl_count, hit):
    assert is_hit(count, wl_count, SA) is hit


def test_the_thresholds_come_from_the_scores():
    assert is_hit(2, 0, {**SA, "count_min": 2})
    assert not is_hit(10, 3, {**SA, "whitelist_min": 3})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_keeps_for_ttl_then_forgets():
    clock = Clock()
    cache: TtlCache[int] = TtlCache(60, 10, clock)
    cache.put("a", 1)
    clock.now += 59.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is None and len(cache) == 0


def test_cache_drops_the_oldest_at_max_entries():
    clock = Clock()
    cache: TtlCache[int] = TtlCache(60, 3, clock)
    for i, key in enumerate("abcd"):
        clock.now += 1
        cache.put(key, i)
    assert [cache.get(k) for k in "abcd"] == [None, 1, 2, 3]
    cache.put("b", 9)  # a put refreshes: b is now the newest
    cache.put("e", 4)
    assert [cache.get(k) for k in "bcde"] == [9, None, 3, 4]


def test_cache_puts_drop_expired_entries():
    clock = Clock()
    cache: TtlCache[int] = TtlCache(1, 100, clock)
    for key in "abc":
        cache.put(key, 0)
    clock.now += 2
    cache.put("d", 0)
    assert len(cache) == 1


def test_cache_is_thread_safe():
    cache: TtlCache[int] = TtlCache(60, 500)

    def work(n):
        for i in range(2000):
            cache.put((n, i), i)
            cache.get((n, i - 1))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 500


def message(body: str = "Cheap watches and more for everyone\n" * 6) -> Message:
    spool = Spool()
    spool.write(b"Subject: x\r\n\r\n" + body.encode())
    return Message(Envelope(), spool)


class FakeServers:
    """query(digest, address, timeout) for an injected network: answers, errors or timeouts per port."""

    def __init__(self, answers):
        self.answers, self.asked, self.digests = answers, [], []

    def __call__(self, digest, address, timeout):
        self.asked.append((address[1], round(timeout, 1)))
        self.digests.append(digest)
        answer = self.answers[address[1]]
        if isinstance(answer, Exception):
            raise answer
        return answer


def check(query, *ports, timeout=4.0, max_size=512000):
    return PyzorCheck([f"127.0.0.1:{p}" for p in ports], timeout, max_size, SA, query=query)


def test_hit_scores_pyzor_check():
    finding = check(FakeServers({1: (7, 0)}), 1).run(message())
    assert finding.score == 1.985 and finding.symbols == (("PYZOR_CHECK", 1.985),)
    assert finding.detail == "count 7, whitelisted 0 (127.0.0.1:1)"
    assert not finding.critical


def test_servers_in_order_each_with_a_share_of_the_time():
    servers = FakeServers({1: pyzor.CommError("refused"), 2: pyzor.TimeoutError("slow"), 3: (0, 0)})
    finding = check(servers, 1, 2, 3, timeout=3.0).run(message())
    assert finding.status == "ok" and finding.detail.endswith("(127.0.0.1:3)")
    assert servers.asked == [(1, 1.0), (2, 1.5), (3, 3.0)]  # nothing was spent: each share grows


def test_all_timeouts_is_timeout_else_unavailable():
    timeout = check(FakeServers({1: pyzor.TimeoutError("t"), 2: pyzor.TimeoutError("t")}), 1, 2).run(message())
    assert timeout.status == "timeout" and timeout.failed
    mixed = check(FakeServers({1: pyzor.TimeoutError("t"), 2: pyzor.CommError("refused")}), 1, 2).run(message())
    assert mixed.status == "unavailable" and "127.0.0.1:2: refused" in mixed.detail


def test_answers_are_cached_failures_are_not():
    servers = FakeServers({1: pyzor.CommError("down")})
    pyzor_check = check(servers, 1)
    assert pyzor_check.run(message()).status == "unavailable"
    servers.answers[1] = (1, 0)
    assert pyzor_check.run(message()).detail == "count 1, whitelisted 0 (127.0.0.1:1)"
    servers.answers[1] = (9, 0)
    assert pyzor_check.run(message()).detail == "count 1, whitelisted 0 (127.0.0.1:1, cached)"
    assert len(servers.asked) == 2


def test_over_max_size_the_truncated_message_is_digested_as_amavis_gives_it_to_sa():
    """amavis truncates what SpamAssassin gets; its Pyzor plugin digests that: so does milterd."""
    from milterd.checks.pyzor import digest

    servers = FakeServers({1: (7, 0)})
    big = message("Cheap watches and more for everyone\n" * 6 + "Unrelated tail text\n" * 100)
    finding = check(servers, 1, max_size=6 * 36).run(big)
    assert finding.status == "ok" and finding.symbols == (("PYZOR_CHECK", 1.985),)
    assert finding.detail.endswith(f"; truncated: first {14 + 6 * 36} of {big.size} bytes digested")
    head = digest(b"Subject: x\r\n\r\n" + b"Cheap watches and more for everyone\n" * 6)
    with big.open() as whole:
        assert digest(whole.read()) != head  # the full message's digest is another one
    assert servers.digests == [head]
