"""The receiver's Redis parts share one pipeline per round, against real Redis."""

import asyncio
import uuid

from adapters.redis.dedup import Dedup
from adapters.redis.rounds import Rounds
from adapters.redis.trail import Trail
from sandboxes.local import free_port


async def test_lookups_remembered_keys_and_trail_entries_of_one_turn_share_one_round_trip():
    prefix = "rounds" + uuid.uuid4().hex[:8]
    rounds = Rounds("redis://127.0.0.1:6379/0")
    dedup, trail = Dedup(rounds, 60, prefix), Trail(rounds, prefix, cap=10, ttl_s=60)
    try:
        dedup.remember(["a", "b"])
        trail.add(["delivery:s:1"], "queued", n=1)
        await trail.flushed()
        assert rounds.round_trips == 1
        lookups = asyncio.gather(*(dedup.seen(keys) for keys in (["a", "x"], ["b"], ["y"])))
        trail.add(["delivery:s:2"], "queued", n=2)
        trail.tally("s", 3)
        found = await lookups
        await trail.flushed()
        assert found == [{"a"}, {"b"}, set()]
        assert rounds.round_trips == 2  # three lookups, an entry and a tally: one more round trip
        assert [e["n"] for e in await trail.read("delivery:s:1")] == [1]
        assert [e["n"] for e in await trail.read("delivery:s:2")] == [2]
        assert (await trail.rates())["s"] > 0
    finally:
        await rounds.redis.delete(*(f"{prefix}:dedup:{k}" for k in "ab"), f"{prefix}:trail:delivery:s:1", f"{prefix}:trail:delivery:s:2")
        await rounds.close()


async def test_without_redis_lookups_find_nothing_and_entries_are_dropped_not_raised():
    rounds = Rounds(f"redis://127.0.0.1:{free_port()}/0")
    dedup, trail = Dedup(rounds, 60, "nowhere"), Trail(rounds, "nowhere")
    trail.add(["delivery:s:1"], "queued")
    assert await dedup.seen(["a"]) == set()
    await trail.flushed()
    assert (rounds.round_trips, trail.round_trips) == (0, 0)
    await rounds.close()


def test_hiredis_packs_a_round_as_redis_py_does():
    from redis.asyncio.connection import Connection

    from adapters.redis.rounds import PackedConnection

    commands = [("MGET", "p:dedup:a", "p:dedup:é"), ("EVALSHA", "f" * 40, 1, "p:trail:x", 100, 604800, 1, '{"n":1}'),
                ("HINCRBY", b"k", "shopify", -3), ("SCRIPT LOAD", "return 1"), ("SET", "k", 1.5)]
    assert b"".join(PackedConnection().pack_commands(commands)) == b"".join(Connection().pack_commands(commands))
