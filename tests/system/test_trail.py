"""The event trail against real Redis: bounded per subject, expiring, and never in the way."""

import uuid

import pytest

from adapters.redis.trail import Trail
from sandboxes.local import free_port


async def test_a_trail_keeps_the_newest_entries_up_to_its_cap_and_expires():
    prefix = "trail" + uuid.uuid4().hex[:8]
    trail = Trail("redis://127.0.0.1:6379/0", prefix, cap=100, ttl_s=60)
    try:
        for n in range(120):
            trail.add(["profile:p_1", "event:e_1"], "merged", version=n)
        await trail.flushed()
        entries = await trail.read("profile:p_1")
        assert [e["version"] for e in entries] == list(range(20, 120))  # oldest first, the oldest 20 dropped
        assert entries == await trail.read("event:e_1")
        assert trail.round_trips < 120  # group commit: entries added together share a round trip
        assert 0 < await trail._redis.ttl(f"{prefix}:trail:profile:p_1") <= 60
    finally:
        await trail._redis.delete(f"{prefix}:trail:profile:p_1", f"{prefix}:trail:event:e_1")
        await trail.close()


async def test_entries_of_different_subjects_in_one_round_and_after_redis_forgot_its_scripts():
    prefix = "trail" + uuid.uuid4().hex[:8]
    trail = Trail("redis://127.0.0.1:6379/0", prefix, cap=3, ttl_s=60)
    try:
        trail.add(["profile:a", "event:x"], "merged", n=1)
        trail.add(["profile:b"], "synced", n=2)
        trail.add([], "nowhere")
        trail.add(["profile:a"], "synced", n=3)
        await trail.flushed()
        assert trail.round_trips == 1
        await trail._redis.script_flush()  # as after a Redis restart: the next round loads the script again
        trail.add(["profile:b"], "merged", n=4)
        await trail.flushed()
        assert [(e["stage"], e["n"]) for e in await trail.read("profile:a")] == [("merged", 1), ("synced", 3)]
        assert [e["n"] for e in await trail.read("profile:b")] == [2, 4]
        assert [e["n"] for e in await trail.read("event:x")] == [1]
    finally:
        await trail._redis.delete(*(f"{prefix}:trail:{s}" for s in ("profile:a", "profile:b", "event:x")))
        await trail.close()


async def test_a_trail_without_redis_costs_nothing_but_the_trail():
    trail = Trail(f"redis://127.0.0.1:{free_port()}/0", "nowhere")
    trail.add(["profile:p_1"], "merged")
    await trail.flushed()  # logged, not raised
    assert trail.round_trips == 0
    await trail.close()


async def test_accepted_events_are_counted_per_source_for_the_last_minute():
    prefix = "trail" + uuid.uuid4().hex[:8]
    trail = Trail("redis://127.0.0.1:6379/0", prefix)
    try:
        trail.tally("shopify", 30)
        trail.tally("tracking", 6)
        trail.tally("shopify", 30)
        await trail.flushed()
        rates = await trail.rates()
        assert set(rates) == {"shopify", "tracking"} and rates["tracking"] > 0
        assert rates["shopify"] / rates["tracking"] == pytest.approx(10, rel=0.1)  # rates are rounded to 0.01/s
    finally:
        await trail.close()
