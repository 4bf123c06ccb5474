"""The pipeline's actors. Importing this module installs the broker.

``process_event``: validate -> map -> merge (+ enrich) into MongoDB -> mark for sync.
``sync_profile``: send the profile's member to the ESP unless it already holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import dramatiq

from adapters.esp.mailchimp import NAME as MAILCHIMP
from adapters.esp.mailchimp import member_hash
from adapters.settings import get_settings
from adapters.store import ProfileStore
from broker import topology
from broker.middleware import as_dead_letter
from broker.setup import create_broker
from schemas.errors import EspRejected, EventInvalid, MergetagError
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
from workers.runtime import close_runtime, runtime

log = logging.getLogger(__name__)
settings = get_settings()
broker = create_broker(settings, on_shutdown=close_runtime)

MAX_WRITE_ATTEMPTS = 20


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
        profile_id, needs_sync, urgent = await merge_into_profile(rt.store, identity, group)
        if needs_sync:
            to_sync.append((profile_id, urgent))
        to_check += [(profile_id, e.checkout_id, e.event_time.isoformat())
                     for e in group if isinstance(e, CheckoutChanged) and not e.completed]
    for profile_id, urgent in to_sync:
        await schedule_sync(profile_id, urgent)
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


async def schedule_sync(profile_id: str, urgent: bool = False) -> None:
    """One delayed sync per profile per coalescing window; it sends whatever the profile is by then.

    Consent changes and erasures are urgent: they skip the window and jump the queue.
    """
    rt = await runtime()
    if urgent:
        await asyncio.to_thread(sync_urgent.send_with_options, args=(profile_id,), broker_priority=topology.URGENT)
    elif await rt.coalescer.first_in_window(MAILCHIMP, profile_id):
        await asyncio.to_thread(sync_profile.send_with_options, args=(profile_id,), delay=rt.coalescer.window_ms or None)


async def merge_into_profile(store: ProfileStore, identity: Identity, events: list[Event]) -> tuple[str, bool, bool]:
    """Merge ``events`` into the identity's profile; returns its id, whether the ESP needs an update,
    and whether that update is urgent (a consent change or an erasure goes ahead of bulk traffic).

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
            return tombstone.id, False, False
        if len(owners) > 1:
            result = await _merge_owners(store, owners, events)
            if result is _LOST:
                continue
            if result is not _REFUSED:
                return result, True, False
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
        sent_hash = meta["esp"].get(MAILCHIMP, {}).get("sent_hash")
        if merged == profile and meta["version"] is not None:
            return merged.id, False, False
        member = rt.esp.member(merged, rt.settings.merge_fields)
        digest = member_hash(member) if member is not None else None
        erase = sorted({*profile.identifiers.get(EMAIL, ()), *([profile.email] if profile.email else []),
                        *(e.identity.email for e in events if e.identity.email)}) if merged.erased and not profile.erased else []
        if await store.save(merged, meta["version"], MAILCHIMP, member, digest, erase=erase):
            return merged.id, bool(erase) or (member is not None and digest != sent_hash), bool(erase) or consent_changed(profile, merged)
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
        member = rt.esp.member(expired, rt.settings.merge_fields)
        digest = member_hash(member) if member is not None else None
        if await rt.store.save(expired, meta["version"], MAILCHIMP, member, digest):
            if member is not None and digest != meta["esp"].get(MAILCHIMP, {}).get("sent_hash"):
                await schedule_sync(expired.id)
            return
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")


@dramatiq.actor(actor_name=topology.SYNC_BATCH_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix))
async def sync_batch(profile_ids: list[str]) -> None:
    """Send a backlog in one bulk request; each refused member is recorded and dead-lettered on its own."""
    rt = await runtime()
    lease = timedelta(seconds=2 * rt.settings.mailchimp_timeout_s + 5)
    claimed = await rt.store.claim_sends(profile_ids, MAILCHIMP, lease)
    todo = {pid: state for pid, state in claimed.items() if state.get("member") and state.get("sent_hash") != state["member_hash"]}
    idle = [pid for pid in claimed if pid not in todo]
    if not todo:
        await rt.store.settle_many(MAILCHIMP, [], [], idle)
        return
    try:
        async with rt.guard.call():
            refused = await rt.esp.upsert_batch([state["member"] for state in todo.values()])
    except MergetagError as exc:
        if exc.code != "esp_timeout":
            await rt.store.settle_many(MAILCHIMP, [], [], list(claimed))
        raise
    sent, failed = [], []
    for pid, state in todo.items():
        reason = refused.get(state["member"]["email_address"].lower())
        if reason is None:
            sent.append((pid, state["member_hash"]))
        else:
            failed.append((pid, state["member_hash"], "esp_rejected"))
            # Dead-lettered alone, with its reason, replayable once the cause is fixed.
            single = dramatiq.Message(queue_name=topology.sync_queue(settings.queue_prefix), actor_name=topology.SYNC_PROFILE_ACTOR,
                                      args=(pid,), kwargs={}, options={})
            letter = as_dead_letter(single, {"code": "esp_rejected", "detail": reason, "retryable": False, "exception": "EspRejected"})
            await asyncio.to_thread(broker.enqueue, letter)
    await rt.store.settle_many(MAILCHIMP, sent, failed, idle)
    log.info("batch of %d synced to %s: %d sent, %d refused", len(todo), MAILCHIMP, len(sent), len(failed))


async def _guarded(profile_id: str, calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run ESP calls through the account's guard; on failure end the send lease, unless a timed-out
    call may still land (then the lease runs out by itself, so no other send overtakes it)."""
    rt = await runtime()
    try:
        for call in calls:
            async with rt.guard.call():
                await call()
    except MergetagError as exc:
        if exc.code != "esp_timeout" and not isinstance(exc, EspRejected):
            await rt.store.release_send(profile_id, MAILCHIMP)
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
    retire = sorted({
        p.email for p, meta in others
        if p.email and p.email != combined.email and meta["esp"].get(MAILCHIMP, {}).get("sent_hash")
    })
    member = rt.esp.member(combined, rt.settings.merge_fields)
    digest = member_hash(member) if member is not None else None
    absorbed = [(p.id, meta["version"]) for p, meta in others]
    sent_hash = survivor_meta["esp"].get(MAILCHIMP, {}).get("sent_hash")
    if not await store.absorb(combined, survivor_meta["version"], absorbed, MAILCHIMP, member, digest, retire, sent_hash):
        return _LOST
    log.info("merged %s into %s", [p.id for p, _ in others], survivor.id)
    return combined.id


def _without(identity: Identity, source: str, foreign: set[str]) -> Identity:
    """``identity`` minus the identifiers another profile owns (used when a merge is refused)."""
    kinds = {"email": "email", "phone": "phone", "customer_id": source, "anonymous_id": ANONYMOUS}
    kept = {f: v for f, k in kinds.items() if (v := getattr(identity, f)) is not None and identity_key(k, v) not in foreign}
    return Identity(**kept) if kept else identity


@dramatiq.actor(actor_name=topology.SYNC_URGENT_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix), priority=0)
async def sync_urgent(profile_id: str) -> None:
    """:func:`sync_profile` for consent changes and erasures: first out of RabbitMQ (message priority)
    and first in the worker's own queue (actor priority), ahead of any backlog."""
    await _sync(profile_id)


@dramatiq.actor(actor_name=topology.SYNC_PROFILE_ACTOR, queue_name=topology.sync_queue(settings.queue_prefix), priority=10)
async def sync_profile(profile_id: str) -> None:
    await _sync(profile_id)


async def _sync(profile_id: str) -> None:
    """Idempotent: a profile whose member was already sent is skipped without a request."""
    rt = await runtime()
    lease = timedelta(seconds=2 * rt.settings.mailchimp_timeout_s + 5)
    state = await rt.store.claim_send(profile_id, MAILCHIMP, lease)
    if state is None:
        return
    # Erasures first (a privacy request), then contacts of absorbed profiles, then the member itself.
    for contacts, call, done in (("erase", rt.esp.delete_permanent, rt.store.forget), ("retire", rt.esp.archive, rt.store.retired)):
        if state.get(contacts):
            await _guarded(profile_id, [partial(call, email) for email in state[contacts]])
            await done(profile_id, MAILCHIMP, state[contacts])
    if not state.get("member") or state.get("sent_hash") == state["member_hash"]:
        log.debug("profile %s has nothing new to send", profile_id)
        await rt.store.release_send(profile_id, MAILCHIMP)
        return
    try:
        await _guarded(profile_id, [partial(rt.esp.upsert, state["member"])])
    except EspRejected as exc:
        await rt.store.mark_failed(profile_id, MAILCHIMP, state["member_hash"], exc.code)
        raise
    await rt.store.mark_sent(profile_id, MAILCHIMP, state["member_hash"])
    log.info("profile %s synced to %s", profile_id, MAILCHIMP)
