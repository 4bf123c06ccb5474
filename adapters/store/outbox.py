"""The outbox: every query on the per-target sync state of profiles (``profile.esp.<target>``).

Each profile carries, per ESP target, the member it should hold and the bookkeeping of getting it
there: what was last sent, what the ESP refused, whether anything is pending (and urgent), the
send lease and its token, bulk jobs in flight, and address work (erasures and their read-back,
unsubscribes, retirements). The profile store writes the member with the profile; everything the
sync does afterwards goes through here. Every write after a claim names the lease's token, so a
send that outlived its lease cannot overwrite what the next holder records.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import PyMongoError

from adapters.store import records
from adapters.store.bulk import each
from schemas.errors import SyncBusy
from schemas.sync import ADDRESS_LISTS, Claimed, Expected, InFlight, Settlement, SyncState

PROFILES = "profiles"
Members = dict[str, tuple[dict[str, Any] | None, str | None]]
Work = dict[str, dict[str, list[str]]]
RELEASE_WAIT_S = 60.0
"""How long a send the store failed under keeps trying to release its leases (a restart or a failover takes seconds)."""
RELEASE_RETRY_S = 0.5
JOB_NOTE_WAIT_S = 60.0
"""How long recording a bulk job the ESP accepted waits for a failing store."""



def _pending_query(prefix: str, **more: Any) -> dict[str, Any]:
    """Pending profiles, as a filter the ``{pending, dirty_at}`` index serves; which of them a sync can do
    (:attr:`SyncState.sendable`) is decided on the documents, see :meth:`Outbox._sendable`.

    No hot filter here has a top-level operator (``$or``, ``$expr``): SecantusDB plans none of those on an
    index and scans the whole collection under its lock instead — once per document of a bulk write.
    """
    return {f"{prefix}.pending": True, "merged_into": {"$exists": False}, **{f"{prefix}.{k}": v for k, v in more.items()}}


def _not_after(moment: datetime) -> dict[str, Any]:
    """A date field that is absent, null or not after ``moment`` (one clause, no ``$or``)."""
    return {"$not": {"$gt": moment}}


def _with_work(prefix: str, lists: dict[str, list[str]]) -> dict[str, Any]:
    """Pipeline ``$set`` entries adding ``lists`` (name -> addresses) to a target's address lists."""
    return {f"{prefix}.{name}": {"$setUnion": [{"$ifNull": [f"${prefix}.{name}", []]}, records.literal(sorted(emails))]}
            for name, emails in lists.items() if emails}


def carry(carried: dict[str, InFlight]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``$addToSet`` and ``$max`` entries that make another profile's in-flight sends this one's to wait for."""
    jobs = {f"esp.{esp}.jobs": {"$each": list(f.jobs)} for esp, f in carried.items() if f.jobs}
    until = {f"esp.{esp}.fence_until": f.until for esp, f in carried.items() if f.until is not None}
    return jobs, until


class Outbox:
    """Parameters:
      client: an ``AsyncMongoClient`` created with ``tz_aware=True``.
      database: database name.
    """

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.profiles = client[database][PROFILES]

    async def forget(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        """The ESP deleted these contacts: they wait for their read-back now, no longer for deletion."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(records.owned(profile_id, esp, token),
                                       {"$pullAll": {f"{prefix}.erase": emails}, "$addToSet": {f"{prefix}.verify": {"$each": emails}}})

    async def done(self, profile_id: str, esp: str, token: str, name: str, emails: list[str]) -> None:
        """Addresses of list ``name`` (verify, unsubscribe, retire) whose work at the ESP is done."""
        await self.profiles.update_one(records.owned(profile_id, esp, token), {"$pullAll": {f"esp.{esp}.{name}": emails}})

    async def redo(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        """Contacts the ESP still holds after their deletion: delete them again."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(records.owned(profile_id, esp, token),
                                       {"$pullAll": {f"{prefix}.verify": emails}, "$addToSet": {f"{prefix}.erase": {"$each": emails}},
                                        "$unset": {f"{prefix}.verify_checks": ""}})

    async def checked(self, profile_id: str, esp: str, token: str) -> int:
        """Count one more read-back that still found an erased contact; returns how many so far."""
        doc = await self.profiles.find_one_and_update(records.owned(profile_id, esp, token), {"$inc": {f"esp.{esp}.verify_checks": 1}},
                                                      projection={f"esp.{esp}.verify_checks": 1}, return_document=ReturnDocument.AFTER)
        return int(((doc or {}).get("esp", {}).get(esp) or {}).get("verify_checks", 0))

    async def claim_send(self, profile_id: str, esp: str, lease: timedelta) -> tuple[SyncState, str] | None:
        """Take the profile's send lease for ``esp``: its sync state and the lease's token.

        One send per profile and ESP at a time, so an older member can never overtake a newer one;
        every later write of this send names the token, so a send that outlived its lease cannot
        overwrite what the lease's next holder records. Returns None when the profile does not
        exist; raises SyncBusy while another send holds the lease.
        """
        prefix = f"esp.{esp}"
        field = f"{prefix}.sending_until"
        for _ in range(5):
            now, token = datetime.now(timezone.utc), uuid.uuid4().hex
            try:
                doc = await self.profiles.find_one_and_update(
                    {"_id": profile_id, "merged_into": {"$exists": False}, field: _not_after(now)},
                    {"$set": {field: now + lease, f"{prefix}.sending_token": token}},
                    projection={f"esp.{esp}": 1},
                    return_document=ReturnDocument.AFTER,
                )
            except PyMongoError:
                await self.release_lost([profile_id], esp, token, lease)
                raise
            if doc is not None:
                return SyncState.model_validate(doc.get("esp", {}).get(esp, {})), token
            held = await self.profiles.find_one({"_id": profile_id, "merged_into": {"$exists": False}}, {field: 1})
            if held is None:
                return None
            until = held.get("esp", {}).get(esp, {}).get("sending_until")
            if until is not None and until > now:
                # Sends end long before their lease: look again soon rather than at the lease's end.
                raise SyncBusy("another send of this profile is in flight", retry_after=min(1.0, (until - now).total_seconds()))
            # Released between the two reads: claim again.
        raise SyncBusy("the send lease of this profile keeps changing hands", retry_after=0.5)

    async def claim_sends(self, profile_ids: list[str], esp: str, lease: timedelta) -> tuple[dict[str, SyncState], str]:
        """:meth:`claim_send` for many profiles in two round trips (one for a single profile), under one token;
        profiles whose lease is held are left out. Returns their sync states and the token."""
        prefix, now, token = f"esp.{esp}", datetime.now(timezone.utc), uuid.uuid4().hex
        free = {"merged_into": {"$exists": False}, f"{prefix}.sending_until": _not_after(now)}
        take = {"$set": {f"{prefix}.sending_until": now + lease, f"{prefix}.sending_token": token}}
        try:
            if len(profile_ids) == 1:  # nothing else to take along: one round trip
                doc = await self.profiles.find_one_and_update({"_id": profile_ids[0], **free}, take, projection={f"esp.{esp}": 1},
                                                              return_document=ReturnDocument.AFTER)
                found = {doc["_id"]: SyncState.model_validate(doc["esp"][esp])} if doc is not None else {}
            else:
                await each(self.profiles, profile_ids, free, take)
                cursor = self.profiles.find({"_id": {"$in": profile_ids}, f"{prefix}.sending_token": token}, {f"esp.{esp}": 1},
                                            batch_size=len(profile_ids) + 1)
                found = {doc["_id"]: SyncState.model_validate(doc["esp"][esp]) async for doc in cursor}
            return {pid: found[pid] for pid in profile_ids if pid in found}, token  # in the order asked for
        except PyMongoError:
            await self.release_lost(profile_ids, esp, token, lease)
            raise

    async def claim_expected(self, expected: dict[str, dict[str, Expected]], leases: dict[str, timedelta],
                             riders: Sequence[Settlement] = (), token: str | None = None) -> tuple[Claimed, list[str]]:
        """:meth:`claim_round` without the read, for profiles whose merge handed its members to the sync
        (profile -> target -> :class:`Expected`): each profile's write takes its targets' leases only where
        the stored state is exactly what the merge wrote — that member, neither held by the ESP nor refused
        as it is, no address work, the lease free, not merged away — so the state handed over is the one a
        read would have found. ``riders``: records waiting for a write, written in this one. One round trip;
        one more, a read, when some profile's write did not match. Returns the claimed pairs and the profiles
        left for :meth:`claim_round` (their state was not as handed over)."""
        now, token = datetime.now(timezone.utc), token or uuid.uuid4().hex
        takes = []
        for pid, targets in expected.items():
            match: dict[str, Any] = {"_id": pid, "merged_into": {"$exists": False}}
            take: dict[str, Any] = {}
            for esp, hint in targets.items():
                prefix = f"esp.{esp}"
                match.update({f"{prefix}.member_hash": hint.member_hash, f"{prefix}.sent_hash": {"$ne": hint.member_hash},
                              f"{prefix}.failed_hash": {"$ne": hint.member_hash}, f"{prefix}.sending_until": _not_after(now),
                              **{f"{prefix}.{name}.0": {"$exists": False} for name in ADDRESS_LISTS}})
                take.update({f"{prefix}.sending_until": now + leases[esp], f"{prefix}.sending_token": token})
            takes.append(UpdateOne(match, {"$set": take}))
        ops = [*records.one_per_profile([w for settlement in riders for w in records.settlement_writes(settlement)]), *takes]
        claimed = Claimed(token)
        try:
            result = await self.profiles.bulk_write(ops, ordered=False)
            if result.matched_count == len(ops):
                taken = set(expected)
            else:  # some write did not match (a rider's lease lost, or a take): which takes did, the tokens say
                fields = {f"esp.{esp}.sending_token": 1 for targets in expected.values() for esp in targets}
                docs = await self.profiles.find({"_id": {"$in": list(expected)}}, fields, batch_size=len(expected) + 1).to_list()
                taken = {doc["_id"] for doc in docs if all(doc.get("esp", {}).get(esp, {}).get("sending_token") == token
                                                           for esp in expected[doc["_id"]])}
        except PyMongoError:
            for esp in {esp for targets in expected.values() for esp in targets}:
                await self.release_lost([pid for pid, targets in expected.items() if esp in targets], esp, token, leases[esp])
            raise
        for pid in taken:
            for esp, hint in expected[pid].items():
                claimed.states[esp, pid] = hint.state(token, now + leases[esp])
        return claimed, [pid for pid in expected if pid not in taken]

    async def claim_round(self, pairs: dict[str, list[str]], leases: dict[str, timedelta], token: str | None = None) -> Claimed:
        """:meth:`claim_send` for many (target, profile) pairs in two round trips under one token: one write per
        profile takes each of its targets' leases that is free, one read returns their states (for one
        profile, one round trip).

        Parameters:
          pairs: target -> profiles.
          leases: each target's lease.
        """
        now, token = datetime.now(timezone.utc), token or uuid.uuid4().hex
        targets: dict[str, list[str]] = {}
        for esp, pids in pairs.items():
            for pid in pids:
                targets.setdefault(pid, []).append(esp)

        def take(esp: str) -> dict[str, Any]:
            prefix = f"esp.{esp}"
            free = {"$not": [{"$gt": [f"${prefix}.sending_until", now]}]}
            return {f"{prefix}.sending_until": {"$cond": [free, now + leases[esp], f"${prefix}.sending_until"]},
                    f"{prefix}.sending_token": {"$cond": [free, token, f"${prefix}.sending_token"]}}

        live = {"merged_into": {"$exists": False}}
        updates = {pid: [{"$set": {k: v for esp in esps for k, v in take(esp).items()}}] for pid, esps in targets.items()}
        fields = {f"esp.{esp}": 1 for esp in pairs}
        claimed = Claimed(token)
        try:
            if len(updates) == 1:  # one profile (the targets of one change): one round trip
                (pid, update), = updates.items()
                doc = await self.profiles.find_one_and_update({"_id": pid, **live}, update, projection=fields, return_document=ReturnDocument.AFTER)
                docs = [doc] if doc is not None else []
            else:
                await self.profiles.bulk_write([UpdateOne({"_id": pid, **live}, update) for pid, update in updates.items()], ordered=False)
                docs = await self.profiles.find({"_id": {"$in": list(targets)}, **live}, fields, batch_size=len(targets) + 1).to_list()
            for doc in docs:
                for esp in targets[doc["_id"]]:
                    stored = doc.get("esp", {}).get(esp, {})
                    if stored.get("sending_token") == token:
                        claimed.states[esp, doc["_id"]] = SyncState.model_validate(stored)
                    else:
                        claimed.busy.append((esp, doc["_id"]))
        except PyMongoError:
            for esp, pids in pairs.items():
                await self.release_lost(pids, esp, token, leases[esp])
            raise
        return claimed

    async def release_lost(self, profile_ids: list[str], esp: str, token: str, lease: timedelta) -> bool:
        """Release the leases of a send the store (or the broker) failed under while nothing of it was in flight
        at the ESP — a claim written though its answer was lost, an outcome that could not be recorded — as
        soon as the store answers again. Nobody else knows the token: left alone, those leases would hold
        every later sync of these profiles off until they run out (minutes, where a send waits for bulk jobs).

        Tries for as long as the lease (at most ``RELEASE_WAIT_S``); returns whether the store answered.
        """
        deadline = time.monotonic() + min(lease.total_seconds(), RELEASE_WAIT_S)
        while True:
            try:
                await self.settle_many(esp, token, [], [], profile_ids)
                return True
            except PyMongoError:
                if time.monotonic() + RELEASE_RETRY_S > deadline:
                    return False
                await asyncio.sleep(RELEASE_RETRY_S)

    async def note_job(self, esp: str, token: str, job_id: str, profile_ids: list[str], settled: Sequence[Settlement] = ()) -> None:
        """An ESP accepted a bulk job carrying these profiles: until it is confirmed finished, an erasure
        of any of them waits for it (it could otherwise land after the deletion). ``settled``: outcomes
        of other sends (each under its own token), recorded in the same write.

        The job runs whatever the store does, so a store that fails here is waited for (up to
        ``JOB_NOTE_WAIT_S``): giving up would leave a running job nobody knows of, its leases held
        until they run out. A set union makes a repeat harmless, as the token does a settlement's.
        """
        await self.settle(Settlement(token, noted=[(esp, job_id, profile_ids)]), *settled, wait_s=JOB_NOTE_WAIT_S)

    async def job_finished(self, profile_id: str, esp: str, token: str, job_id: str) -> None:
        await self.profiles.update_one(records.owned(profile_id, esp, token), {"$pull": {f"esp.{esp}.jobs": job_id}})

    async def settle_many(self, esp: str, token: str, sent: list[tuple[str, str]], failed: list[tuple[str, str, str]],
                          released: list[str], jobs: list[str] | None = None) -> None:
        """Record a batch's outcome per profile, in one round trip; only where ``token`` still holds the lease.

        ``jobs``: the batch's bulk jobs, all confirmed finished.
        """
        settlement = Settlement(token)
        settlement.add(esp, sent=sent, failed=failed, released=released, jobs=jobs or ())
        await self.settle(settlement)

    async def settle(self, *settlements: Settlement, wait_s: float = 0.0) -> None:
        """Record sends' outcomes (and noted jobs) at any targets in one round trip; only where each settlement's
        token still holds the lease. ``wait_s``: how long a failing store is tried again (a noted job's wait)."""
        ops = records.one_per_profile([w for settlement in settlements for w in records.settlement_writes(settlement)])
        deadline = time.monotonic() + wait_s
        while ops:
            try:
                await self.profiles.bulk_write(ops, ordered=False)
                return
            except PyMongoError:
                if time.monotonic() + RELEASE_RETRY_S > deadline:
                    raise
                await asyncio.sleep(RELEASE_RETRY_S)

    async def park(self, profile_ids: list[str], esp: str) -> None:
        """Leave pending profiles to the sweeper's next run (their ESP is down): they wait in MongoDB
        rather than cycling through the queue. Send leases are not touched."""
        await each(self.profiles, profile_ids, {}, {"$unset": {f"esp.{esp}.swept_at": ""}})

    async def release_send(self, profile_id: str, esp: str, token: str) -> None:
        """End the send lease and settle ``pending`` from what is stored (a no-op send leaves nothing pending)."""
        await self.profiles.update_one(records.owned(profile_id, esp, token), records.released(f"esp.{esp}", []))

    async def mark_sent(self, profile_id: str, esp: str, token: str, sent_hash: str, jobs: list[str] | None = None) -> bool:
        """Record what the ESP now holds; still pending if the profile moved on meanwhile.

        ``jobs``: the send's bulk jobs, confirmed finished. Returns False when the lease was lost (it
        ran out and another send took it): that send records its own outcome, this one must not
        overwrite it.
        """
        done = await self.profiles.update_one(records.owned(profile_id, esp, token), records.sent(f"esp.{esp}", sent_hash, jobs or []))
        return done.matched_count == 1

    async def mark_failed(self, profile_id: str, esp: str, token: str, failed_hash: str, code: str) -> None:
        """Remember a member the ESP refused, so the sweeper does not resend it until it changes."""
        await self.profiles.update_one(records.owned(profile_id, esp, token), records.failed(f"esp.{esp}", failed_hash, code, []))

    async def synced_sample(self, esp: str, limit: int) -> list[dict[str, Any]]:
        """Profiles whose member the ESP should hold, as last sent (a random sample; all when ``limit`` is 0)."""
        prefix = f"esp.{esp}"
        match = {f"{prefix}.sent_hash": {"$exists": True}, f"{prefix}.member": {"$ne": None}, f"{prefix}.pending": False,
                 "merged_into": {"$exists": False}}
        project = {"$project": {"member": f"${prefix}.member"}}
        pipeline = [{"$match": match}, *([{"$sample": {"size": limit}}] if limit else []), project]
        return [doc async for doc in await self.profiles.aggregate(pipeline)]

    async def resend(self, esp: str, profile_ids: list[str]) -> None:
        """Forget what was sent, so the sync sends these members again."""
        prefix = f"esp.{esp}"
        await each(self.profiles, profile_ids, {}, {"$unset": {f"{prefix}.sent_hash": ""},
                                                    "$set": {f"{prefix}.pending": True, f"{prefix}.dirty_at": datetime(1970, 1, 1, tzinfo=timezone.utc)}})

    async def _sendable(self, esp: str, query: dict[str, Any], limit: int, urgent_first: bool = False) -> list[str]:
        """The first ``limit`` profiles of ``query`` a sync can do, oldest change first: the refused ones
        (rare) are passed over on the documents, so they never take another's place. One round trip
        unless some were passed over: each read is limited, so the server closes its cursor itself
        (no ``getMore``, no ``killCursors``)."""
        if limit <= 0:
            return []
        prefix = f"esp.{esp}"
        fields = {f"{prefix}.{name}": 1 for name in ("pending", "member_hash", "failed_hash", *ADDRESS_LISTS)}
        order = [(f"{prefix}.urgent", DESCENDING)] if urgent_first else []
        ids: list[str] = []
        read = 0
        while True:
            docs = await self.profiles.find(query, fields).sort([*order, (f"{prefix}.dirty_at", ASCENDING)]).skip(read).limit(limit) \
                .batch_size(limit + 1).to_list()
            ids += [doc["_id"] for doc in docs if SyncState.model_validate(doc["esp"][esp]).sendable]
            read += len(docs)
            if len(ids) >= limit or len(docs) < limit:
                return ids[:limit]

    async def count_pending(self, esp: str, cap: int) -> int:
        """How many profiles wait for ``esp`` (refused ones aside), counted up to ``cap``."""
        return len(await self._sendable(esp, _pending_query(f"esp.{esp}"), cap))

    async def count_sent_since(self, esp: str, since: datetime) -> int:
        """How many profiles ``esp`` was sent a member of since ``since`` (each once, however often it was sent)."""
        return await self.profiles.count_documents({f"esp.{esp}.sent_at": {"$gte": since}})

    async def pending_ids(self, esp: str, limit: int) -> list[str]:
        """Profiles waiting for ``esp`` (refused ones aside): urgent ones first, then oldest change first; nothing is claimed."""
        return await self._sendable(esp, _pending_query(f"esp.{esp}"), limit, urgent_first=True)  # consent changes and erasures first

    async def claim_pending(self, esp: str, older_than: timedelta, lease: timedelta, limit: int = 500,
                            urgent: bool = False) -> list[str]:
        """Pending profiles, oldest change first, not refused as they are and not swept within ``lease``
        (only those marked urgent, with ``urgent``).

        Claiming stamps ``swept_at`` so a backlog or an ESP outage is not re-enqueued every sweep.
        """
        now = datetime.now(timezone.utc)
        prefix = f"esp.{esp}"
        unswept = {f"{prefix}.swept_at": _not_after(now - lease)}
        query = _pending_query(prefix, dirty_at={"$lte": now - older_than}, swept_at=_not_after(now - lease),
                               **({"urgent": True} if urgent else {}))
        ids = await self._sendable(esp, query, limit)
        if ids:
            await each(self.profiles, ids, unswept, {"$set": {f"{prefix}.swept_at": now}})
        return ids


