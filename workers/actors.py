"""The pipeline's actors. Importing this module installs the broker.

``process_event``: validate -> map -> merge (+ enrich) into MongoDB -> mark for sync.
``sync_profile``: send the profile's member to the ESP unless it already holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

import dramatiq

from adapters.esp.base import Esp
from adapters.settings import get_settings
from adapters.store import Members, ProfileStore
from broker import topology
from broker.middleware import as_dead_letter
from broker.setup import create_broker
from schemas.errors import EspRejected, EspUnavailable, EventInvalid, MergetagError, SyncBusy
from schemas.events import CheckoutChanged, Event, Identity
from schemas.profile import ANONYMOUS, EMAIL, Profile, identity_key, profile_keys
from workers.derive import with_context
from workers.enrich import enrich, expire_checkout
from workers.merge import merge_profiles
from workers.pipeline import (
    attributable,
    by_identity,
    events_for,
    lookup_keys,
    merge_all,
    new_profile,
    over_limits,
    parse_delivery,
    with_erased,
)
from workers.runtime import Runtime, close_runtime, runtime

log = logging.getLogger(__name__)
settings = get_settings()
broker = create_broker(settings, on_shutdown=close_runtime)

MAX_WRITE_ATTEMPTS = 20
TAKE_ALONG = 1_000
TAKE_ALONG_MIN = 20


class LostRace(MergetagError):
    """Another worker kept winning the optimistic write; try the whole message again later."""

    code = "write_contention"
    retryable = True


@dramatiq.actor(actor_name=topology.PROCESS_EVENT_ACTOR, queue_name=topology.events_queue(settings.queue_prefix))
async def process_event(delivery: dict[str, Any]) -> None:
    """Invalid input goes to quarantine (kept, not retried); UnsupportedEvent is dead-lettered;
    anything transient raises and is retried."""
    rt = await runtime()
    try:
        parsed = parse_delivery(delivery)
        events = [derived for event in events_for(parsed, rt.mappings) for derived in with_context(event, rt.geo)]
        events = attributable(events, rt.blocked)
    except EventInvalid as exc:
        key = await rt.quarantine.put(delivery, exc.errors, str(delivery.get("schema_version")))
        log.warning("delivery %s quarantined: %s", key, exc.detail)
        return
    to_sync, to_check = [], []
    for identity, group in by_identity(events).items():
        profile_id, targets, urgent = await merge_into_profile(rt.store, identity, group)
        if targets:
            to_sync.append((profile_id, targets, urgent))
        to_check += [(profile_id, e.checkout_id, e.event_time.isoformat())
                     for e in group if isinstance(e, CheckoutChanged) and not e.completed]
    for profile_id, targets, urgent in to_sync:
        await schedule_sync(profile_id, targets, urgent)
    delay_ms = int(rt.settings.cart_abandon_delay_s * 1000)
    for profile_id, checkout_id, at in to_check:
        # A delayed message: if nothing has touched the checkout by then, the cart counts as abandoned.
        await asyncio.to_thread(check_abandonment.send_with_options, args=(profile_id, checkout_id, at), delay=delay_ms)
    log.info("delivery %s/%s merged; %d profile(s) to sync", parsed.source, parsed.delivery_id, len(to_sync))


def consent_changed(before: Profile, after: Profile) -> bool:
    """An existing consent that changed, or a first unsubscribe: what must reach the ESP before anything else."""
    old = before.consent.get("email")
    new = after.consent.get("email")
    if new is None or (old is not None and old.state == new.state):
        return False
    return old is not None or new.state == "unsubscribed"


async def schedule_sync(profile_id: str, targets: list[str], urgent: bool = False) -> None:
    """Per ESP target, one delayed sync per profile per coalescing window; it sends whatever the
    profile is by then. Consent changes and erasures are urgent: they skip the window and jump the queue.
    """
    rt = await runtime()
    for esp in targets:
        if urgent:
            await asyncio.to_thread(sync_urgent.send_with_options, args=(profile_id, esp), broker_priority=topology.URGENT)
        elif await rt.coalescer.first_in_window(esp, profile_id):
            await asyncio.to_thread(sync_profile.send_with_options, args=(profile_id, esp), delay=rt.coalescer.window_ms or None)


def changed(members: Members, meta: dict[str, Any], erase: bool = False) -> list[str]:
    """The ESP targets whose member differs from what they were last sent (all of them for an erasure)."""
    return [esp for esp, (member, digest) in members.items()
            if erase or (member is not None and digest != meta["esp"].get(esp, {}).get("sent_hash"))]


async def merge_into_profile(store: ProfileStore, identity: Identity, events: list[Event]) -> tuple[str, list[str], bool]:
    """Merge ``events`` into the identity's profile; returns its id, the ESP targets that need an
    update, and whether that update is urgent (a consent change or an erasure goes ahead of bulk traffic).

    Two round trips on the common path: a point read of every profile owning one
    of the identity's keys, and a version-guarded write. When the keys belong to
    several profiles, the event proves they are one person: they are merged in a
    transaction, unless the result would break the identifier limits.
    """
    rt = await runtime()
    source = events[0].source
    for _ in range(MAX_WRITE_ATTEMPTS):
        owners = await store.find_owners(with_erased(lookup_keys(identity, source)))
        tombstone = next((p for p, _ in owners if p.erased is not None), None)
        if tombstone is not None:
            # An erased person stays erased: nothing that arrives later is kept, however it names them.
            log.info("events for erased profile %s ignored", tombstone.id)
            return tombstone.id, [], False
        if len(owners) > 1:
            result = await _merge_owners(store, owners, events)
            if result is _LOST:
                continue
            if result is not _REFUSED:
                return result, list(rt.esps), False
            foreign = {key for profile, _ in owners[1:] for key in profile_keys(profile)}
            events = [e.model_copy(update={"identity": _without(e.identity, source, foreign)}) for e in events]
            owners = owners[:1]
        profile, meta = owners[0] if owners else (new_profile(lookup_keys(identity, source)), {"version": None, "esp": {}})
        merged = merge_all(profile, events, rt.settings.loyalty_tiers, rt.rules)
        limits = (rt.settings.identifier_limits, rt.settings.identifier_limit_default)
        grown = set(over_limits(merged, *limits)) - set(over_limits(profile, *limits))
        if grown:
            # The same guard rail as for merges: a profile does not collect identifiers without bound.
            log.warning("identifiers refused for %s: too many %s", profile.id, ", ".join(sorted(grown)))
            new = {identity_key(kind, v) for kind in grown for v in merged.identifiers[kind] if v not in profile.identifiers.get(kind, ())}
            events = [e.model_copy(update={"identity": _without(e.identity, source, new)}) for e in events]
            merged = merge_all(profile, events, rt.settings.loyalty_tiers, rt.rules)
        if merged == profile and meta["version"] is not None:
            return merged.id, [], False
        members = rt.members(merged)
        erase = sorted({*profile.identifiers.get(EMAIL, ()), *([profile.email] if profile.email else []),
                        *(e.identity.email for e in events if e.identity.email)}) if merged.erased and not profile.erased else []
        urgent = bool(erase) or consent_changed(profile, merged)
        if await store.save(merged, meta["version"], members, erase=erase, urgent=urgent):
            return merged.id, changed(members, meta, bool(erase)), urgent
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")


@dramatiq.actor(actor_name=topology.CHECK_ABANDONMENT_ACTOR, queue_name=topology.events_queue(settings.queue_prefix))
async def check_abandonment(profile_id: str, checkout_id: str, at: str) -> None:
    """Runs once the abandonment delay has passed: records the checkout as expired if still open.

    Idempotent (a set of expired checkouts); an order that arrived meanwhile, or
    later, clears the abandoned cart by itself, since the cart is derived.
    """
    rt = await runtime()
    for _ in range(MAX_WRITE_ATTEMPTS):
        found = await rt.store.load(profile_id)
        if found is None:
            return
        profile, meta = found
        expired = enrich(expire_checkout(profile, checkout_id, datetime.fromisoformat(at)), rt.settings.loyalty_tiers)
        if expired == profile:
            return
        members = rt.members(expired)
        if await rt.store.save(expired, meta["version"], members):
            await schedule_sync(expired.id, changed(members, meta))
            return
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")


@dramatiq.actor(actor_name=topology.SYNC_BATCH_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix))
async def sync_batch(profile_ids: list[str], esp: str = "mailchimp") -> None:
    """Send a backlog to one ESP target in one bulk request (an asynchronous job is polled to its end
    first); each refused member is recorded and dead-lettered on its own, the rest recorded as sent."""
    await _send_batch(profile_ids, esp)


async def _send_batch(profile_ids: list[str], esp: str) -> None:
    rt = await runtime()
    client = _target(rt, esp)
    if client is None:
        return
    claimed = await rt.store.claim_sends(profile_ids, esp, rt.batch_leases[esp])
    # Contacts to erase or retire go one by one, through the single path that handles them.
    alone = [pid for pid, state in claimed.items() if state.get("erase") or state.get("retire")]
    todo = {pid: state for pid, state in claimed.items()
            if pid not in alone and state.get("member") and state.get("sent_hash") != state["member_hash"]}
    idle = [pid for pid in claimed if pid not in todo]
    await rt.store.settle_many(esp, [], [], idle)
    await _send_alone(alone, esp)
    if not todo:
        return
    try:
        refused = await client.upsert_batch([state["member"] for state in todo.values()])
    except MergetagError as exc:
        if exc.code == "esp_timeout":
            raise  # the job may still run: the leases run out by themselves, nothing overtakes it
        await rt.store.settle_many(esp, [], [], list(todo))
        if exc.code == "circuit_open":
            await rt.store.park(list(todo), esp)
            log.info("batch of %d for %s parked: its circuit is open", len(todo), esp)
            return
        if isinstance(exc, EspRejected):
            # The ESP refused the whole request, perhaps for one member: each goes alone, so only the
            # bad one is refused and dead-lettered and the good ones are not held hostage.
            log.warning("batch of %d refused by %s (%s); sending them one by one", len(todo), esp, exc.code)
            await _send_alone(list(todo), esp)
            return
        raise
    sent, failed = [], []
    for pid, state in todo.items():
        reason = refused.get(client.key(state["member"]))
        if reason is None:
            sent.append((pid, state["member_hash"]))
        else:
            failed.append((pid, state["member_hash"], "esp_rejected"))
            # Dead-lettered alone, with its reason, replayable once the cause is fixed.
            single = dramatiq.Message(queue_name=topology.sync_queue(settings.queue_prefix), actor_name=topology.SYNC_PROFILE_ACTOR,
                                      args=(pid, esp), kwargs={"alone": True}, options={})
            letter = as_dead_letter(single, {"code": "esp_rejected", "detail": reason, "retryable": False, "exception": "EspRejected"})
            await asyncio.to_thread(broker.enqueue, letter)
    await rt.store.settle_many(esp, sent, failed, idle)
    log.info("batch of %d synced to %s: %d sent, %d refused", len(todo), esp, len(sent), len(failed))


async def _send_alone(profile_ids: list[str], esp: str) -> None:
    for pid in profile_ids:
        await asyncio.to_thread(sync_profile.send_with_options, args=(pid, esp), kwargs={"alone": True})


def _target(rt: Runtime, esp: str) -> Esp | None:
    client = rt.esps.get(esp)
    if client is None:
        # The target was removed from the configuration since this sync was scheduled: nothing to send it to.
        log.warning("sync for ESP target %s skipped: not configured", esp)
    return client


async def _calls(profile_id: str, esp: str, calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run ESP calls in order; on failure end the send lease, unless a timed-out call may still land
    (then the lease runs out by itself, so no other send overtakes it)."""
    rt = await runtime()
    try:
        for call in calls:
            await call()
    except MergetagError as exc:
        if exc.code != "esp_timeout" and not isinstance(exc, EspRejected):
            await rt.store.release_send(profile_id, esp)
        raise


_LOST, _REFUSED = object(), object()


async def _merge_owners(store: ProfileStore, owners: list[tuple[Profile, dict[str, Any]]], events: list[Event]) -> Any:
    """Absorb every owner into the first (the one owning the strongest key)."""
    rt = await runtime()
    (survivor, survivor_meta), others = owners[0], owners[1:]
    combined = survivor
    for profile, _ in others:
        combined = merge_profiles(combined, profile, rt.rules)
    combined = merge_all(combined, events, rt.settings.loyalty_tiers, rt.rules)
    broken = over_limits(combined, rt.settings.identifier_limits, rt.settings.identifier_limit_default)
    if broken:
        log.warning("merge of %s into %s refused: too many %s identifiers", [p.id for p, _ in others], survivor.id, ", ".join(broken))
        return _REFUSED
    retire = {esp: sorted({p.email for p, meta in others
                           if p.email and p.email != combined.email and meta["esp"].get(esp, {}).get("sent_hash")})
              for esp in rt.esps}
    absorbed = [(p.id, meta["version"]) for p, meta in others]
    sent = {esp: survivor_meta["esp"].get(esp, {}).get("sent_hash") for esp in rt.esps}
    if not await store.absorb(combined, survivor_meta["version"], absorbed, rt.members(combined), retire, sent):
        return _LOST
    log.info("merged %s into %s", [p.id for p, _ in others], survivor.id)
    return combined.id


def _without(identity: Identity, source: str, foreign: set[str]) -> Identity:
    """``identity`` minus the identifiers another profile owns (used when a merge is refused)."""
    kinds = {"email": "email", "phone": "phone", "customer_id": source, "anonymous_id": ANONYMOUS}
    kept = {f: v for f, k in kinds.items() if (v := getattr(identity, f)) is not None and identity_key(k, v) not in foreign}
    return Identity(**kept) if kept else identity


@dramatiq.actor(actor_name=topology.SYNC_URGENT_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix), priority=0)
async def sync_urgent(profile_id: str, esp: str = "mailchimp") -> None:
    """:func:`sync_profile` for consent changes and erasures: first out of RabbitMQ (message priority)
    and first in the worker's own queue (actor priority), ahead of any backlog."""
    await _sync(profile_id, esp, urgent=True)


@dramatiq.actor(actor_name=topology.SYNC_PROFILE_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix), priority=10)
async def sync_profile(profile_id: str, esp: str = "mailchimp", alone: bool = False, retry_refused: bool = False) -> None:
    """Parameters:
      alone: send it now even in a backlog (sent by the sweeper, or split out of a refused batch).
      retry_refused: send it even if the ESP refused this very member before (a replayed dead letter).
    """
    await _sync(profile_id, esp, alone=alone, retry_refused=retry_refused)


async def _sync(profile_id: str, esp: str, urgent: bool = False, alone: bool = False, retry_refused: bool = False) -> None:
    """Idempotent: a profile whose member the target already holds is skipped without a request.

    Left pending in MongoDB for the sweeper rather than sent: while the target's circuit is open;
    while another send of the profile is in flight (the sweeper sends what is left after it); and
    while the target's backlog is large enough for bulk requests (``MERGETAG_SYNC_BULK_BACKLOG``;
    never a consent change, an erasure, a replayed dead letter or another send ``alone``).
    """
    rt = await runtime()
    client = rt.esps.get(esp)
    if not (urgent or alone) and client is not None:
        backlog = await rt.backlog(esp)
        if backlog >= rt.settings.sync_bulk_backlog:
            return  # still pending: the sweeper sends it with the backlog, in bulk
        if client.prefers_bulk or backlog >= TAKE_ALONG_MIN:
            # Every write is a job at this ESP, or many profiles wait: take every other pending profile
            # along, so one bulk request carries them all (their own syncs then find nothing to send).
            others = await rt.store.pending_ids(esp, limit=min(TAKE_ALONG, client.batch_limit - 1))
            await _send_batch([profile_id, *[pid for pid in others if pid != profile_id]], esp)
            return
    try:
        await _send(profile_id, esp, retry_refused)
    except (EspUnavailable, SyncBusy) as exc:
        if exc.code not in ("circuit_open", SyncBusy.code):
            raise
        await rt.store.park([profile_id], esp)
        log.debug("sync of %s to %s parked: %s", profile_id, esp, exc.code)


async def _send(profile_id: str, esp: str, retry_refused: bool = False) -> None:
    rt = await runtime()
    client = _target(rt, esp)
    if client is None:
        return
    state = await rt.store.claim_send(profile_id, esp, rt.leases[esp])
    if state is None:
        return
    # Erasures first (a privacy request), then contacts of absorbed profiles, then the member itself.
    for contacts, call, done in (("erase", client.erase, rt.store.forget), ("retire", client.retire, rt.store.retired)):
        if state.get(contacts):
            await _calls(profile_id, esp, [partial(call, email) for email in state[contacts]])
            await done(profile_id, esp, state[contacts])
    refused = state.get("failed_hash") == state.get("member_hash") and not retry_refused
    if not state.get("member") or state.get("sent_hash") == state["member_hash"] or refused:
        # Already held, or refused exactly as it is (only a replayed dead letter asks again).
        log.debug("profile %s has nothing new to send to %s", profile_id, esp)
        await rt.store.release_send(profile_id, esp)
        return
    try:
        await _calls(profile_id, esp, [partial(client.upsert, state["member"])])
    except EspRejected as exc:
        await rt.store.mark_failed(profile_id, esp, state["member_hash"], exc.code)
        raise
    await rt.store.mark_sent(profile_id, esp, state["member_hash"])
    log.info("profile %s synced to %s", profile_id, esp)
