"""Group commit for the merge: the messages a worker process has in flight are merged together.

Each message's merge joins the current round. A round makes one lookup of every identity key of
its merges, folds every event of one person into one pure merge in memory, and writes all of its
profiles in one unordered bulk write, each guarded by the version it read. A message is answered
(then acked) only once the write that holds it is done. What a round cannot do on its own — a
person spread over several profiles (they merge), a write that lost a race, identifiers past their
limits — goes through the single path (``resolve.merge_into_profile``) for that message alone.

The profiles a round read or wrote stay in the process's :class:`ProfileCache`: a merge whose keys
are all known there is not read again (its write's version guard still holds it to what it read).
A merge whose cached profile had changed meanwhile misses its guard and joins the next round, read
afresh. A lone message on an idle system merges at once, as a round of one: one round trip (its write)
when its profile is cached, else two (the read and the write), as on the single path.

Up to ``depth`` rounds are in flight at once, so one round's pure merges run while the store writes
the one before: the store does not wait for the process, nor the process for the store. A round
joins one in flight only when it is full (more than ``max_merges`` wait), so rounds do not shrink. A
merge whose keys a round in flight holds waits for that round (it would only lose its guard to it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from adapters.store.writes import Save
from schemas.events import Event, Identity
from schemas.profile import Profile, profile_keys
from schemas.sync import NEW, Stored
from workers.profiles.cache import ProfileCache
from workers.profiles.consent import address_work, consent_changed, contacts_held
from workers.profiles.identity import lookup_keys, new_profile, over_limits
from workers.profiles.merge import changed_traits, merge_all
from workers.profiles.resolve import Merged, changed, handed, merge_into_profile
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class _Merge:
    identity: Identity
    events: list[Event]
    keys: list[str]
    done: asyncio.Future[Merged]
    fresh: bool = False
    """Read from the store, not the cache (its cached profile had changed)."""


@dataclass
class _Person:
    """The merges of one round that name one person: their keys overlap, or one profile owns them."""

    merges: list[_Merge] = field(default_factory=list)
    owners: dict[str, tuple[Profile, Stored]] = field(default_factory=dict)

    def cached(self, read: dict[str, tuple[Profile, Stored]]) -> bool:
        """Some profile of the person comes from the cache, not this round's read."""
        return any(key not in read for key in self.owners)


class MergeBatcher:
    """Parameters:
      rt: the process's runtime.
      max_merges: most merges in one round (one bulk write).
      window_s: how long a round waits for more merges to join it; 0: those of one event-loop turn.
      cache_profiles: most profiles kept from one round for the next (0: every round reads).
      depth: most rounds in flight at once (1: one after the other).
    """

    def __init__(self, rt: Runtime, max_merges: int = 500, window_s: float = 0.0, cache_profiles: int = 0, depth: int = 2) -> None:
        self._rt = rt
        self._max = max_merges
        self._window = window_s
        self._depth = max(1, depth)
        self.cache = ProfileCache(cache_profiles)
        self._pending: list[_Merge] = []
        self._held: set[str] = set()
        """The keys of the rounds in flight: no two of them share one, so a set is exact."""
        self._arrived = asyncio.Event()
        self._round: asyncio.Task[None] | None = None
        self.rounds = 0

    async def merge(self, identity: Identity, events: list[Event]) -> Merged:
        """Merge ``events`` into the identity's profile, together with whatever else is in flight."""
        done: asyncio.Future[Merged] = asyncio.get_running_loop().create_future()
        self._pending.append(_Merge(identity, events, lookup_keys(identity, events[0].source), done))
        if len(self._pending) >= self._max:
            self._arrived.set()  # a full round: it may join the one in flight
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._rounds())
        return await done

    async def _rounds(self) -> None:
        flying: set[asyncio.Task[None]] = set()
        while self._pending or flying:
            # A round joins one in flight only when it is full: small rounds would cost the store more.
            if self._pending and (not flying or len(self._pending) >= self._max) and len(flying) < self._depth:
                await asyncio.sleep(self._window)  # the merges of this loop turn (or window) join the round
                batch = self._take()
                if batch:
                    self.rounds += 1
                    flying.add(asyncio.get_running_loop().create_task(self._round_of(batch)))
                    continue
            self._arrived.clear()
            arrival = asyncio.get_running_loop().create_task(self._arrived.wait())
            await asyncio.wait([*flying, arrival], return_when=asyncio.FIRST_COMPLETED)
            arrival.cancel()
            flying = {task for task in flying if not task.done()}

    def _take(self) -> list[_Merge]:
        """The next round: pending merges, oldest first, whose keys no round in flight holds."""
        batch: list[_Merge] = []
        left: list[_Merge] = []
        for m in self._pending:
            (batch if len(batch) < self._max and not any(k in self._held for k in m.keys) else left).append(m)
        self._pending = left
        self._held.update(k for m in batch for k in m.keys)
        return batch

    async def _round_of(self, batch: list[_Merge]) -> None:
        try:
            await self._merge_round(batch)
        except Exception as exc:  # the store failed: every message of the round is retried by the broker
            for m in batch:
                if not m.done.done():
                    self.cache.forget(m.keys)  # its write may or may not have landed
                    m.done.set_exception(exc)
        finally:
            self._held.difference_update(k for m in batch for k in m.keys)

    async def _merge_round(self, batch: list[_Merge]) -> None:
        rt = self._rt
        owners: dict[str, tuple[Profile, Stored]] = {}
        unknown: set[str] = set()
        for m in batch:
            known = None if m.fresh else self.cache.owners(m.keys)
            if known is None:
                unknown.update(m.keys)
            else:
                owners.update(known)
        read = await rt.store.owners_by_key(sorted(unknown), rt.esps) if unknown else {}
        self._remember(read)
        renewed = {profile.id: (profile, stored) for profile, stored in read.values()}
        owners = {k: renewed.get(profile.id, (profile, stored)) for k, (profile, stored) in owners.items()}
        owners.update(read)
        alone: list[_Merge] = []
        again: list[_Merge] = []
        saves: list[tuple[Save, list[_Merge], Stored, bool]] = []
        for person in _people(batch, owners):
            found = {p.id: (p, s) for p, s in person.owners.values()}
            cached = person.cached(read)
            tombstone = next((p for p, _ in found.values() if p.erased is not None), None)
            if tombstone is not None:
                # An erased person stays erased: nothing that arrives later is kept, however it names them.
                for m in person.merges:
                    await rt.receipts.late_event(tombstone.id)
                    m.done.set_result(Merged(tombstone.id, []))
                continue
            if len(found) > 1:
                alone += person.merges  # several profiles of one person: the single path merges them
                continue
            keys = sorted({k for m in person.merges for k in m.keys}, key=_strength)
            profile, stored = next(iter(found.values())) if found else (new_profile(keys, rt.hasher), NEW)
            events = [e for m in person.merges for e in m.events]
            merged = merge_all(profile, events, rt.settings.loyalty_tiers, rt.rules)
            limits = (rt.settings.identifier_limits, rt.settings.identifier_limit_default)
            if set(over_limits(merged, *limits)) - set(over_limits(profile, *limits)):
                alone += person.merges  # the single path refuses the identifiers past the limits
                continue
            if merged == profile and stored.version is not None:
                for m in person.merges:
                    m.done.set_result(Merged(merged.id, []))
                continue
            before = profile if stored.version is not None else None
            if cached and address_work(before, merged, dict.fromkeys(rt.esps, True)):
                again += self._afresh(person.merges)  # address work depends on what the sync recorded since
                continue
            members = rt.members(merged)
            work = address_work(before, merged, contacts_held(stored, rt.esps))
            urgent = consent_changed(profile, merged) or any("unsubscribe" in lists for lists in work.values())
            saves.append((Save(merged, stored.version, members, urgent, work, stored, before), person.merges, stored, cached))
        written = await rt.store.save_many([save for save, _, _, _ in saves])
        for (save, merges, stored, cached), ok in zip(saves, written, strict=True):
            if not ok:
                # Lost a race: read again, in the next round when what it read was the cache's, else alone.
                if cached:
                    again += self._afresh(merges)
                else:
                    self.cache.drop(save.profile.id)
                    alone += merges
                continue
            version = (stored.version or 0) + 1
            self.cache.put((save.profile, _after(stored, save, version)), profile_keys(save.profile))
            targets = changed(save.members, stored, save.work)
            result = Merged(save.profile.id, targets, save.urgent, version, tuple(changed_traits(save.before, save.profile)),
                            handed(save.members, targets, save.work))
            for m in merges:
                m.done.set_result(result)
        self._pending[:0] = again
        if alone:
            log.debug("%d of %d merges of a round go alone", len(alone), len(batch))
            await self._alone(alone)

    def _remember(self, read: dict[str, tuple[Profile, Stored]]) -> None:
        """Keep what a round read, each profile found by the keys it owns."""
        keys: dict[str, list[str]] = {}
        for key, (profile, _) in read.items():
            keys.setdefault(profile.id, []).append(key)
        for key, owner in read.items():
            if keys.get(owner[0].id) is not None:
                self.cache.put(owner, [*keys.pop(owner[0].id), *(profile_keys(owner[0]) if owner[0].erased is None else [])])

    def _afresh(self, merges: list[_Merge]) -> list[_Merge]:
        for m in merges:
            self.cache.forget(m.keys)
            m.fresh = True
        return merges

    async def _alone(self, merges: list[_Merge]) -> None:
        for m in merges:
            self.cache.forget(m.keys)  # the single path reads and writes without the cache
            try:
                result = await merge_into_profile(self._rt, m.identity, m.events)
            except Exception as exc:  # this message alone is retried by the broker
                m.done.set_exception(exc)
                continue
            self.cache.drop(result.profile_id)
            m.done.set_result(result)


def _after(stored: Stored, save: Save, version: int) -> Stored:
    """What the cache keeps of a profile's store state after its write: the new version and member
    hashes (exact: only the merge changes them); the sync's own fields as they were read."""
    esp = {target: stored.state(target).model_copy(update={"member_hash": digest}) for target, (_, digest) in save.members.items()}
    return Stored(version=version, esp={**stored.esp, **esp})


_KINDS = ("email:", "phone:")


def _strength(key: str) -> tuple[int, str]:
    """Keys strongest first, as ``lookup_keys`` orders them: email, phone, a sender's id, anonymous id."""
    rank = next((i for i, prefix in enumerate(_KINDS) if key.startswith(prefix)), 3 if key.startswith("anonymous:") else 2)
    return rank, key


def _people(batch: list[_Merge], owners: dict[str, tuple[Profile, Stored]]) -> list[_Person]:
    """The round's merges grouped by person: merges sharing a key, or keys owned by one profile, are one."""
    parent = list(range(len(batch)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, m in enumerate(batch):
        names = [*m.keys, *(f"profile:{owners[k][0].id}" for k in m.keys if k in owners)]
        for name in names:
            if name in first:
                parent[root(i)] = root(first[name])
            else:
                first[name] = i
    people: dict[int, _Person] = {}
    for i, m in enumerate(batch):
        person = people.setdefault(root(i), _Person())
        person.merges.append(m)
        person.owners.update({k: owners[k] for k in m.keys if k in owners})
    return list(people.values())
