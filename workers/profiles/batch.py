"""Group commit for the merge: the messages a worker process has in flight are merged together.

Each message's merge joins the current round. A round makes one lookup of every identity key of
its merges, folds every event of one person into one pure merge in memory, and writes all of its
profiles in one unordered bulk write, each guarded by the version it read. A message is answered
(then acked) only once the write that holds it is done. What a round cannot do on its own — a
person spread over several profiles (they merge), a write that lost a race, identifiers past their
limits — goes through the single path (``resolve.merge_into_profile``) for that message alone. A lone
message on an idle system takes the single path at once: two round trips, as before.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from adapters.store.writes import Save
from schemas.events import Event, Identity
from schemas.profile import Profile
from schemas.sync import NEW, Stored
from workers.profiles.consent import address_work, consent_changed, contacts_held
from workers.profiles.identity import lookup_keys, new_profile, over_limits
from workers.profiles.merge import changed_traits, merge_all
from workers.profiles.resolve import Merged, changed, merge_into_profile
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class _Merge:
    identity: Identity
    events: list[Event]
    keys: list[str]
    done: asyncio.Future[Merged]


@dataclass
class _Person:
    """The merges of one round that name one person: their keys overlap, or one profile owns them."""

    merges: list[_Merge] = field(default_factory=list)
    owners: dict[str, tuple[Profile, Stored]] = field(default_factory=dict)


class MergeBatcher:
    """Parameters:
      rt: the process's runtime.
      max_merges: most merges in one round (one bulk write).
      window_s: how long a round waits for more merges to join it; 0: those of one event-loop turn.
    """

    def __init__(self, rt: Runtime, max_merges: int = 500, window_s: float = 0.0) -> None:
        self._rt = rt
        self._max = max_merges
        self._window = window_s
        self._pending: list[_Merge] = []
        self._round: asyncio.Task[None] | None = None
        self.rounds = 0

    async def merge(self, identity: Identity, events: list[Event]) -> Merged:
        """Merge ``events`` into the identity's profile, together with whatever else is in flight."""
        done: asyncio.Future[Merged] = asyncio.get_running_loop().create_future()
        self._pending.append(_Merge(identity, events, lookup_keys(identity, events[0].source), done))
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._rounds())
        return await done

    async def _rounds(self) -> None:
        while self._pending:
            await asyncio.sleep(self._window)  # the merges of this loop turn (or window) join the round
            batch, self._pending = self._pending[:self._max], self._pending[self._max:]
            self.rounds += 1
            try:
                await self._merge_round(batch)
            except Exception as exc:  # the store failed: every message of the round is retried by the broker
                for m in batch:
                    if not m.done.done():
                        m.done.set_exception(exc)

    async def _merge_round(self, batch: list[_Merge]) -> None:
        if len(batch) == 1:
            await self._alone(batch)
            return
        rt = self._rt
        owners = await rt.store.owners_by_key(sorted({k for m in batch for k in m.keys}), rt.esps)
        alone: list[_Merge] = []
        saves: list[tuple[Save, list[_Merge], Stored]] = []
        for person in _people(batch, owners):
            found = {p.id: (p, s) for p, s in person.owners.values()}
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
            members = rt.members(merged)
            work = address_work(profile if stored.version is not None else None, merged, contacts_held(stored, rt.esps))
            urgent = consent_changed(profile, merged) or any("unsubscribe" in lists for lists in work.values())
            before = profile if stored.version is not None else None
            saves.append((Save(merged, stored.version, members, urgent, work, stored, before), person.merges, stored))
        written = await rt.store.save_many([save for save, _, _ in saves])
        for (save, merges, stored), ok in zip(saves, written, strict=True):
            if not ok:
                alone += merges  # lost a race with another writer: read again, alone
                continue
            result = Merged(save.profile.id, changed(save.members, stored, save.work), save.urgent, (stored.version or 0) + 1,
                            tuple(changed_traits(save.before, save.profile)))
            for m in merges:
                m.done.set_result(result)
        if alone:
            log.debug("%d of %d merges of a round go alone", len(alone), len(batch))
            await self._alone(alone)

    async def _alone(self, merges: list[_Merge]) -> None:
        for m in merges:
            try:
                m.done.set_result(await merge_into_profile(self._rt, m.identity, m.events))
            except Exception as exc:  # this message alone is retried by the broker
                m.done.set_exception(exc)


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
