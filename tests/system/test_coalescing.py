"""However long the sync takes to come round, the sync queue holds at most one coalesced message per
profile and target: a change finds the one already waiting and relies on it."""

import asyncio
import uuid

from broker import topology
from tests.conftest import eventually, own_pipeline, post_webhook, queue_counts
from tests.support.samples import customer


async def test_changes_while_a_sync_waits_add_no_second_message(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    # The sync is down and its sweeper with it: every message scheduled stays in the queue to be counted.
    async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_SYNC_COALESCE_MS="100", MERGETAG_SYNC_GRACE_S="60") as pipeline:
        prefix = pipeline.env["MERGETAG_QUEUE_PREFIX"]
        email = f"coalesce-{uuid.uuid4().hex[:8]}@example.com"
        for n in range(8):  # each change after the window of the one before
            body = customer(email, first_name=f"C{n}", updated_at=f"2025-07-01T10:00:{n:02d}Z")
            assert (await post_webhook(http, pipeline.url, "customers/update", body)).status == 202

            async def merged(n=n):
                doc = await pipeline.db.profiles.find_one({"email": email})
                return doc and doc["traits"]["first_name"]["value"] == f"C{n}"

            await eventually(merged)
            await asyncio.sleep(0.15)
        sync = topology.sync_queue(prefix)
        counts = await asyncio.to_thread(queue_counts, prefix)
        assert sum(n for name, n in counts.items() if name.startswith(sync) and not name.endswith(".XQ")) == 1, counts
        pipeline.start_sync()

        async def synced():
            member = await sandbox.member(http, email)
            return member if member and member["merge_fields"]["FNAME"] == "C7" else None

        await eventually(synced)


async def test_many_changes_at_once_each_find_their_marker_past_the_pool_size(rabbitmq):
    """Hundreds of merges of one worker ask at once: they wait for a connection, none is refused
    (refused, the change would schedule a sync of its own)."""
    from adapters.redis.coalesce import MAX_CONNECTIONS, Coalescer

    prefix = "co" + uuid.uuid4().hex[:8]
    coalescer = Coalescer("redis://127.0.0.1:6379/0", 5_000, prefix)
    try:
        profiles = [f"p_{n}" for n in range(MAX_CONNECTIONS * 5)]
        asked = await asyncio.gather(*(coalescer.first_in_window(["mailchimp", "klaviyo"], p) for p in profiles * 2))
        for n in range(len(profiles)):  # one change of each profile schedules the sync, the other relies on it
            assert sorted([asked[n], asked[n + len(profiles)]]) == [[], ["mailchimp", "klaviyo"]]
    finally:
        await coalescer._redis.delete(*(f"{prefix}:sync-scheduled:{esp}:{p}" for p in profiles for esp in ("mailchimp", "klaviyo")))
        await coalescer.close()
