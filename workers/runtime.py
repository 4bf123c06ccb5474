"""The workers' per-process resources: connections, ESP clients, rules, all built from Settings.

Created inside the worker's event loop (the MongoDB client and the ESP clients belong to it), once per
process, by the composition root (``workers/app.py``); tests build one with fakes instead."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta

from adapters.esps.base import Esp, member_hash
from adapters.esps.guard import EspGuard
from adapters.esps.registry import build_all, descriptor
from adapters.geoip import GeoReader, open_reader
from adapters.metrics import Metrics
from adapters.redis.coalesce import Coalescer
from adapters.redis.feed_cache import FeedCache, FeedWrites
from adapters.redis.trail import Trail
from adapters.settings import Settings
from adapters.sources.registry import EventMapping, build_mappings
from adapters.store.erasures import ErasureReceipts
from adapters.store.outbox import Members
from adapters.store.profiles import ProfileStore
from adapters.store.quarantine import Quarantine
from broker.dead_letters import DeadLetters
from schemas.profile import IdentityHasher, Profile
from workers.profiles.merge import MergeRules
from workers.sync import policy


@dataclass
class Backlogs:
    """Each target's pending profiles, as last counted: by the sweeper at every pass, or by a sync when
    that count is stale. The cheap estimate the routing needs, shared by the threads of a process."""

    counts: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    counting: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    """A count in flight per target: the syncs that find the last one stale meanwhile wait for it."""

    def note(self, esp: str, count: int) -> None:
        self.counts[esp] = (count, time.monotonic())

    def fresh(self, esp: str) -> int | None:
        """The last count, unless it is older than ``policy.BACKLOG_TTL_S`` (or there is none)."""
        count, at = self.counts.get(esp, (0, None))
        return count if at is not None and time.monotonic() - at <= policy.BACKLOG_TTL_S else None


@dataclass(kw_only=True)
class Runtime:
    settings: Settings
    store: ProfileStore
    esps: dict[str, Esp]
    mappings: dict[str, EventMapping]
    quarantine: Quarantine
    rules: MergeRules
    geo: GeoReader | None
    blocked: frozenset[str]
    coalescer: Coalescer
    guards: dict[str, EspGuard]
    leases: dict[str, timedelta]
    batch_leases: dict[str, timedelta]
    hasher: IdentityHasher
    receipts: ErasureReceipts
    dead_letters: DeadLetters
    metrics: Metrics = field(default_factory=Metrics)
    trail: Trail | None = None
    backlogs: Backlogs = field(default_factory=Backlogs)

    async def backlog(self, esp: str) -> int:
        """Pending profiles of ``esp`` (up to the bulk threshold): the sweeper's last count, else one of
        this process's own, at most one per ``policy.BACKLOG_TTL_S`` and one at a time (the syncs that
        find it stale meanwhile share it). Each count reads every pending profile."""
        count = self.backlogs.fresh(esp)
        if count is not None:
            return count
        counting = self.backlogs.counting.get(esp)
        if counting is None:
            counting = self.backlogs.counting[esp] = asyncio.ensure_future(self._count(esp))
        return await asyncio.shield(counting)

    async def _count(self, esp: str) -> int:
        try:
            count = await self.store.outbox.count_pending(esp, self.settings.sync_bulk_backlog)
            self.backlogs.note(esp, count)
            return count
        finally:
            del self.backlogs.counting[esp]

    def members(self, profile: Profile) -> Members:
        """What every ESP target should hold for ``profile``, with its hash. Pure."""
        return {name: (m := esp.member(profile), member_hash(m) if m is not None else None) for name, esp in self.esps.items()}


async def create_runtime(settings: Settings, metrics: Metrics | None = None, backlogs: Backlogs | None = None) -> Runtime:
    """Every resource of one worker process; indexes ensured, refusing to start on plaintext-keyed profiles."""
    hasher = settings.hasher()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, hasher)
    metrics = metrics or Metrics()
    built = build_all(settings, metrics)
    await store.ensure_indexes(tuple(built))
    if await store.unhashed_left():
        raise RuntimeError("profiles are still indexed by plain identifiers: run `mergetag profile rekey` once, then start the workers")
    if await store.unclaimed_left():
        raise RuntimeError("profiles were written before identity claims: run `mergetag profile rekey` once, then start the workers")
    if settings.feed_cache:
        store.feed = FeedWrites(FeedCache(settings.redis_url, settings.queue_prefix, settings.feed_cache_ttl_s), {n: esp for n, (esp, _) in built.items()})
    receipts = ErasureReceipts(store.client, settings.mongodb_database)
    await receipts.ensure_indexes()
    quarantine = Quarantine(store.client, settings.mongodb_database)
    rules = MergeRules({trait: tuple(sources) for trait, sources in settings.trait_priority.items()})
    geo = open_reader(settings.geoip_database)
    targets = settings.esp_targets()
    # A send holds its lease through every request it makes and, for bulk ESPs, the job it waits for.
    leases = {name: timedelta(seconds=descriptor(t.kind).lease(t.timeout_s, t.job_timeout_s, bulk=False)) for name, t in targets.items()}
    batch_leases = {name: timedelta(seconds=descriptor(t.kind).lease(t.timeout_s, t.job_timeout_s, bulk=True)) for name, t in targets.items()}
    return Runtime(settings=settings, store=store, esps={n: esp for n, (esp, _) in built.items()}, mappings=build_mappings(settings),
                   quarantine=quarantine, rules=rules, geo=geo, blocked=frozenset(settings.blocked_identifiers),
                   coalescer=Coalescer(settings.redis_url, settings.sync_coalesce_ms, settings.queue_prefix),
                   guards={n: guard for n, (_, guard) in built.items()}, leases=leases, batch_leases=batch_leases, hasher=hasher,
                   receipts=receipts, dead_letters=DeadLetters(settings.amqp_url, settings.queue_prefix), metrics=metrics,
                   backlogs=backlogs or Backlogs(),
                   trail=Trail(settings.redis_url, settings.queue_prefix, settings.trail_cap, settings.trail_ttl_s))


async def close_runtime(rt: Runtime) -> None:
    """Close the process's connections (on worker shutdown, inside the event loop)."""
    for esp in rt.esps.values():
        await esp.close()
    for guard in rt.guards.values():
        await guard.close()
    if rt.store.feed is not None:
        await rt.store.feed.cache.close()
    await rt.store.close()
    await rt.coalescer.close()
    if rt.trail is not None:
        await rt.trail.close()
