"""The pipeline's actors. Importing this module installs the broker.

``process_event``: validate -> map -> merge (+ enrich) into MongoDB -> mark for sync.
``sync_profile``: send the profile's member to the ESP unless it already holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

import dramatiq

from adapters.esps.base import Esp
from adapters.settings import get_settings
from adapters.store.outbox import ADDRESS_LISTS, Members
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.dead_letters import DeadLetter
from broker.middleware import as_dead_letter
from broker.setup import create_broker
from schemas.delivery import Delivery
from schemas.errors import CircuitOpen, EspRejected, EventInvalid, LostRace, MergetagError, SyncBusy
from schemas.events import CheckoutChanged, CustomerErased, Event, Identity
from schemas.profile import ANONYMOUS, Profile, identity_key, profile_keys
from workers import erasure
from workers.derive import with_context
from workers.enrich import enrich, expire_checkout
from workers.merge import merge_profiles
from workers.pipeline import (
    address_work,
    attributable,
    by_identity,
    events_for,
    lookup_keys,
    merge_all,
    new_profile,
    over_limits,
    parse_delivery,
)
from workers.runtime import Runtime, close_runtime, runtime

log = logging.getLogger(__name__)
settings = get_settings()
broker = create_broker(settings, on_shutdown=close_runtime)

MAX_WRITE_ATTEMPTS = 20
TAKE_ALONG = 1_000
TAKE_ALONG_MIN = 20


@dramatiq.actor(actor_name=topology.PROCESS_EVENT_ACTOR, queue_name=topology.events_queue(settings.queue_prefix))
async def process_event(delivery: dict[str, Any]) -> None:
    """Invalid input goes to quarantine (kept, not retried); UnsupportedEvent is dead-lettered;
    anything transient raises and is retried. Erasures go first: nothing else in the delivery
    may outlive them."""
    rt = await runtime()
    try:
        # Mapping and enrichment are CPU work: off the event loop every other message shares.
        parsed, events = await asyncio.to_thread(_events, delivery, rt)
    except EventInvalid as exc:
        named = sorted({rt.hasher.index_key(k) for k in erasure.delivery_keys(delivery, rt.mappings)})
        key = await rt.quarantine.put(delivery, exc.errors, str(delivery.get("schema_version")), keys=named)
        log.warning("delivery %s quarantined: %s", key, exc.detail)
        return
    for erased in (e for e in events if isinstance(e, CustomerErased)):
        await erase_person(rt, erased)
    to_sync, to_check = [], []
    for identity, group in by_identity(e for e in events if not isinstance(e, CustomerErased)).items():
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


def _events(delivery: dict[str, Any], rt: Runtime) -> tuple[Delivery, list[Event]]:
    parsed = parse_delivery(delivery)
    events = [derived for event in events_for(parsed, rt.mappings) for derived in with_context(event, rt.geo)]
    return parsed, attributable(events, rt.blocked)


async def erase_person(rt: Runtime, event: CustomerErased) -> None:
    """Forget the person ``event`` names, seen before or not: one tombstone found by every identifier
    of the request and of every profile that held them, nothing personal left in any of their
    documents, every address deleted at every ESP target (by the urgent sync that follows), and a
    receipt that shows how far each target got. Idempotent: a replay of a finished request does nothing.
    """
    keys = erasure.request_keys(event)
    targets = tuple(rt.esps)
    for _ in range(MAX_WRITE_ATTEMPTS):
        owners = await rt.store.find_owners(keys)
        plan = erasure.plan(owners, event, rt.hasher)
        tomb = next((p for p, _ in owners if p.erased is not None), None)
        replay = len(owners) == 1 and tomb is not None and tomb.identifiers == plan.tombstone.identifiers
        if replay and ((await rt.receipts.get(plan.request_id)) or {}).get("targets"):
            log.info("erasure %s already recorded for %s", plan.request_id, tomb.id)
            return
        now = datetime.now(timezone.utc)
        receipt = {
            "$setOnInsert": {"requested_at": event.received_at, "requested_by": event.source},
            "$set": {f"targets.{esp}": {"status": "pending" if plan.addresses else "verified", "at": now,
                                        "addresses": len(plan.addresses)} for esp in targets},
            "$addToSet": {"keys": {"$each": erasure.hashed_request(event, rt.hasher)}, "profile_ids": plan.tombstone.id},
        }
        if await rt.store.erase(plan, targets, receipt):
            break
    else:
        raise LostRace(f"erasure lost {MAX_WRITE_ATTEMPTS} races")
    log.info("erasure %s: profile %s erased, %d absorbed, %d address(es) to delete", plan.request_id, plan.tombstone.id,
             len(plan.pointers) + len(plan.absorbed), len(plan.addresses))
    if plan.addresses:
        await schedule_sync(plan.tombstone.id, list(targets), urgent=True)
    await _remove_payloads(rt, plan)


async def _remove_payloads(rt: Runtime, plan: erasure.ErasurePlan) -> None:
    """Raw payloads of the person kept elsewhere go too: dead letters and quarantined deliveries that
    name them or their profiles. (Anything left over is inert anyway: replayed or redriven, it meets
    the tombstone and is dropped.)"""
    hashed = set(plan.keys)
    profiles = {plan.tombstone.id, *(pid for pid, _ in plan.pointers), *plan.absorbed}

    def of_person(letter: DeadLetter) -> bool:
        args = letter.message.args
        named = letter.sync_target().get("profile_id") or (args[0] if letter.actor == topology.CHECK_ABANDONMENT_ACTOR and args else None)
        if named in profiles:
            return True
        if letter.actor == topology.PROCESS_EVENT_ACTOR and args and isinstance(args[0], dict):
            return any(rt.hasher.index_key(k) in hashed for k in erasure.delivery_keys(args[0], rt.mappings))
        return False

    removed = await asyncio.to_thread(rt.dead_letters.purge_matching, of_person)
    quarantined = await rt.quarantine.forget(plan.keys)
    if removed or quarantined:
        await rt.receipts.removed(plan.request_id, dead_letters=len(removed), quarantined=quarantined)
        log.info("erasure %s removed %d dead letter(s) and %d quarantined delivery(ies)", plan.request_id, len(removed), quarantined)


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


def changed(members: Members, meta: dict[str, Any], work: dict[str, Any] | None = None) -> list[str]:
    """The ESP targets whose member differs from what they were last sent, or with address work to do."""
    return [esp for esp, (member, digest) in members.items()
            if (work or {}).get(esp) or (member is not None and digest != meta["esp"].get(esp, {}).get("sent_hash"))]


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
        owners = await store.find_owners(lookup_keys(identity, source))
        tombstone = next((p for p, _ in owners if p.erased is not None), None)
        if tombstone is not None:
            # An erased person stays erased: nothing that arrives later is kept, however it names them.
            log.info("%d event(s) for erased profile %s dropped", len(events), tombstone.id)
            await rt.receipts.late_event(tombstone.id)
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
        profile, meta = owners[0] if owners else (new_profile(lookup_keys(identity, source), rt.hasher), {"version": None, "esp": {}})
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
        work = address_work(profile if meta["version"] is not None else None, merged, _sent(meta, rt.esps))
        urgent = consent_changed(profile, merged) or any("unsubscribe" in lists for lists in work.values())
        if await store.save(merged, meta["version"], members, urgent=urgent, work=work):
            return merged.id, changed(members, meta, work), urgent
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")


def _sent(meta: dict[str, Any], targets: dict[str, Esp]) -> dict[str, bool]:
    """Per ESP target, whether it may hold this profile's contact (so has one to retire): it was sent
    the member, or a send of it is in flight right now."""
    now = datetime.now(timezone.utc)
    states = {esp: meta["esp"].get(esp, {}) for esp in targets}
    return {esp: bool(s.get("sent_hash")) or (s.get("sending_until") or now) > now for esp, s in states.items()}


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
    claimed, token = await rt.store.outbox.claim_sends(profile_ids, esp, rt.batch_leases[esp])
    # Address work (erasures, unsubscribes, retirements) goes one by one, through the single path that handles it.
    alone = [pid for pid, state in claimed.items() if any(state.get(name) for name in ADDRESS_LISTS)]
    todo = {pid: state for pid, state in claimed.items()
            if pid not in alone and state.get("member") and state.get("sent_hash") != state["member_hash"]}
    idle = [pid for pid in claimed if pid not in todo]
    await rt.store.outbox.settle_many(esp, token, [], [], idle)
    await _send_alone(alone, esp)
    if not todo:
        return
    jobs: list[str] = []

    async def accepted(job_id: str) -> None:
        jobs.append(job_id)
        await rt.store.outbox.note_job(esp, token, job_id, list(todo))

    try:
        refused = await client.upsert_batch([state["member"] for state in todo.values()], accepted)
    except MergetagError as exc:
        if exc.may_still_land:
            raise  # the job may still run: the leases run out by themselves, nothing overtakes it
        await rt.store.outbox.settle_many(esp, token, [], [], list(todo))
        if isinstance(exc, CircuitOpen):
            await rt.store.outbox.park(list(todo), esp)
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
    await rt.store.outbox.settle_many(esp, token, sent, failed, idle, jobs)
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


async def _calls(profile_id: str, esp: str, token: str, calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run ESP calls in order; on failure end the send lease, unless a timed-out call may still land
    (then the lease runs out by itself, so no other send overtakes it)."""
    rt = await runtime()
    try:
        for call in calls:
            await call()
    except MergetagError as exc:
        if not exc.may_still_land and not isinstance(exc, EspRejected):
            await rt.store.outbox.release_send(profile_id, esp, token)
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
    work = address_work(survivor, combined, _sent(survivor_meta, rt.esps))
    for esp in rt.esps:
        # The absorbed profiles' contacts are retired, so none is left orphaned (and subscribed) at the ESP.
        retire = {p.email for p, meta in others if p.email and p.email != combined.email and _sent(meta, rt.esps)[esp]}
        if retire:
            lists = work.setdefault(esp, {})
            lists["retire"] = sorted(retire | set(lists.get("retire", [])))
    absorbed = [(p.id, meta["version"]) for p, meta in others]
    sent = {esp: survivor_meta["esp"].get(esp, {}).get("sent_hash") for esp in rt.esps}
    if not await store.absorb(combined, survivor_meta["version"], absorbed, rt.members(combined), work, sent):
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
            others = await rt.store.outbox.pending_ids(esp, limit=min(TAKE_ALONG, client.batch_limit - 1))
            await _send_batch([profile_id, *[pid for pid in others if pid != profile_id]], esp)
            return
    try:
        await _send(profile_id, esp, retry_refused)
    except (CircuitOpen, SyncBusy) as exc:
        await rt.store.outbox.park([profile_id], esp)
        log.debug("sync of %s to %s parked: %s", profile_id, esp, exc.code)


async def _send(profile_id: str, esp: str, retry_refused: bool = False) -> None:
    rt = await runtime()
    client = _target(rt, esp)
    if client is None:
        return
    claim = await rt.store.outbox.claim_send(profile_id, esp, rt.leases[esp])
    if claim is None:
        return
    state, token = claim
    if state.get("erase") or state.get("verify"):
        if not await _erase(rt, client, profile_id, esp, state, token):
            return
    # The person's other addresses: unsubscribed where they are, retired where they were replaced.
    current = client.key(state["member"]) if state.get("member") else None
    for name, call in (("unsubscribe", client.unsubscribe), ("retire", client.retire)):
        if state.get(name):
            await _calls(profile_id, esp, token, [partial(call, email) for email in state[name] if email != current])
            await rt.store.outbox.done(profile_id, esp, token, name, state[name])
    refused = state.get("failed_hash") == state.get("member_hash") and not retry_refused
    if not state.get("member") or state.get("sent_hash") == state["member_hash"] or refused:
        # Already held, or refused exactly as it is (only a replayed dead letter asks again).
        log.debug("profile %s has nothing new to send to %s", profile_id, esp)
        await rt.store.outbox.release_send(profile_id, esp, token)
        return
    jobs: list[str] = []

    async def accepted(job_id: str) -> None:
        jobs.append(job_id)
        await rt.store.outbox.note_job(esp, token, job_id, [profile_id])

    try:
        await _calls(profile_id, esp, token, [partial(client.upsert, state["member"], accepted)])
    except EspRejected as exc:
        await rt.store.outbox.mark_failed(profile_id, esp, token, state["member_hash"], exc.code)
        raise
    if await rt.store.outbox.mark_sent(profile_id, esp, token, state["member_hash"], jobs):
        log.info("profile %s synced to %s", profile_id, esp)
    else:
        log.warning("profile %s sent to %s after its send lease ran out; the lease's holder records its own send", profile_id, esp)


VERIFY_CHECKS = 5
VERIFY_DELAY_S = 1.0


async def _erase(rt: Runtime, client: Esp, profile_id: str, esp: str, state: dict[str, Any], token: str) -> bool:
    """Delete every address of an erased person at ``esp``, then read back that the ESP holds none.

    Fence: a bulk job that carried the person and may still run is waited for first (its id was
    recorded on the profile when the ESP accepted it), or it could recreate the contact after the
    deletion. A refusal is recorded on the receipts as failed and retried by the sweeper, never
    dead-lettered away. Returns False when the send must stop here (waiting or refused).
    """
    for job in state.get("jobs") or []:
        if not await client.job_done(job):
            await rt.store.outbox.release_send(profile_id, esp, token)
            raise SyncBusy(f"a bulk job to {esp} that carries this person is still running", retry_after=2.0)
        await rt.store.outbox.job_finished(profile_id, esp, token, job)
    erase = list(state.get("erase") or [])
    try:
        await _calls(profile_id, esp, token, [partial(client.erase, email) for email in erase])
    except EspRejected as exc:
        await rt.receipts.mark(profile_id, esp, "failed", exc.code)
        await rt.store.outbox.release_send(profile_id, esp, token)
        log.warning("erasure at %s refused for profile %s (%s); retried by the sweeper", esp, profile_id, exc.code)
        return False
    if erase:
        await rt.store.outbox.forget(profile_id, esp, token, erase)
        await rt.receipts.mark(profile_id, esp, "deleted")
    checking = sorted({*(state.get("verify") or []), *erase})
    held = [email for email in checking if await client.held(email) is not None]
    await rt.store.outbox.done(profile_id, esp, token, "verify", [email for email in checking if email not in held])
    if not held:
        await rt.receipts.mark(profile_id, esp, "verified")
        return True
    checks = await rt.store.outbox.checked(profile_id, esp, token)
    if checks >= VERIFY_CHECKS:
        # Still there after several read-backs: delete again rather than wait for ever.
        await rt.store.outbox.redo(profile_id, esp, token, held)
    await rt.store.outbox.release_send(profile_id, esp, token)
    # Deletions are asynchronous at some ESPs (Klaviyo's privacy jobs, SendGrid's deletes): look again soon.
    await asyncio.to_thread(sync_urgent.send_with_options, args=(profile_id, esp), delay=int(VERIFY_DELAY_S * checks * 1000))
    log.info("erasure at %s: %d contact(s) of profile %s not gone yet; read back again later", esp, len(held), profile_id)
    return False
