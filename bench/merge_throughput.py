"""Events per second through the merge (lookup, pure merge + enrich, guarded write) and MongoDB
round trips per event, next to the pure merge alone and the store's own bulk-upsert rate, all
measured in the same run. Prints one JSON object.

- live: events one at a time (a quiet system): each is a round of its own (its profile read, unless
  the process's profile cache holds it from an earlier event).
- backlog: ``--backlog-events`` over ``--backlog-profiles`` with ``--backlog-concurrency`` merges in
  flight (what the worker's threads hold under a backlog), merged in rounds (``workers/profiles/batch``)
  of at most half of them, two rounds in flight (the worker's defaults: 64 of 128).
- the store: unordered bulk upserts of profile-sized documents, ``--store-batch`` a request, doing the
  backlog's work: as many upserts per document as the backlog has events per profile (the first
  inserts, the rest change it), into a collection with the profile collection's indexes
  (``store_bulk_upserts_per_s``); and, for comparison with runs before 2026-12-01, inserts of new
  documents into an unindexed collection (``store_bulk_inserts_unindexed_per_s``).

The store's rate and the backlog are measured ``--repeats`` times, alternately (new people each time), and
reported as medians; ``ratio_to_store_bulk`` is the median of each repeat's ratio of the two, measured
minutes apart at most, so a machine that slows down for a while moves both sides of one ratio.

Uses ``MONGODB_URI`` when set, else a SecantusDB process of its own (a functional stand-in: its
absolute speed says nothing about MongoDB's; the ratios and round-trip counts are what carry over).

    python bench/merge_throughput.py [--events 2000] [--profiles 200] [--concurrency 8]
        [--backlog-events 20000] [--backlog-profiles 2000] [--backlog-concurrency 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench._store import bulk_upserts  # noqa: E402
from tests.support.commands import CommandCounts  # noqa: E402


def workload(n_events: int, n_profiles: int) -> list:
    from schemas.events import CustomerUpdated, OrderCompleted

    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    events = []
    for i in range(n_events):
        p = i % n_profiles
        base = {"source": "shopify", "event_time": t0 + timedelta(seconds=i), "received_at": t0,
                "identity": {"email": f"bench-{p}@example.com", "customer_id": str(10_000 + p)}}
        if i % 3 == 0:
            events.append(OrderCompleted(order_id=f"o{i}", total=Decimal("19.90"), event_id=f"o{i}", **base))
        else:
            events.append(CustomerUpdated(type="customer.updated", traits={"first_name": f"N{i}", "city": "Oslo"},
                                          event_id=f"u{i}", **base))
    return events


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--profiles", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--live-events", type=int, default=300)
    parser.add_argument("--backlog-events", type=int, default=20_000)
    parser.add_argument("--backlog-profiles", type=int, default=2_000)
    parser.add_argument("--backlog-concurrency", type=int, default=512)
    parser.add_argument("--store-docs", type=int, default=5_000)
    parser.add_argument("--store-batch", type=int, default=500)
    parser.add_argument("--round-max", type=int, help="most merges in one round (MERGETAG_MERGE_BATCH_MAX); default: half the "
                        "backlog's merges in flight, so two full rounds can be in flight, as the worker's defaults do")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the store's rate and the backlog this many times")
    args = parser.parse_args()

    from sandboxes.local import start_secantus

    process = None
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        process, uri = start_secantus()
    database = "bench" + uuid.uuid4().hex[:8]
    os.environ.update(MERGETAG_MONGODB_URI=uri, MERGETAG_MONGODB_DATABASE=database, MERGETAG_QUEUE_PREFIX=database)
    os.environ.setdefault("MERGETAG_IDENTITY_HASH_KEYS", "bench-identity-hash-key-0123456789")
    # The merge builds each target's member; nothing is sent, so any key will do.
    os.environ.setdefault("MERGETAG_MAILCHIMP_API_KEY", "bench0000000000000000000000000000-us1")
    os.environ.setdefault("MERGETAG_MAILCHIMP_LIST_ID", "bench")

    from pymongo import AsyncMongoClient

    from adapters.redis.trail import Trail
    from adapters.settings import Settings
    from adapters.store.profiles import ProfileStore
    from schemas.profile import Profile
    from workers.profiles.actors import trail_merge
    from workers.profiles.batch import MergeBatcher
    from workers.profiles.merge import merge_all
    from workers.profiles.resolve import merge_into_profile
    from workers.runtime import create_runtime

    events = workload(args.events, args.profiles)

    start = time.perf_counter()
    by_profile: dict[str, Profile] = {}
    for event in events:
        key = event.identity.email
        by_profile[key] = merge_all(by_profile.get(key, Profile(id=key)), [event], {"bronze": 0})
    pure_eps = len(events) / (time.perf_counter() - start)

    trips = CommandCounts()
    settings = Settings()
    store = ProfileStore(AsyncMongoClient(uri, tz_aware=True, event_listeners=[trips]), database, settings.hasher())
    await store.ensure_indexes()
    rt = await create_runtime(settings)
    store.feed = rt.store.feed  # the feed cache's invalidation and fill around every write, as deployed
    rt.store = store  # counted round trips
    # The same work as the backlog's writes: as many upserts per id, into a collection indexed like profiles.
    per_profile = max(1, args.backlog_events // args.backlog_profiles)
    sized = by_profile["bench-0@example.com"]

    async def store_rate() -> float:
        return await bulk_upserts(store, args.store_docs, args.store_batch, sized, rt.members(sized),
                                  distinct=max(1, args.store_docs // per_profile))

    store_inserts_unindexed = await bulk_upserts(store, args.store_docs, args.store_batch, sized, rt.members(sized), indexed=False)
    trips.counts.clear()
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def worker() -> None:
        while not queue.empty():
            event = queue.get_nowait()
            await merge_into_profile(rt, event.identity, [event])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    stored_eps = len(events) / elapsed
    total = sum(trips.counts.values())
    by_command = dict(trips.counts)
    sample = await store.load((await store.find_by_keys(["email:bench-0@example.com"]))[0].id)

    # Live: one event at a time, each a round of its own.
    live = [e.model_copy(update={"identity": e.identity.model_copy(update={"email": f"live-{e.identity.email}"})})
            for e in workload(args.live_events, args.live_events // 3 or 1)]
    batcher = MergeBatcher(rt, max_merges=args.round_max or max(1, args.backlog_concurrency // 2),
                           cache_profiles=settings.merge_cache_profiles, depth=settings.merge_rounds_in_flight)
    trips.counts.clear()
    for event in live:
        await batcher.merge(event.identity, [event])
    live_trips = sum(trips.counts.values()) / len(live)
    live_by_command = dict(trips.counts)

    # A backlog: many merges in flight, merged in rounds; then the same again (new people) with the event
    # trail written as the events actor writes it, to measure what the trail costs.
    trail = Trail(settings.redis_url, "bench" + uuid.uuid4().hex[:6], settings.trail_cap, settings.trail_ttl_s)

    async def run_backlog(tag: str, with_trail: bool) -> tuple[float, int, dict, int]:
        backlog = [e.model_copy(update={"identity": e.identity.model_copy(update={"email": f"{tag}-{e.identity.email}",
                                                                                   "customer_id": f"{tag}{e.identity.customer_id}"})})
                   for e in workload(args.backlog_events, args.backlog_profiles)]
        pending: asyncio.Queue = asyncio.Queue()
        for event in backlog:
            pending.put_nowait(event)

        async def in_flight() -> None:
            while not pending.empty():
                event = pending.get_nowait()
                result = await batcher.merge(event.identity, [event])
                if with_trail:
                    trail_merge(trail, event.source, event.event_id, result, [event])

        trips.counts.clear()
        rounds = batcher.rounds
        start = time.perf_counter()
        await asyncio.gather(*(in_flight() for _ in range(args.backlog_concurrency)))
        if with_trail:
            await trail.flushed()
        eps = len(backlog) / (time.perf_counter() - start)
        return eps, sum(trips.counts.values()), dict(trips.counts), batcher.rounds - rounds

    store_runs, backlog_runs, backlog_total, backlog_rounds, backlog_by_command = [], [], 0, 0, {}
    for repeat in range(max(1, args.repeats)):
        store_runs.append(await store_rate())
        eps, total_trips, by_command_backlog, rounds = await run_backlog(f"b{repeat}", with_trail=False)
        backlog_runs.append(eps)
        backlog_total += total_trips
        backlog_rounds += rounds
        backlog_by_command = backlog_by_command or by_command_backlog
    trail_eps, _, _, _ = await run_backlog("t", with_trail=True)
    trail_round_trips = trail.round_trips
    await trail.close()
    store_bulk, backlog_eps = statistics.median(store_runs), statistics.median(backlog_runs)
    ratios = [b / s for b, s in zip(backlog_runs, store_runs, strict=True)]
    backlog = range(args.backlog_events)
    backlog_trips = backlog_total / (len(backlog) * len(backlog_runs))
    check = await store.load((await store.find_by_keys(["email:b0-bench-0@example.com"]))[0].id)
    await store.client.drop_database(database)
    await store.close()
    if process:
        process.terminate()
    print(json.dumps({
        "events": len(events),
        "profiles": args.profiles,
        "concurrency": args.concurrency,
        "store": "SecantusDB" if process else "MONGODB_URI",
        "events_per_s": round(stored_eps, 1),
        "pure_merge_events_per_s": round(pure_eps, 1),
        "ratio": round(stored_eps / pure_eps, 4),
        "round_trips_per_event": round(total / len(events), 3),
        "round_trips_by_command": by_command,
        "orders_of_profile_0": sample[0].computed.order_count,
        "store_bulk_upserts_per_s": round(store_bulk, 1),
        "backlog_events": len(backlog),
        "backlog_profiles": args.backlog_profiles,
        "backlog_concurrency": args.backlog_concurrency,
        "backlog_events_per_s": round(backlog_eps, 1),
        "ratio_to_store_bulk": round(statistics.median(ratios), 3),
        "repeats": len(ratios),
        "store_bulk_upserts_per_s_by_repeat": [round(r, 1) for r in store_runs],
        "backlog_events_per_s_by_repeat": [round(r, 1) for r in backlog_runs],
        "ratio_to_store_bulk_by_repeat": [round(r, 3) for r in ratios],
        "store_bulk_inserts_unindexed_per_s": round(store_inserts_unindexed, 1),
        "ratio_to_unindexed_inserts": round(backlog_eps / store_inserts_unindexed, 3),
        "round_trips_per_event_backlog": round(backlog_trips, 4),
        "round_trips_by_command_backlog": backlog_by_command,
        "merges_per_round_backlog": round(len(backlog) * len(backlog_runs) / max(backlog_rounds, 1), 1),
        "round_trips_per_event_live": round(live_trips, 3),
        "round_trips_by_command_live": live_by_command,
        "orders_of_backlog_profile_0": check[0].computed.order_count,
        "backlog_events_per_s_with_trail": round(trail_eps, 1),
        "trail_slowdown": round(1 - trail_eps / backlog_eps, 3),
        "trail_redis_round_trips_per_event": round(trail_round_trips / len(backlog), 4),
    }))


if __name__ == "__main__":
    asyncio.run(main())
