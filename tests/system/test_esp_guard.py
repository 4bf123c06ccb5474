"""The shared ESP guard on real Redis, and two sync processes that never exceed one account's limit."""

import asyncio
import uuid

import aiohttp
import pytest

from adapters.esps.guard import EspGuard, rate_patience
from broker import admin, topology
from schemas.errors import EspRejected, EspUnavailable, RateSpent
from tests.conftest import AMQP_URL, API_KEY, eventually, post_webhook, spawn, stop
from tests.support.samples import customer

REDIS = "redis://127.0.0.1:6379/0"


def guards(n: int, **options) -> list[EspGuard]:
    account = f"test:{uuid.uuid4().hex[:8]}"
    return [EspGuard(REDIS, account, prefix="guardtest", **options) for _ in range(n)]


async def test_two_holders_of_one_account_never_exceed_its_limit():
    a, b = guards(2, limit=3, wait_s=10)
    in_use, peak = 0, 0

    async def call(guard):
        nonlocal in_use, peak
        async with guard.call():
            in_use += 1
            peak = max(peak, in_use)
            await asyncio.sleep(0.03)
            in_use -= 1

    await asyncio.gather(*(call(a if n % 2 else b) for n in range(30)))
    assert peak == 3
    assert (await a.state())["connections_in_use"] == 0
    for g in (a, b):
        await g.close()


async def test_429s_halve_the_connections_and_successes_win_them_back():
    (g,) = guards(1, limit=8, failures=100)
    for _ in range(2):
        with pytest.raises(EspUnavailable):
            async with g.call():
                raise EspUnavailable("mailchimp 429 Too Many Requests")
    assert (await g.state())["connection_limit"] == 2
    for _ in range(3):
        async with g.call():
            pass
    assert (await g.state())["connection_limit"] == 5
    await g.close()


async def test_circuit_opens_fails_fast_and_recovers():
    (g,) = guards(1, failures=3, open_s=2.0)  # long enough that a busy machine still checks it while open
    with pytest.raises(EspRejected):  # a member-level refusal says nothing about the account's health
        async with g.call():
            raise EspRejected("mailchimp 400")
    for _ in range(3):
        with pytest.raises(EspUnavailable):
            async with g.call():
                raise EspUnavailable("mailchimp 503")
    assert (await g.state())["circuit"] == "open"
    with pytest.raises(EspUnavailable) as fast:
        async with g.call():
            pytest.fail("an open circuit must not call the ESP")
    assert fast.value.code == "circuit_open" and 0 < fast.value.retry_after <= 2.0
    await asyncio.sleep(2.1)
    assert (await g.state())["circuit"] == "half-open"
    async with g.call():
        pass
    assert (await g.state())["circuit"] == "closed"
    await g.close()


async def test_half_open_lets_one_trial_through_and_a_failed_trial_reopens_without_counting():
    """After the open period exactly one caller tries the ESP; the rest fail fast. A failed trial is
    reported as the open circuit (the retry middleware does not count it as the message's attempt)."""
    (g,) = guards(1, failures=2, open_s=1.5)
    for _ in range(2):
        with pytest.raises(EspUnavailable):
            async with g.call():
                raise EspUnavailable("klaviyo 503")
    await asyncio.sleep(1.6)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def trial():
        async with g.call():
            entered.set()
            await release.wait()
            raise EspUnavailable("klaviyo 503")

    task = asyncio.create_task(trial())
    await entered.wait()
    with pytest.raises(EspUnavailable) as waiting:
        async with g.call():
            pytest.fail("only the trial may call the ESP while half-open")
    assert waiting.value.code == "circuit_open"
    release.set()
    with pytest.raises(EspUnavailable) as failed_trial:
        await task
    assert failed_trial.value.code == "circuit_open"
    assert (await g.state())["circuit"] == "open"
    await g.close()


async def test_a_spent_bucket_raises_rate_spent_at_once_within_patience_and_leaves_other_buckets_free():
    """Within ``rate_patience`` a call whose bucket has no room for longer than that fails, as RateSpent
    (an EspBusy), and counts nothing (without it, the call would wait the 5.5 s for room: within
    ``wait_s``); another bucket of the account still has room."""
    a, b = guards(2, wait_s=30, rates={"import": [(2, 5.0)], "bulk": [(10, 1.0)]})
    for guard in (a, b):
        async with guard.call("import"):
            pass
    with rate_patience(0.2), pytest.raises(RateSpent) as spent:
        async with a.call("import", kind="POST"):
            pytest.fail("a spent bucket must not call the ESP")
    assert spent.value.retry_after and spent.value.retry_after > 1.0
    async with b.call("bulk", kind="POST"):  # the bulk bucket is its own
        pass
    assert await a.requests() == {"request": 2, "POST": 1}
    for g in (a, b):
        await g.close()


async def test_admitted_requests_are_counted_per_kind_across_holders():
    """Every holder of the account adds to one count per kind; a call refused admission sent nothing and is not counted."""
    a, b = guards(2, failures=2, open_s=30)
    for guard, kind in ((a, "PUT"), (b, "PUT"), (b, "GET")):
        async with guard.call(kind=kind):
            pass
    with pytest.raises(EspUnavailable):  # admitted, then failed: it was sent, so it counts
        async with a.call(kind="POST"):
            raise EspUnavailable("mailchimp 503")
    with pytest.raises(EspUnavailable):
        async with a.call(kind="POST"):
            raise EspUnavailable("mailchimp 503")
    with pytest.raises(EspUnavailable) as fast:
        async with a.call(kind="POST"):
            pytest.fail("an open circuit must not call the ESP")
    assert fast.value.code == "circuit_open"
    assert await a.requests() == await b.requests() == {"PUT": 2, "GET": 1, "POST": 2}
    for g in (a, b):
        await g.close()


async def test_two_sync_processes_share_one_connection_limit(receiver, system, sandbox, http, tmp_path):
    second = spawn(system.env, tmp_path / "sync-2.log", "sync")
    prefix = system.settings.queue_prefix

    async def both_consuming():
        counts = await asyncio.to_thread(admin.consumer_counts, AMQP_URL, prefix)
        return counts.get(topology.sync_queue(prefix), 0) >= 2

    await eventually(both_consuming, timeout=90)
    auth = aiohttp.encode_basic_auth("t", API_KEY)
    # Slow enough that the sends overlap however spread out a busy machine merges them.
    await sandbox.control(http, "latency", {"ms": 600})
    await sandbox.control(http, "stats/reset", {})
    try:
        # Fewer than the take-along threshold: each profile goes in its own PUT, so connections are what is measured.
        emails = [f"limit-{uuid.uuid4().hex[:8]}@example.com" for _ in range(16)]
        replies = await asyncio.gather(*(post_webhook(http, receiver, "customers/create", customer(e)) for e in emails))
        assert {r.status for r in replies} == {202}

        async def all_there():  # one request per poll: the test must not crowd the connections it measures
            async with http.get(f"{sandbox.api}/lists/sandbox/members", headers={"Authorization": auth}) as r:
                present = {m["email_address"] for m in (await r.json())["members"]} if r.status == 200 else set()
            return set(emails) <= present

        await eventually(all_there, timeout=60)
        stats = await sandbox.control(http, "stats")
        # The account allows 3 connections in these tests: reached, never exceeded, across both processes,
        # and both did part of the work.
        assert stats["max_writes_in_flight"] == 3

        async def both_worked():  # each logs its sends once the ESP answered them
            logs = [(tmp_path / "sync-2.log").read_text(), (system.logs / "sync.log").read_text()]
            return all("synced to mailchimp" in log for log in logs)

        await eventually(both_worked)
    finally:
        await sandbox.control(http, "latency", {"ms": 0})
        stop([second])


async def test_a_429_storm_slows_the_sync_and_loses_or_repeats_nothing(receiver, system, sandbox, http):
    emails = [f"storm-{uuid.uuid4().hex[:8]}@example.com" for _ in range(6)]
    await sandbox.control(http, "faults", {"status": 429, "count": 8})
    replies = await asyncio.gather(*(post_webhook(http, receiver, "customers/create", customer(e, first_name="Storm")) for e in emails))
    assert {r.status for r in replies} == {202}

    async def all_there():
        members = [await sandbox.member(http, e) for e in emails]
        return members if all(members) else None

    members = await eventually(all_there, timeout=60)
    assert all(m["merge_fields"]["FNAME"] == "Storm" for m in members)
    assert all(m["update_count"] == 1 for m in members)  # refused attempts never landed twice
    assert (await sandbox.control(http, "faults", {"count": 0}))["pending_faults"] == 0


async def test_rate_headers_saying_a_budget_is_spent_pause_that_bucket_only():
    """Klaviyo's and SendGrid's rate-limit headers describe one endpoint's budget: the imports' being spent
    pauses imports in every holder (RateSpent within patience), not the bulk jobs."""
    a, b = guards(2, wait_s=30)
    await a.rate_seen(0, 20.0, bucket="import")
    with rate_patience(0.2), pytest.raises(RateSpent) as spent:
        async with b.call("import"):
            pytest.fail("a paused bucket must not call the ESP")
    assert spent.value.retry_after and spent.value.retry_after > 10
    async with b.call("bulk"):
        pass
    assert (await a.state())["paused_for_s"] > 10 and await b.requests() == {"request": 1}
    for g in (a, b):
        await g.close()
