"""The composition root: every part of a worker process, built from Settings, in one place.

Nothing is built at import time. ``build(settings)`` initialises logging and Sentry (before the
broker: Sentry's integration patches it), makes the RabbitMQ broker, declares the profile and sync
actors on it, and gives them the process's runtime, created lazily inside the worker's event loop.
Tests pass a stub broker and a runtime of fakes instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import dramatiq

from adapters import logs
from adapters.esps.registry import build_guard, descriptor
from adapters.metrics import Metrics
from adapters.redis.trail import DeadLetterNotes, delivery_subject
from adapters.sentry import init_sentry
from adapters.settings import Settings
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.middleware import CloseOnShutdown
from broker.setup import create_broker
from workers.profiles import actors as profile_actors
from workers.runtime import Backlogs, Runtime, close_runtime, create_runtime
from workers.sync import actors as sync_actors
from workers.sync import alerts, sweeper


class Lazy:
    """The process's runtime: created once, on first use, under a lock (inside the event loop it belongs to)."""

    def __init__(self, create: Callable[[], Awaitable[Runtime]], close: Callable[[Runtime], Awaitable[None]] = close_runtime) -> None:
        self._create, self._close = create, close
        self._runtime: Runtime | None = None
        self._lock: asyncio.Lock | None = None

    async def get(self) -> Runtime:
        if self._runtime is not None:
            return self._runtime
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._runtime is None:
                self._runtime = await self._create()
        return self._runtime

    async def close(self) -> None:
        if self._runtime is not None:
            rt, self._runtime = self._runtime, None
            await self._close(rt)


@dataclass(frozen=True)
class Workers:
    settings: Settings
    broker: dramatiq.Broker
    runtime: Lazy
    profiles: profile_actors.ProfileActors
    sync: sync_actors.SyncActors
    metrics: Metrics
    backlogs: Backlogs
    """Each target's backlog as the sweeper last counted it: the process's syncs route by it."""

    def sweeper(self, stop: asyncio.Event) -> Awaitable[None]:
        """The pending sweeper of every configured ESP target, until ``stop`` is set."""
        s = self.settings
        store = ProfileStore.connect(s.mongodb_uri, s.mongodb_database)
        targets = {name: sweeper.Target(descriptor(t.kind).batch_limit, build_guard(t, s)) for name, t in s.esp_targets().items()}
        return sweeper.run(store, self.sync, targets, interval=s.sync_sweep_interval_s, grace=timedelta(seconds=s.sync_grace_s),
                           lease=timedelta(seconds=s.sync_lease_s), stop=stop, bulk_backlog=s.sync_bulk_backlog, metrics=self.metrics,
                           counted=self.backlogs.note)


    def alerts(self, stop: asyncio.Event) -> Awaitable[None]:
        """The alert watch of the sync process, until ``stop`` is set."""
        s = self.settings
        guards = {name: build_guard(t, s) for name, t in s.esp_targets().items()}
        bounds = alerts.Bounds(dead_letters=s.alert_dead_letters, circuit_s=s.alert_circuit_open_s, freshness_p99_s=s.alert_freshness_p99_s)
        return alerts.watch(stop, amqp_url=s.amqp_url, prefix=s.queue_prefix, episodes=alerts.Episodes(s.redis_url, s.queue_prefix),
                            metrics=self.metrics, guards=guards, bounds=bounds, interval=s.alert_interval_s)


def trail_subjects(actor: str, args: tuple) -> list[str]:
    """The trails a dead-lettered message of ``actor`` belongs in: its delivery's, or its profiles'."""
    if actor == topology.PROCESS_EVENT_ACTOR and args and isinstance(args[0], dict):
        return [delivery_subject(args[0].get("source"), args[0].get("delivery_id"))]
    if actor == topology.SYNC_BATCH_ACTOR and args and isinstance(args[0], list):
        return [f"profile:{pid}" for pid in args[0]]
    return [f"profile:{args[0]}"] if args and isinstance(args[0], str) else []


def build(settings: Settings, *, component: str = "worker", broker: dramatiq.Broker | None = None,
          runtime: Callable[[], Awaitable[Runtime]] | None = None, metrics: Metrics | None = None) -> Workers:
    """Every actor of the pipeline on one broker (default: RabbitMQ, from ``settings``, installed as
    Dramatiq's global broker; a given one, e.g. a test's stub, needs the AsyncIO middleware);
    ``runtime`` (default: from ``settings``) creates the process's resources, closed on worker shutdown;
    ``metrics``: the process's (one of its own by default)."""
    metrics = metrics or Metrics()
    backlogs = Backlogs()
    lazy = Lazy(runtime or (lambda: create_runtime(settings, metrics, backlogs)))
    if broker is None:
        logs.install()
        init_sentry(settings, component)
        notes = DeadLetterNotes(settings.redis_url, settings.queue_prefix, settings.trail_cap, settings.trail_ttl_s, trail_subjects)
        broker = create_broker(settings.amqp_url, retry_max=settings.retry_max, min_backoff_ms=settings.retry_min_backoff_ms,
                               max_backoff_ms=settings.retry_max_backoff_ms, on_shutdown=lazy.close, on_dead_letter=notes)
        dramatiq.set_broker(broker)
    else:
        broker.add_middleware(CloseOnShutdown(lazy.close))
    sync = sync_actors.declare(broker, lazy.get, settings.queue_prefix)
    profiles = profile_actors.declare(broker, lazy.get, sync, settings.queue_prefix)
    return Workers(settings=settings, broker=broker, runtime=lazy, profiles=profiles, sync=sync, metrics=metrics, backlogs=backlogs)
