"""The MongoDB profile store, through PyMongo's asyncio API.

Common path per event: one point read by ``_id`` (or by identity key, indexed)
and one conditional write guarded by ``version`` (optimistic concurrency).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import bson
from bson.errors import InvalidDocument
from pydantic import ValidationError
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError

from schemas.errors import BrokerUnavailable, StoredProfileInvalid, SyncBusy
from schemas.profile import ERASED, IdentityHasher, Profile, profile_keys

if TYPE_CHECKING:
    from workers.erasure import ErasurePlan

PROFILES = "profiles"
ERASURES = "erasures"
Members = dict[str, tuple[dict[str, Any] | None, str | None]]


# Per ESP target, addresses that wait for work other than the member itself: erasures (then their
# read-back), unsubscribes of the person's other addresses, retirements of replaced or absorbed contacts.
ADDRESS_LISTS = ("erase", "verify", "unsubscribe", "retire")


def _waiting(prefix: str) -> list[dict[str, Any]]:
    return [{"$gt": [{"$size": {"$ifNull": [f"${prefix}.{name}", []]}}, 0]} for name in ADDRESS_LISTS]


def _pending(prefix: str) -> dict[str, Any]:
    """Pending: the ESP does not hold exactly the profile's member yet, or addresses wait for their work."""
    member_hash = f"${prefix}.member_hash"
    differs = {"$and": [{"$ne": [{"$ifNull": [member_hash, None]}, None]},
                        {"$ne": [member_hash, {"$ifNull": [f"${prefix}.sent_hash", None]}]}]}
    return {"$or": [differs, *_waiting(prefix)]}


def _sendable(prefix: str) -> dict[str, Any]:
    """Pending work a sync can do: not a member the ESP refused exactly as it is, or address work."""
    refused = {"$eq": [{"$ifNull": [f"${prefix}.member_hash", None]}, {"$ifNull": [f"${prefix}.failed_hash", None]}]}
    return {f"{prefix}.pending": True, "merged_into": {"$exists": False}, "$expr": {"$or": [{"$not": [refused]}, *_waiting(prefix)]}}


def _settle(prefix: str) -> list[dict[str, Any]]:
    """Pipeline stages that recompute ``pending``; an ``urgent`` mark lasts only while something is pending."""
    return [{"$set": {f"{prefix}.pending": _pending(prefix)}},
            {"$set": {f"{prefix}.urgent": {"$and": [{"$ifNull": [f"${prefix}.urgent", False]}, f"${prefix}.pending"]}}}]


def _literal(value: Any) -> dict[str, Any]:
    """Values inside pipeline updates must not be read as expressions (a trait may start with ``$``)."""
    return {"$literal": value}


# What a profile document holds about the person: removed from tombstones (which keep hashed identifiers
# and absorbed ids instead), and, with everything else, from pointers.
PERSONAL = tuple(name for name in Profile.model_fields if name not in {"id", "schema_version", "erased", "identifiers", "merged_from"})
POINTER_DROPS = tuple(name for name in Profile.model_fields if name != "id")
Work = dict[str, dict[str, list[str]]]


def _with_work(prefix: str, lists: dict[str, list[str]]) -> dict[str, Any]:
    """Pipeline ``$set`` entries adding ``lists`` (name -> addresses) to a target's address lists."""
    return {f"{prefix}.{name}": {"$setUnion": [{"$ifNull": [f"${prefix}.{name}", []]}, _literal(sorted(emails))]}
            for name, emails in lists.items() if emails}


def _owned(profile_id: str, esp: str, token: str) -> dict[str, Any]:
    """The filter of a write that only the holder of the send lease may make."""
    return {"_id": profile_id, f"esp.{esp}.sending_token": token}


class ProfileStore:
    """Profiles plus their per-ESP sync state.

    Parameters:
      client: an ``AsyncMongoClient`` created with ``tz_aware=True``.
      database: database name.
      hasher: how identity keys are indexed (keyed hashes); needed to find or write profiles by
        identifier, not to read or sync them by id.
    """

    def __init__(self, client: AsyncMongoClient, database: str, hasher: IdentityHasher | None = None) -> None:
        self.client = client
        self.profiles = client[database][PROFILES]
        self._hasher = hasher

    @classmethod
    def connect(cls, uri: str, database: str, hasher: IdentityHasher | None = None) -> ProfileStore:
        return cls(AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5_000), database, hasher)

    @property
    def hasher(self) -> IdentityHasher:
        if self._hasher is None:
            raise ValueError("this store was opened without an identity hasher: it cannot find profiles by identifier")
        return self._hasher

    def index(self, profile: Profile) -> list[str]:
        """The profile's keys in the unique index: the keyed hash of every identifier (a tombstone keeps
        nothing else, so its keys are those hashes as they are)."""
        if profile.erased is not None:
            return list(profile.identifiers.get(ERASED, ()))
        return sorted({self.hasher.index_key(key) for key in profile_keys(profile)})

    async def close(self) -> None:
        await self.client.close()

    async def flag_counts(self) -> dict[str, dict[str, int]]:
        """Per data-quality flag: how many profiles carry it, and how many (kept) events raised it."""
        pipeline = [
            {"$project": {"flags": {"$objectToArray": {"$ifNull": ["$flags", {}]}}}},
            {"$unwind": "$flags"},
            {"$group": {"_id": "$flags.k", "profiles": {"$sum": 1}, "events": {"$sum": {"$size": "$flags.v"}}}},
        ]
        return {d["_id"]: {"profiles": d["profiles"], "events": d["events"]} async for d in await self.profiles.aggregate(pipeline)}

    async def ensure_indexes(self, esps: tuple[str, ...] = ("mailchimp",)) -> None:
        # Unique: one identifier belongs to one profile; a conflicting write fails instead of splitting a person.
        await self.profiles.create_index([("keys", ASCENDING)], name="identity_keys", unique=True)
        for esp in esps:
            await self.profiles.create_index(
                [(f"esp.{esp}.pending", ASCENDING), (f"esp.{esp}.dirty_at", ASCENDING)], name=f"{esp}_pending"
            )

    async def unhashed_left(self) -> bool:
        """Whether profiles written before identifiers were indexed by keyed hashes are still indexed by
        plain ones (they would be found by nothing): ``mergetag profile rekey`` fixes that, once."""
        return await self.profiles.find_one({"keys": {"$regex": "^(email|phone):"}}, {"_id": 1}) is not None

    async def rekey(self) -> int:
        """Index every live profile by the keyed hashes of its identifiers (idempotent); returns how many changed."""
        changed = 0
        async for doc in self.profiles.find({"merged_into": {"$exists": False}, "erased": None}):
            found = self._split(dict(doc))
            if found is None:
                continue
            keys = self.index(found[0])
            if sorted(doc.get("keys", [])) != keys:
                await self.profiles.update_one({"_id": doc["_id"], "version": doc["version"]}, {"$set": {"keys": keys}})
                changed += 1
        return changed

    async def load(self, profile_id: str) -> tuple[Profile, dict[str, Any]] | None:
        """Load a profile, following the pointer an absorbed profile leaves behind."""
        for _ in range(10):
            doc = await self.profiles.find_one({"_id": profile_id})
            if doc is None or "merged_into" not in doc:
                return self._split(doc)
            profile_id = doc["merged_into"]
        return None

    async def find_by_keys(self, keys: list[str]) -> tuple[Profile, dict[str, Any]] | None:
        """The profile owning any of ``keys`` (the first key's owner when several do)."""
        owners = await self.find_owners(keys)
        return owners[0] if owners else None

    async def find_owners(self, keys: list[str]) -> list[tuple[Profile, dict[str, Any]]]:
        """Every profile owning one of identity keys ``keys`` (live ones and tombstones), ordered by the
        strongest key each owns. One round trip."""
        rank = {indexed: i for i, key in enumerate(keys) for indexed in self.hasher.index_keys(key)}
        docs = [doc async for doc in self.profiles.find({"keys": {"$in": list(rank)}}).limit(len(rank))]
        docs.sort(key=lambda d: (min(rank[k] for k in d["keys"] if k in rank), d["_id"]))
        return [split for doc in docs if (split := self._split(doc)) is not None]

    async def absorb(self, survivor: Profile, version: int, absorbed: list[tuple[str, int]], members: Members,
                     work: Work, sent: dict[str, str | None]) -> bool:
        """Merge profiles in one transaction: the absorbed become bare pointers to ``survivor``.

        A pointer keeps nothing of the person (the survivor holds it all now): only its id, where it
        points and a key of its own. Every write is version-guarded; any lost race aborts the whole
        merge (returns False).
        Parameters:
          members: per ESP target, the member the survivor should become and its hash.
          work: per ESP target, address lists to add: contacts of absorbed profiles to retire, so
            none is left orphaned, and addresses to unsubscribe.
          sent: per ESP target, the hash the survivor's contact was last sent.
        """
        body = survivor.model_dump(mode="python", exclude={"id"})
        body["keys"] = self.index(survivor)
        now = datetime.now(timezone.utc)
        state: dict[str, Any] = {}
        for esp, (member, member_hash) in members.items():
            prefix = f"esp.{esp}"
            state.update({f"{prefix}.member": member, f"{prefix}.member_hash": member_hash, f"{prefix}.dirty_at": now,
                          f"{prefix}.pending": (member is not None and member_hash != sent.get(esp)) or any(work.get(esp, {}).values())})
        async with self.client.start_session() as session:
            try:
                async with await session.start_transaction():
                    for absorbed_id, absorbed_version in absorbed:
                        if not await self._point(absorbed_id, survivor.id, now, session, version=absorbed_version):
                            raise _Abort
                    update: dict[str, Any] = {"$set": {**body, **state}, "$inc": {"version": 1}}
                    adding = {f"esp.{esp}.{name}": {"$each": sorted(emails)}
                              for esp, lists in work.items() for name, emails in lists.items() if emails}
                    if adding:
                        update["$addToSet"] = adding
                    done = await self.profiles.update_one({"_id": survivor.id, "version": version}, update, session=session)
                    if done.matched_count != 1:
                        raise _Abort
            except (_Abort, DuplicateKeyError):
                # A lost race, or a third profile took one of the identifiers meanwhile: re-read and retry.
                return False
        return True

    async def _point(self, profile_id: str, target: str, now: datetime, session: Any, version: int | None = None) -> bool:
        """Turn a profile into a bare pointer to ``target``: nothing of the person stays behind."""
        query: dict[str, Any] = {"_id": profile_id, **({"version": version} if version is not None else {})}
        done = await self.profiles.update_one(
            query,
            # Not []: a unique multikey index counts every empty array as the same key.
            {"$set": {"merged_into": target, "keys": [f"merged:{profile_id}"], "merged_at": now},
             "$unset": {**{name: "" for name in POINTER_DROPS}, "esp": ""}, "$inc": {"version": 1}},
            session=session,
        )
        return done.matched_count == 1

    async def erase(self, plan: ErasurePlan, targets: tuple[str, ...], receipt: dict[str, Any]) -> bool:
        """Make ``plan`` true in one transaction: the tombstone, pointers of the person's other profiles
        and of every profile absorbed into them (emptied), and the erasure's receipt.

        Each target's send lease is kept as it is: a send still in flight (a bulk job carrying the
        person) keeps it, and the erasure's own sync waits for it before it deletes anything.
        Returns False on a lost race.
        """
        now = datetime.now(timezone.utc)
        tomb = plan.tombstone
        body = {**tomb.model_dump(mode="python", exclude={"id"}), "keys": plan.keys}
        state: dict[str, Any] = {}
        for esp in targets:
            prefix = f"esp.{esp}"
            state.update({f"{prefix}.member": None, f"{prefix}.member_hash": None, f"{prefix}.pending": bool(plan.addresses),
                          f"{prefix}.urgent": bool(plan.addresses), f"{prefix}.dirty_at": now})
        unset = {**{name: "" for name in PERSONAL if name not in body},
                 **{f"esp.{esp}.{name}": "" for esp in targets for name in ("sent_hash", "failed_hash", "retire", "unsubscribe")}}
        update: dict[str, Any] = {"$set": {**body, **state}, "$unset": unset, "$inc": {"version": 1}}
        if plan.addresses:
            update["$addToSet"] = {f"esp.{esp}.erase": {"$each": list(plan.addresses)} for esp in targets}
        receipts = self.profiles.database[ERASURES]
        async with self.client.start_session() as session:
            try:
                async with await session.start_transaction():
                    # Pointers first: they give up the keys the tombstone takes over (the index is unique).
                    for pointer_id, version in plan.pointers:
                        if not await self._point(pointer_id, tomb.id, now, session, version=version):
                            raise _Abort
                    for absorbed_id in plan.absorbed:
                        await self._point(absorbed_id, tomb.id, now, session)
                    if plan.version is None:
                        await self.profiles.insert_one({"_id": tomb.id, **body, "version": 1,
                                                        "esp": {esp: {"member": None, "member_hash": None, "pending": bool(plan.addresses),
                                                                      "urgent": bool(plan.addresses), "dirty_at": now,
                                                                      "erase": list(plan.addresses)} for esp in targets}},
                                                       session=session)
                    else:
                        done = await self.profiles.update_one({"_id": tomb.id, "version": plan.version}, update, session=session)
                        if done.matched_count != 1:
                            raise _Abort
                    await receipts.update_one({"_id": plan.request_id}, receipt, upsert=True, session=session)
            except (_Abort, DuplicateKeyError):
                return False
        return True

    async def forget(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        """The ESP deleted these contacts: they wait for their read-back now, no longer for deletion."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(_owned(profile_id, esp, token),
                                       {"$pullAll": {f"{prefix}.erase": emails}, "$addToSet": {f"{prefix}.verify": {"$each": emails}}})

    async def done(self, profile_id: str, esp: str, token: str, name: str, emails: list[str]) -> None:
        """Addresses of list ``name`` (verify, unsubscribe, retire) whose work at the ESP is done."""
        await self.profiles.update_one(_owned(profile_id, esp, token), {"$pullAll": {f"esp.{esp}.{name}": emails}})

    async def redo(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        """Contacts the ESP still holds after their deletion: delete them again."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(_owned(profile_id, esp, token),
                                       {"$pullAll": {f"{prefix}.verify": emails}, "$addToSet": {f"{prefix}.erase": {"$each": emails}},
                                        "$unset": {f"{prefix}.verify_checks": ""}})

    async def checked(self, profile_id: str, esp: str, token: str) -> int:
        """Count one more read-back that still found an erased contact; returns how many so far."""
        doc = await self.profiles.find_one_and_update(_owned(profile_id, esp, token), {"$inc": {f"esp.{esp}.verify_checks": 1}},
                                                      projection={f"esp.{esp}.verify_checks": 1}, return_document=ReturnDocument.AFTER)
        return int(((doc or {}).get("esp", {}).get(esp) or {}).get("verify_checks", 0))

    async def save(self, profile: Profile, version: int | None, members: Members, urgent: bool = False,
                   work: Work | None = None) -> bool:
        """Write ``profile`` if nobody else has since ``version`` (None: it must be new).

        Also records, per ESP target, the member it should become (``members``: target ->
        (member, hash)), and marks it pending where that differs from what was last sent.
        ``work``: per target, addresses to add to its address lists (unsubscribe, retire).
        ``urgent``: a consent change, which the sweeper sends ahead of any backlog. Returns False
        on a lost race.
        """
        now = datetime.now(timezone.utc)
        work = work or {}
        body = profile.model_dump(mode="python", exclude={"id"})
        body["keys"] = self.index(profile)
        if version is None:
            doc = {
                "_id": profile.id,
                **body,
                "version": 1,
                "esp": {esp: {"member": member, "member_hash": member_hash, "dirty_at": now,
                              "pending": member is not None or any(work.get(esp, {}).values()),
                              "urgent": urgent and (member is not None or any(work.get(esp, {}).values())),
                              **{name: sorted(emails) for name, emails in work.get(esp, {}).items() if emails}}
                        for esp, (member, member_hash) in members.items()},
            }
            try:
                await self.profiles.insert_one(doc)
            except DuplicateKeyError:
                return False
            return True
        state: dict[str, Any] = {}
        for esp, (member, member_hash) in members.items():
            prefix = f"esp.{esp}"
            state.update({
                f"{prefix}.member": _literal(member),
                f"{prefix}.member_hash": member_hash,
                f"{prefix}.dirty_at": {"$cond": [{"$eq": [f"${prefix}.member_hash", member_hash]}, f"${prefix}.dirty_at", now]},
                **_with_work(prefix, work.get(esp, {})),
                **({f"{prefix}.urgent": True} if urgent else {}),
            })
        settle = [_settle(f"esp.{esp}") for esp in members]
        pipeline = [
            {"$set": {**{k: _literal(v) for k, v in body.items()}, "version": {"$add": ["$version", 1]}, **state}},
            {"$set": {k: v for stages in settle for k, v in stages[0]["$set"].items()}},
            {"$set": {k: v for stages in settle for k, v in stages[1]["$set"].items()}},
        ]
        try:
            result = await self.profiles.update_one({"_id": profile.id, "version": version}, pipeline)
        except DuplicateKeyError:
            # Another worker just gave one of these identifiers to another profile: re-read and merge.
            return False
        return result.matched_count == 1

    async def claim_send(self, profile_id: str, esp: str, lease: timedelta) -> tuple[dict[str, Any], str] | None:
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
            doc = await self.profiles.find_one_and_update(
                {"_id": profile_id, "merged_into": {"$exists": False},
                 "$or": [{field: {"$exists": False}}, {field: None}, {field: {"$lte": now}}]},
                {"$set": {field: now + lease, f"{prefix}.sending_token": token}},
                projection={f"esp.{esp}": 1},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc.get("esp", {}).get(esp, {}), token
            held = await self.profiles.find_one({"_id": profile_id, "merged_into": {"$exists": False}}, {field: 1})
            if held is None:
                return None
            until = held.get("esp", {}).get(esp, {}).get("sending_until")
            if until is not None and until > now:
                # Sends end long before their lease: look again soon rather than at the lease's end.
                raise SyncBusy("another send of this profile is in flight", retry_after=min(1.0, (until - now).total_seconds()))
            # Released between the two reads: claim again.
        raise SyncBusy("the send lease of this profile keeps changing hands", retry_after=0.5)

    async def claim_sends(self, profile_ids: list[str], esp: str, lease: timedelta) -> tuple[dict[str, dict[str, Any]], str]:
        """:meth:`claim_send` for many profiles in two round trips, under one token; profiles whose
        lease is held are left out. Returns their sync states and the token."""
        prefix, now, token = f"esp.{esp}", datetime.now(timezone.utc), uuid.uuid4().hex
        free = {"$or": [{f"{prefix}.sending_until": {"$exists": False}}, {f"{prefix}.sending_until": None},
                        {f"{prefix}.sending_until": {"$lte": now}}]}
        await self.profiles.update_many(
            {"_id": {"$in": profile_ids}, "merged_into": {"$exists": False}, **free},
            {"$set": {f"{prefix}.sending_until": now + lease, f"{prefix}.sending_token": token}},
        )
        cursor = self.profiles.find({"_id": {"$in": profile_ids}, f"{prefix}.sending_token": token}, {f"esp.{esp}": 1})
        return {doc["_id"]: doc["esp"][esp] async for doc in cursor}, token

    async def note_job(self, esp: str, token: str, job_id: str, profile_ids: list[str]) -> None:
        """An ESP accepted a bulk job carrying these profiles: until it is confirmed finished, an erasure
        of any of them waits for it (it could otherwise land after the deletion)."""
        await self.profiles.update_many({"_id": {"$in": profile_ids}, f"esp.{esp}.sending_token": token},
                                        {"$addToSet": {f"esp.{esp}.jobs": job_id}})

    async def job_finished(self, profile_id: str, esp: str, token: str, job_id: str) -> None:
        await self.profiles.update_one(_owned(profile_id, esp, token), {"$pull": {f"esp.{esp}.jobs": job_id}})

    async def settle_many(self, esp: str, token: str, sent: list[tuple[str, str]], failed: list[tuple[str, str, str]],
                          released: list[str], jobs: list[str] | None = None) -> None:
        """Record a batch's outcome per profile, in one round trip; only where ``token`` still holds the lease.

        ``jobs``: the batch's bulk jobs, all confirmed finished.
        """
        prefix, now = f"esp.{esp}", datetime.now(timezone.utc)
        finished = [{"$set": {f"{prefix}.jobs": {"$setDifference": [{"$ifNull": [f"${prefix}.jobs", []]}, _literal(jobs)]}}}] if jobs else []
        ops = [UpdateOne(_owned(pid, esp, token),
                         [{"$set": {f"{prefix}.sent_hash": h, f"{prefix}.sent_at": now, f"{prefix}.sending_until": None}},
                          {"$unset": f"{prefix}.swept_at"}, *finished, *_settle(prefix)]) for pid, h in sent]
        ops += [UpdateOne(_owned(pid, esp, token), [{"$set": {f"{prefix}.failed_hash": h, f"{prefix}.failed_code": code,
                                                              f"{prefix}.sending_until": None}}, *finished])
                for pid, h, code in failed]
        ops += [UpdateOne(_owned(pid, esp, token), [{"$set": {f"{prefix}.sending_until": None}}, *finished, *_settle(prefix)])
                for pid in released]
        if ops:
            await self.profiles.bulk_write(ops, ordered=False)

    async def park(self, profile_ids: list[str], esp: str) -> None:
        """Leave pending profiles to the sweeper's next run (their ESP is down): they wait in MongoDB
        rather than cycling through the queue. Send leases are not touched."""
        await self.profiles.update_many({"_id": {"$in": profile_ids}}, {"$unset": {f"esp.{esp}.swept_at": ""}})

    async def release_send(self, profile_id: str, esp: str, token: str) -> None:
        """End the send lease and settle ``pending`` from what is stored (a no-op send leaves nothing pending)."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(_owned(profile_id, esp, token), [{"$set": {f"{prefix}.sending_until": None}}, *_settle(prefix)])

    async def mark_sent(self, profile_id: str, esp: str, token: str, sent_hash: str, jobs: list[str] | None = None) -> bool:
        """Record what the ESP now holds; still pending if the profile moved on meanwhile.

        ``jobs``: the send's bulk jobs, confirmed finished. Returns False when the lease was lost (it
        ran out and another send took it): that send records its own outcome, this one must not
        overwrite it.
        """
        prefix = f"esp.{esp}"
        finished = [{"$set": {f"{prefix}.jobs": {"$setDifference": [{"$ifNull": [f"${prefix}.jobs", []]}, _literal(jobs)]}}}] if jobs else []
        done = await self.profiles.update_one(
            _owned(profile_id, esp, token),
            [
                {"$set": {f"{prefix}.sent_hash": sent_hash, f"{prefix}.sent_at": datetime.now(timezone.utc),
                          f"{prefix}.sending_until": None}},
                {"$unset": f"{prefix}.swept_at"},  # sent: the next change is claimable at once
                *finished,
                *_settle(prefix),
            ],
        )
        return done.matched_count == 1

    async def mark_failed(self, profile_id: str, esp: str, token: str, failed_hash: str, code: str) -> None:
        """Remember a member the ESP refused, so the sweeper does not resend it until it changes."""
        await self.profiles.update_one(
            _owned(profile_id, esp, token),
            {"$set": {f"esp.{esp}.failed_hash": failed_hash, f"esp.{esp}.failed_code": code, f"esp.{esp}.sending_until": None}},
        )

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
        await self.profiles.update_many({"_id": {"$in": profile_ids}},
                                        {"$unset": {f"{prefix}.sent_hash": ""}, "$set": {f"{prefix}.pending": True,
                                                                                       f"{prefix}.dirty_at": datetime(1970, 1, 1, tzinfo=timezone.utc)}})

    async def count_pending(self, esp: str, cap: int) -> int:
        """How many profiles wait for ``esp`` (refused ones aside), counted up to ``cap``."""
        return await self.profiles.count_documents(_sendable(f"esp.{esp}"), limit=cap)

    async def pending_ids(self, esp: str, limit: int) -> list[str]:
        """Profiles waiting for ``esp`` (refused ones aside), oldest change first; nothing is claimed."""
        prefix = f"esp.{esp}"
        cursor = self.profiles.find(_sendable(prefix), {"_id": 1}).sort(f"{prefix}.dirty_at", ASCENDING).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def claim_pending(self, esp: str, older_than: timedelta, lease: timedelta, limit: int = 500,
                            urgent: bool = False) -> list[str]:
        """Pending profiles, oldest change first, not refused as they are and not swept within ``lease``
        (only those marked urgent, with ``urgent``).

        Claiming stamps ``swept_at`` so a backlog or an ESP outage is not re-enqueued every sweep.
        """
        now = datetime.now(timezone.utc)
        prefix = f"esp.{esp}"
        unswept = {"$or": [{f"{prefix}.swept_at": {"$exists": False}}, {f"{prefix}.swept_at": {"$lte": now - lease}}]}
        query = {
            **_sendable(prefix),
            f"{prefix}.dirty_at": {"$lte": now - older_than},
            **unswept,
            **({f"{prefix}.urgent": True} if urgent else {}),
        }
        cursor = self.profiles.find(query, {"_id": 1}).sort(f"{prefix}.dirty_at", ASCENDING).limit(limit)
        ids = [doc["_id"] async for doc in cursor]
        if ids:
            await self.profiles.update_many({"_id": {"$in": ids}, **unswept}, {"$set": {f"{prefix}.swept_at": now}})
        return ids

    @staticmethod
    def _split(doc: dict[str, Any] | None) -> tuple[Profile, dict[str, Any]] | None:
        if doc is None or "merged_into" in doc:
            return None
        meta = {"version": doc.pop("version"), "esp": doc.pop("esp", {})}
        doc.pop("keys", None)
        doc["id"] = doc.pop("_id")
        try:
            return Profile.model_validate(doc), meta
        except ValidationError as exc:
            locs = sorted({".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)})
            raise StoredProfileInvalid(f"profile {doc['id']}: {', '.join(locs)}") from None


class _Abort(Exception):
    """A lost race inside a transaction: abort it and let the caller retry."""


class Checkpoints:
    """Progress markers of pollers, one document per key."""

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.collection = client[database]["checkpoints"]

    async def get(self, key: str) -> dict[str, Any] | None:
        doc = await self.collection.find_one({"_id": key})
        return None if doc is None else {k: v for k, v in doc.items() if k not in {"_id", "updated"}}

    async def put(self, key: str, state: dict[str, Any]) -> None:
        await self.collection.replace_one({"_id": key}, {**state, "updated": datetime.now(timezone.utc)}, upsert=True)


class Quarantine:
    """Deliveries that failed validation, kept whole with every error until re-driven.

    One document per delivery (``source:delivery_id``), so quarantining the same
    delivery again updates it instead of adding a copy (and counts one more attempt). A
    delivery BSON cannot encode (lone surrogates, integers beyond 64 bits: often the very reason
    it was refused) is kept as ASCII JSON text in ``delivery_json``, with a readable summary in
    ``delivery``; :meth:`delivery` gives back the original either way.
    """

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.collection = client[database]["quarantine"]

    @staticmethod
    def key(delivery: dict[str, Any]) -> str:
        return Quarantine._valid_text(f"{delivery.get('source')}:{delivery.get('delivery_id')}")

    @staticmethod
    def delivery(doc: dict[str, Any]) -> dict[str, Any]:
        """The delivery exactly as it was refused: what a redrive must publish."""
        encoded = doc.get("delivery_json")
        return json.loads(encoded) if encoded is not None else doc["delivery"]

    async def put(self, delivery: dict[str, Any], errors: list[dict[str, str]], schema_version: str,
                  keys: list[str] | None = None) -> str:
        """``keys``: the index keys (keyed hashes) of the identifiers the delivery names, so an erasure
        of that person finds it."""
        now = datetime.now(timezone.utc)
        key = self.key(delivery)
        errors = [{name: self._valid_text(str(value)) for name, value in error.items()} for error in errors]
        reasons = sorted({f"{e['event']}:{e['loc']}:{e['type']}" for e in errors})
        kept = self._storable(delivery)
        update: dict[str, Any] = {
            "$set": {**kept, "errors": errors, "reasons": reasons, "schema_version": self._valid_text(schema_version),
                     "status": "quarantined", "last_failed_at": now, "keys": sorted(keys or [])},
            "$setOnInsert": {"first_failed_at": now}, "$inc": {"attempts": 1},
        }
        if "delivery_json" not in kept:
            update["$unset"] = {"delivery_json": ""}
        await self.collection.update_one({"_id": key}, update, upsert=True)
        return key

    @staticmethod
    def _valid_text(text: str) -> str:
        """Lone surrogates (which BSON's UTF-8 cannot carry) as ``\\udXXX`` escapes; any other text unchanged."""
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    @staticmethod
    def _storable(delivery: dict[str, Any]) -> dict[str, Any]:
        """The fields that keep ``delivery`` in its document: itself when BSON can encode it, else its exact
        JSON text (ASCII: surrogates escaped, big integers as digits) and a summary to list it by."""
        try:
            bson.encode({"delivery": delivery})
        except (UnicodeEncodeError, OverflowError, InvalidDocument):
            summary = {name: Quarantine._valid_text(str(delivery[name]))
                       for name in ("source", "topic", "delivery_id", "received_at") if name in delivery}
            return {"delivery": {**summary, "kept_as": "delivery_json"}, "delivery_json": json.dumps(delivery, ensure_ascii=True)}
        return {"delivery": delivery}

    @staticmethod
    def _query(status: str | None, reason: str | None, after: str | None = None) -> dict[str, Any]:
        query: dict[str, Any] = {}
        if status:
            query["status"] = status
        if reason:
            query["reasons"] = reason
        if after is not None:
            query["_id"] = {"$gt": after}
        return query

    async def list(self, status: str | None = "quarantined", reason: str | None = None, limit: int = 100,
                   after: str | None = None) -> list[dict[str, Any]]:
        """One page in ``_id`` order; pass the last ``_id`` shown as ``after`` for the next page."""
        cursor = self.collection.find(self._query(status, reason, after)).sort("_id", ASCENDING).limit(limit)
        return [doc async for doc in cursor]

    async def count(self, status: str | None = "quarantined", reason: str | None = None, after: str | None = None) -> int:
        return await self.collection.count_documents(self._query(status, reason, after))

    async def get(self, key: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": key})

    async def mark_redriven(self, key: str, attempts: int) -> bool:
        """Mark a delivery redriven only if it is exactly as read before it was published.

        A worker that quarantined it again meanwhile has raised ``attempts``: then it stays
        quarantined (and listed) and this returns False.
        """
        done = await self.collection.update_one({"_id": key, "status": "quarantined", "attempts": attempts},
                                                {"$set": {"status": "redriven", "redriven_at": datetime.now(timezone.utc)}})
        return done.matched_count == 1

    async def redrive(self, publish: Callable[[dict[str, Any]], Awaitable[None]], keys: list[str] | None = None,
                      page_size: int = 100) -> Redrive:
        """Publish the named deliveries (None: every quarantined one, page by page in ``_id`` order), each then marked.

        Publish first, then the guarded mark: a crash in between leaves the delivery quarantined,
        and redriving it again is a harmless duplicate (the pipeline is idempotent).
        """
        report = Redrive()
        if keys is not None:
            for key in keys:
                await self._redrive_one(await self.get(key), publish, report)
            return report
        after = None
        while page := await self.list(limit=page_size, after=after):
            for doc in page:
                await self._redrive_one(doc, publish, report)
            after = page[-1]["_id"]
        return report

    async def _redrive_one(self, doc: dict[str, Any] | None, publish: Callable[[dict[str, Any]], Awaitable[None]],
                           report: Redrive) -> None:
        if doc is None or doc["status"] != "quarantined":
            report.skipped += 1
            return
        try:
            await publish(self.delivery(doc))
        except BrokerUnavailable:
            report.failed += 1
            return
        if await self.mark_redriven(doc["_id"], doc["attempts"]):
            report.redriven.append(doc["_id"])
        else:
            report.requarantined += 1

    async def forget(self, keys: list[str]) -> int:
        """Delete every delivery that names one of ``keys`` (an erased person's); returns how many."""
        return (await self.collection.delete_many({"keys": {"$in": keys}})).deleted_count

    async def counts(self) -> dict[str, int]:
        """Quarantined deliveries per reason."""
        pipeline = [{"$match": {"status": "quarantined"}}, {"$unwind": "$reasons"}, {"$group": {"_id": "$reasons", "n": {"$sum": 1}}}]
        return {doc["_id"]: doc["n"] async for doc in await self.collection.aggregate(pipeline)}


@dataclass
class Redrive:
    """The outcome of a redrive; every delivery considered lands in exactly one bucket.

    redriven: published and marked. requarantined: published, but quarantined again before
    the mark (still listed). skipped: not quarantined when read (unknown, or redriven already).
    failed: the broker did not confirm (still quarantined, redrive again).
    """

    redriven: list[str] = field(default_factory=list)
    requarantined: int = 0
    skipped: int = 0
    failed: int = 0

    def summary(self) -> dict[str, Any]:
        return {"redriven": self.redriven, "count": len(self.redriven), "requarantined": self.requarantined,
                "skipped": self.skipped, "failed": self.failed}
