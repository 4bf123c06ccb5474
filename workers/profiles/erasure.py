"""Erasure: a person asked to be forgotten. Pure planning of what the store and the ESPs must do.

Whatever mergetag knows of the person — every profile an identifier of the request finds, every
profile ever absorbed into those, and an earlier tombstone — becomes one tombstone that holds no
personal data: the erasure's stamp (named by the receipt id, not by the sender's event id, which
may spell out a customer id) and the keyed hashes of every identifier. Every later event naming any
of them is recognised by the identity lookup and dropped, and unseen people are erased just the
same: their tombstone is found by the request's own identifiers, so any number of them coexist.
Every address the person had is deleted at every ESP target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import MergetagError
from schemas.events import CustomerErased
from schemas.profile import EMAIL, ERASED, IdentityHasher, Profile, Stamp, identity_key, profile_keys
from schemas.sync import InFlight, Stored, in_flight
from workers.profiles.deliveries import events_for, parse_delivery
from workers.profiles.identity import addresses, lookup_keys

EMAILS = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")

Owner = tuple[Profile, Stored]


@dataclass(frozen=True)
class ErasurePlan:
    """What one erasure request does to the store.

    Parameters:
      tombstone: the person's profile from now on: id, stamp, hashed identifiers, absorbed ids.
      version: the stored document's version to guard the write with (None: a new document).
      pointers: other live profiles of the person, ``(id, version)``: they become pointers to the tombstone.
      absorbed: profiles absorbed earlier, already pointers: whatever they still hold is removed.
      addresses: every email address of the person, to delete at every ESP target.
      request_id: the receipt this erasure reports to.
      carried: per ESP target, sends of the other profiles that may still be in flight: the
        tombstone's deletions wait for them, or one could bring a contact back afterwards.
    """

    tombstone: Profile
    version: int | None
    pointers: tuple[tuple[str, int], ...]
    absorbed: tuple[str, ...]
    addresses: tuple[str, ...]
    request_id: str
    carried: dict[str, InFlight] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """The tombstone's index keys: the keyed hash of every identifier."""
        return list(self.tombstone.identifiers[ERASED])


def request_keys(event: CustomerErased) -> list[str]:
    """Every identity key of the request, strongest first (the strongest names a new tombstone)."""
    named = lookup_keys(event.identity, event.source) if event.identity is not None else []
    return [*named, *sorted(set(event.also) - set(named))]


def request_id(event: CustomerErased, hasher: IdentityHasher) -> str:
    """The operator's receipt id, or one derived from the sender's event id (the same for every retry)."""
    return event.request_id or hasher.erasure_id(event.event_id)


def plan(owners: list[Owner], event: CustomerErased, hasher: IdentityHasher, targets: tuple[str, ...] = ()) -> ErasurePlan:
    """The erasure of everyone in ``owners`` (every stored profile one of the request's keys found,
    tombstones included) as one tombstone. Pure."""
    keys = request_keys(event)
    rid = request_id(event, hasher)
    tomb = next(((p, m) for p, m in owners if p.erased is not None), None)
    live = [(p, m) for p, m in owners if p.erased is None]
    base = tomb or (live[0] if live else None)
    tomb_id = base[0].id if base else hasher.profile_id(keys[0])
    known = set(keys).union(*(profile_keys(p) for p, _ in live))
    hashed = {hasher.index_key(k) for k in known} | set(tomb[0].identifiers.get(ERASED, ()) if tomb else ())
    absorbed = set().union(*(p.merged_from for p, _ in owners)) | {p.id for p, _ in live if p.id != tomb_id}
    emails = {k.split(":", 1)[1] for k in keys if k.startswith(f"{EMAIL}:")}.union(*(addresses(p) for p, _ in live))
    stamp = tomb[0].erased if tomb else Stamp(event_time=event.event_time, source=event.source, event_id=rid)
    tombstone = Profile(id=tomb_id, erased=stamp, identifiers={ERASED: tuple(sorted(hashed))},
                        merged_from=tuple(sorted(absorbed - {tomb_id})))
    return ErasurePlan(
        tombstone=tombstone,
        version=base[1].version if base else None,
        pointers=tuple((p.id, m.version) for p, m in live if p.id != tomb_id),
        absorbed=tuple(sorted(absorbed - {p.id for p, _ in live} - {tomb_id})),
        addresses=tuple(sorted(emails)),
        request_id=rid,
        carried=in_flight((m for p, m in live if p.id != tomb_id), targets),
    )


def hashed_request(event: CustomerErased, hasher: IdentityHasher) -> list[str]:
    """The request's identifiers as the receipt shows them: keyed hashes only."""
    return sorted({hasher.index_key(k) for k in request_keys(event)})


def delivery_keys(delivery: Mapping[str, Any], mappings: Mapping[str, Any]) -> set[str]:
    """The identity keys a raw delivery names, to find what an erasure must remove (a quarantined
    delivery, a dead letter). Through its mapping when it maps; else every email address in it."""
    try:
        events = events_for(parse_delivery(delivery), dict(mappings))
    except MergetagError:
        events = []
    keys = {k for e in events if getattr(e, "identity", None) is not None for k in lookup_keys(e.identity, e.source)}
    found = EMAILS.findall(json.dumps(delivery.get("payload", delivery), default=str))
    return keys | {identity_key(EMAIL, address.lower()) for address in found}
