"""Merging events into the stored profile of the person they name: the profile stage's I/O.

Two round trips on the common path: a point read of every profile owning one of the identity's
keys, and a version-guarded write. When the keys belong to several profiles, the event proves they
are one person: they are merged in a transaction, unless the result would break the identifier
limits. Every write is guarded by the version read, so a lost race re-reads and merges again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from adapters.store.outbox import Members, Work
from schemas.errors import LostRace
from schemas.events import Event, Identity
from schemas.profile import Profile, identity_key, profile_keys
from schemas.sync import NEW, Expected, Stored, in_flight
from workers.profiles.consent import address_work, consent_changed, contacts_held
from workers.profiles.enrich import enrich, expire_checkout
from workers.profiles.identity import lookup_keys, new_profile, over_limits, without
from workers.profiles.merge import changed_traits, merge_all, merge_profiles
from workers.runtime import Runtime

log = logging.getLogger(__name__)

MAX_WRITE_ATTEMPTS = 20


@dataclass(frozen=True)
class Merged:
    """The outcome of a merge: the profile, the ESP targets that need an update, and whether that
    update is urgent (a consent change goes ahead of bulk traffic)."""

    profile_id: str
    targets: list[str]
    urgent: bool = False
    version: int | None = None
    """The profile version the merge wrote (None: nothing written)."""
    traits: tuple[str, ...] = ()
    """The traits it set, changed or removed (for the event trail)."""
    handed: dict[str, Expected] = field(default_factory=dict)
    """Per target, the member it wrote, for the sync to send without reading it back (none where address work waits)."""


def handed(members: Members, targets: list[str], work: Work | None = None) -> dict[str, Expected]:
    """The members a merge just wrote for ``targets``, as the sync's hints; a target with address work gets
    none (its sync reads what the ESP holds and what waits)."""
    now = datetime.now(timezone.utc)
    return {esp: Expected(member, digest, now) for esp in targets if not any((work or {}).get(esp, {}).values())
            for member, digest in [members[esp]] if member is not None and digest is not None}


def changed(members: Members, stored: Stored, work: Work | None = None) -> list[str]:
    """The ESP targets whose member differs from what they were last sent, or with address work to do."""
    return [esp for esp, (member, digest) in members.items()
            if (work or {}).get(esp) or (member is not None and digest != stored.state(esp).sent_hash)]


async def merge_into_profile(rt: Runtime, identity: Identity, events: list[Event]) -> Merged:
    """Merge ``events`` into the identity's profile. An erased person stays erased: events for a
    tombstone are dropped (and counted on the erasure's receipt)."""
    source = events[0].source
    for _ in range(MAX_WRITE_ATTEMPTS):
        owners = await rt.store.find_owners(lookup_keys(identity, source))
        tombstone = next((p for p, _ in owners if p.erased is not None), None)
        if tombstone is not None:
            log.info("%d event(s) for erased profile %s dropped", len(events), tombstone.id)
            await rt.receipts.late_event(tombstone.id)
            return Merged(tombstone.id, [])
        if len(owners) > 1:
            try:
                merged_id = await _merge_owners(rt, owners, events)
            except _Lost:
                continue
            if merged_id is not None:
                return Merged(merged_id, list(rt.esps), version=(owners[0][1].version or 0) + 1)
            foreign = {key for profile, _ in owners[1:] for key in profile_keys(profile)}
            events = [e.model_copy(update={"identity": without(e.identity, source, foreign)}) for e in events]
            owners = owners[:1]
        profile, stored = owners[0] if owners else (new_profile(lookup_keys(identity, source), rt.hasher), NEW)
        merged = merge_all(profile, events, rt.settings.loyalty_tiers, rt.rules)
        limits = (rt.settings.identifier_limits, rt.settings.identifier_limit_default)
        grown = set(over_limits(merged, *limits)) - set(over_limits(profile, *limits))
        if grown:
            # The same guard rail as for merges: a profile does not collect identifiers without bound.
            log.warning("identifiers refused for %s: too many %s", profile.id, ", ".join(sorted(grown)))
            new = {identity_key(kind, v) for kind in grown for v in merged.identifiers[kind] if v not in profile.identifiers.get(kind, ())}
            events = [e.model_copy(update={"identity": without(e.identity, source, new)}) for e in events]
            merged = merge_all(profile, events, rt.settings.loyalty_tiers, rt.rules)
        if merged == profile and stored.version is not None:
            return Merged(merged.id, [])
        members = rt.members(merged)
        work = address_work(profile if stored.version is not None else None, merged, contacts_held(stored, rt.esps))
        urgent = consent_changed(profile, merged) or any("unsubscribe" in lists for lists in work.values())
        before = profile if stored.version is not None else None
        if await rt.store.save(merged, stored.version, members, urgent=urgent, work=work, stored=stored, before=before):
            targets = changed(members, stored, work)
            return Merged(merged.id, targets, urgent, (stored.version or 0) + 1, tuple(changed_traits(before, merged)),
                          handed(members, targets, work))
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")


class _Lost(Exception):
    """Another writer changed one of the profiles since they were read: read again."""


async def _merge_owners(rt: Runtime, owners: list[tuple[Profile, Stored]], events: list[Event]) -> str | None:
    """Absorb every owner into the first (the one owning the strongest key); returns the survivor's id,
    or None when the result would break the identifier limits (the merge is refused)."""
    (survivor, survivor_stored), others = owners[0], owners[1:]
    combined = survivor
    for profile, _ in others:
        combined = merge_profiles(combined, profile, rt.rules)
    combined = merge_all(combined, events, rt.settings.loyalty_tiers, rt.rules)
    broken = over_limits(combined, rt.settings.identifier_limits, rt.settings.identifier_limit_default)
    if broken:
        log.warning("merge of %s into %s refused: too many %s identifiers", [p.id for p, _ in others], survivor.id, ", ".join(broken))
        return None
    work = address_work(survivor, combined, contacts_held(survivor_stored, rt.esps))
    for esp in rt.esps:
        # The absorbed profiles' contacts are retired, so none is left orphaned (and subscribed) at the ESP.
        retire = {p.email for p, stored in others if p.email and p.email != combined.email and contacts_held(stored, [esp])[esp]}
        if retire:
            lists = work.setdefault(esp, {})
            lists["retire"] = sorted(retire | set(lists.get("retire", [])))
    absorbed = [(p.id, stored.version) for p, stored in others]
    sent = {esp: survivor_stored.state(esp).sent_hash for esp in rt.esps}
    carried = in_flight((stored for _, stored in others), rt.esps)
    if not await rt.store.absorb(combined, survivor_stored.version, absorbed, rt.members(combined), work, sent, carried):
        raise _Lost
    log.info("merged %s into %s", [p.id for p, _ in others], survivor.id)
    return combined.id


async def expire_cart(rt: Runtime, profile_id: str, checkout_id: str, at: datetime) -> Merged | None:
    """Record the checkout as expired if still open. Idempotent (a set of expired checkouts); an order
    that arrived meanwhile, or later, clears the abandoned cart by itself, since the cart is derived."""
    for _ in range(MAX_WRITE_ATTEMPTS):
        found = await rt.store.load(profile_id)
        if found is None:
            return None
        profile, stored = found
        expired = enrich(expire_checkout(profile, checkout_id, at), rt.settings.loyalty_tiers)
        if expired == profile:
            return None
        members = rt.members(expired)
        if await rt.store.save(expired, stored.version, members, stored=stored, before=profile):
            return Merged(expired.id, changed(members, stored), version=(stored.version or 0) + 1, traits=tuple(changed_traits(profile, expired)))
    raise LostRace(f"profile write lost {MAX_WRITE_ATTEMPTS} races")
