"""The profile stage's actors: thin. Each moves a message through the pure core and the store.

``process_event``: validate -> map -> context -> merge (+ enrich) into MongoDB (in rounds with the other
messages in flight, ``batch.py``, unless ``MERGETAG_MERGE_BATCH_MAX`` is 1) -> schedule the sync.
``check_abandonment``: a delayed message; an open checkout still untouched becomes an abandoned cart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dramatiq

from adapters.redis.trail import Trail, delivery_subject
from broker import topology
from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import CheckoutChanged, CustomerErased, Event
from workers.profiles import erasure
from workers.profiles.batch import MergeBatcher
from workers.profiles.context import with_context
from workers.profiles.deliveries import attributable, by_identity, events_for, parse_delivery
from workers.profiles.forget import erase_person, remove_payloads
from workers.profiles.resolve import Merged, expire_cart, merge_into_profile
from workers.runtime import Runtime
from workers.sync.actors import SyncActors

log = logging.getLogger(__name__)

GetRuntime = Callable[[], Awaitable[Runtime]]


@dataclass(frozen=True)
class ProfileActors:
    process_event: dramatiq.Actor
    check_abandonment: dramatiq.Actor


def events_of(delivery: dict[str, Any], rt: Runtime) -> tuple[Delivery, list[Event]]:
    """The delivery's attributable events with their context (CPU work: run off the event loop)."""
    parsed = parse_delivery(delivery)
    events = [derived for event in events_for(parsed, rt.mappings) for derived in with_context(event, rt.geo)]
    return parsed, attributable(events, rt.blocked)


def trail_merge(trail: Trail, source: str, delivery_id: str, result: Merged, events: list[Event]) -> None:
    """A merge's entry in the trails of its profile and each of its events (the entry names its
    delivery, whose own trail says when it was received and queued)."""
    ids = sorted({e.event_id for e in events})
    trail.add([f"profile:{result.profile_id}", *(f"event:{i}" for i in ids)],
              "merged" if result.version is not None else "unchanged", profile=result.profile_id, version=result.version,
              traits=list(result.traits), events=ids, delivery=f"{source}:{delivery_id}", targets=result.targets)


def declare(broker: dramatiq.Broker, runtime: GetRuntime, sync: SyncActors, prefix: str) -> ProfileActors:
    """The profile actors on ``broker``; changed profiles are handed to ``sync``."""
    queue = topology.events_queue(prefix)
    later: list[dramatiq.Actor] = []
    batchers: dict[int, MergeBatcher] = {}

    def batcher(rt: Runtime) -> MergeBatcher:
        """The process's merge rounds (one per runtime, so per event loop)."""
        if id(rt) not in batchers:
            batchers[id(rt)] = MergeBatcher(rt, rt.settings.merge_batch_max, rt.settings.merge_batch_window_ms / 1000,
                                           rt.settings.merge_cache_profiles, rt.settings.merge_rounds_in_flight)
        return batchers[id(rt)]

    async def process_event(delivery: dict[str, Any]) -> None:
        """Invalid input goes to quarantine (kept, not retried); UnsupportedEvent is dead-lettered;
        anything transient raises and is retried. Erasures go first: nothing else in the delivery
        may outlive them."""
        rt = await runtime()
        started = time.perf_counter()
        try:
            result = await merge_delivery(rt, delivery)
        except Exception:
            rt.metrics.events_merged.labels("failed").inc()
            raise
        rt.metrics.events_merged.labels(result).inc()
        rt.metrics.merge_seconds.observe(time.perf_counter() - started)

    async def merge_delivery(rt: Runtime, delivery: dict[str, Any]) -> str:
        """:func:`process_event`'s work; returns what became of the delivery (the merge metric's result)."""
        try:
            parsed, events = await asyncio.to_thread(events_of, delivery, rt)
        except EventInvalid as exc:
            named = sorted({rt.hasher.index_key(k) for k in erasure.delivery_keys(delivery, rt.mappings)})
            key = await rt.quarantine.put(delivery, exc.errors, str(delivery.get("schema_version")), keys=named)
            log.warning("delivery %s quarantined: %s", key, exc.detail)
            if rt.trail is not None:
                rt.trail.add([delivery_subject(delivery.get("source"), delivery.get("delivery_id"))], "quarantined",
                             reasons=sorted({f"{e.get('event')}:{e.get('loc')}:{e.get('type')}" for e in exc.errors}))
            return "quarantined"
        for erased in (e for e in events if isinstance(e, CustomerErased)):
            plan = await erase_person(rt, erased)
            if plan is not None:
                if plan.addresses:
                    await sync.schedule(rt, plan.tombstone.id, list(rt.esps), urgent=True)
                await remove_payloads(rt, plan)
        merged, to_check = [], []
        for identity, group in by_identity(e for e in events if not isinstance(e, CustomerErased)).items():
            if rt.settings.merge_batch_max > 1:
                result = await batcher(rt).merge(identity, group)
            else:
                result = await merge_into_profile(rt, identity, group)
            if result.targets:
                merged.append(result)
            if rt.trail is not None:
                trail_merge(rt.trail, parsed.source, parsed.delivery_id, result, group)
            to_check += [(result.profile_id, e.checkout_id, e.event_time.isoformat())
                         for e in group if isinstance(e, CheckoutChanged) and not e.completed]
        for result in merged:
            await sync.schedule(rt, result.profile_id, result.targets, result.urgent, result.handed)
        delay_ms = int(rt.settings.cart_abandon_delay_s * 1000)
        for args in to_check:
            # If nothing has touched the checkout by then, the cart counts as abandoned.
            await asyncio.to_thread(later[0].send_with_options, args=args, delay=delay_ms)
        log.info("delivery %s/%s merged; %d profile(s) to sync", parsed.source, parsed.delivery_id, len(merged))
        return "changed" if merged else "unchanged"

    async def check_abandonment(profile_id: str, checkout_id: str, at: str) -> None:
        rt = await runtime()
        result = await expire_cart(rt, profile_id, checkout_id, datetime.fromisoformat(at))
        if result is not None:
            await sync.schedule(rt, result.profile_id, result.targets)

    actors = ProfileActors(
        process_event=dramatiq.actor(process_event, broker=broker, actor_name=topology.PROCESS_EVENT_ACTOR, queue_name=queue),
        check_abandonment=dramatiq.actor(check_abandonment, broker=broker, actor_name=topology.CHECK_ABANDONMENT_ACTOR, queue_name=queue),
    )
    later.append(actors.check_abandonment)
    return actors
