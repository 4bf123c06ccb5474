"""The MongoDB profile store, through PyMongo's asyncio API.

Common path per event: one point read by ``_id`` (or by identity key, indexed)
and one conditional write guarded by ``version`` (optimistic concurrency).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import bson
from bson.errors import InvalidDocument
from pydantic import ValidationError
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError

from schemas.errors import StoredProfileInvalid, SyncBusy
from schemas.profile import Profile, profile_keys

PROFILES = "profiles"
Members = dict[str, tuple[dict[str, Any] | None, str | None]]


def _pending(prefix: str) -> dict[str, Any]:
    """Pending: the ESP does not hold exactly the profile's member yet, or contacts wait to be archived or erased."""
    member_hash = f"${prefix}.member_hash"
    differs = {"$and": [{"$ne": [{"$ifNull": [member_hash, None]}, None]},
                        {"$ne": [member_hash, {"$ifNull": [f"${prefix}.sent_hash", None]}]}]}
    waiting = [{"$gt": [{"$size": {"$ifNull": [f"${prefix}.{name}", []]}}, 0]} for name in ("retire", "erase")]
    return {"$or": [differs, *waiting]}


def _settle(prefix: str) -> list[dict[str, Any]]:
    """Pipeline stages that recompute ``pending``; an ``urgent`` mark lasts only while something is pending."""
    return [{"$set": {f"{prefix}.pending": _pending(prefix)}},
            {"$set": {f"{prefix}.urgent": {"$and": [{"$ifNull": [f"${prefix}.urgent", False]}, f"${prefix}.pending"]}}}]


def _literal(value: Any) -> dict[str, Any]:
    """Values inside pipeline updates must not be read as expressions (a trait may start with ``$``)."""
    return {"$literal": value}


class ProfileStore:
    """Profiles plus their per-ESP sync state.

    Parameters:
      client: an ``AsyncMongoClient`` created with ``tz_aware=True``.
      database: database name.
    """

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.client = client
        self.profiles = client[database][PROFILES]

    @classmethod
    def connect(cls, uri: str, database: str) -> ProfileStore:
        return cls(AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5_000), database)

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
        """Every profile owning one of ``keys``, ordered by the strongest key each owns. One round trip."""
        docs = [doc async for doc in self.profiles.find({"keys": {"$in": keys}}).limit(len(keys))]
        rank = {key: i for i, key in enumerate(keys)}
        docs.sort(key=lambda d: (min(rank[k] for k in d["keys"] if k in rank), d["_id"]))
        return [split for doc in docs if (split := self._split(doc)) is not None]

    async def absorb(self, survivor: Profile, version: int, absorbed: list[tuple[str, int]], members: Members,
                     retire: dict[str, list[str]], sent: dict[str, str | None]) -> bool:
        """Merge profiles in one transaction: the absorbed become pointers to ``survivor``.

        Every write is version-guarded; any lost race aborts the whole merge (returns False).
        Parameters:
          members: per ESP target, the member the survivor should become and its hash.
          retire: per ESP target, contacts of absorbed profiles to retire, so none is left orphaned.
          sent: per ESP target, the hash the survivor's contact was last sent.
        """
        body = survivor.model_dump(mode="python", exclude={"id"})
        body["keys"] = profile_keys(survivor)
        now = datetime.now(timezone.utc)
        state: dict[str, Any] = {}
        for esp, (member, member_hash) in members.items():
            prefix = f"esp.{esp}"
            state.update({f"{prefix}.member": member, f"{prefix}.member_hash": member_hash, f"{prefix}.dirty_at": now,
                          f"{prefix}.pending": (member is not None and member_hash != sent.get(esp)) or bool(retire.get(esp))})
        async with self.client.start_session() as session:
            try:
                async with await session.start_transaction():
                    for absorbed_id, absorbed_version in absorbed:
                        done = await self.profiles.update_one(
                            {"_id": absorbed_id, "version": absorbed_version},
                            # Not []: a unique multikey index counts every empty array as the same key.
                            {"$set": {"merged_into": survivor.id, "keys": [f"merged:{absorbed_id}"], "merged_at": now,
                                      **{f"esp.{esp}.pending": False for esp in members}},
                             "$inc": {"version": 1}},
                            session=session,
                        )
                        if done.matched_count != 1:
                            raise _Abort
                    update: dict[str, Any] = {"$set": {**body, **state}, "$inc": {"version": 1}}
                    retiring = {f"esp.{esp}.retire": {"$each": emails} for esp, emails in retire.items() if emails}
                    if retiring:
                        update["$addToSet"] = retiring
                    done = await self.profiles.update_one({"_id": survivor.id, "version": version}, update, session=session)
                    if done.matched_count != 1:
                        raise _Abort
            except (_Abort, DuplicateKeyError):
                # A lost race, or a third profile took one of the identifiers meanwhile: re-read and retry.
                return False
        return True

    async def forget(self, profile_id: str, esp: str, emails: list[str]) -> None:
        """The ESP erased these contacts: drop the last trace of their addresses."""
        await self.profiles.update_one({"_id": profile_id}, {"$pullAll": {f"esp.{esp}.erase": emails}})

    async def retired(self, profile_id: str, esp: str, emails: list[str]) -> None:
        await self.profiles.update_one({"_id": profile_id}, {"$pullAll": {f"esp.{esp}.retire": emails}})

    async def save(self, profile: Profile, version: int | None, members: Members, erase: list[str] | None = None,
                   urgent: bool = False) -> bool:
        """Write ``profile`` if nobody else has since ``version`` (None: it must be new).

        Also records, per ESP target, the member it should become (``members``: target ->
        (member, hash)), and marks it pending where that differs from what was last sent.
        ``erase``: contacts every target must erase. ``urgent``: a consent change or an erasure,
        which the sweeper sends ahead of any backlog. Returns False on a lost race.
        """
        now = datetime.now(timezone.utc)
        body = profile.model_dump(mode="python", exclude={"id"})
        body["keys"] = profile_keys(profile)
        if version is None:
            doc = {
                "_id": profile.id,
                **body,
                "version": 1,
                "esp": {esp: {"member": member, "member_hash": member_hash, "pending": member is not None or bool(erase),
                              "urgent": urgent and (member is not None or bool(erase)), "dirty_at": now, **({"erase": erase} if erase else {})}
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
                f"{prefix}.erase": {"$setUnion": [{"$ifNull": [f"${prefix}.erase", []]}, _literal(erase or [])]},
                f"{prefix}.dirty_at": {"$cond": [{"$eq": [f"${prefix}.member_hash", member_hash]}, f"${prefix}.dirty_at", now]},
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

    async def claim_send(self, profile_id: str, esp: str, lease: timedelta) -> dict[str, Any] | None:
        """Take the profile's send lease for ``esp`` and return its sync state.

        One send per profile and ESP at a time, so an older member can never
        overtake a newer one. Returns None when the profile does not exist;
        raises SyncBusy while another send holds the lease.
        """
        field = f"esp.{esp}.sending_until"
        for _ in range(5):
            now = datetime.now(timezone.utc)
            doc = await self.profiles.find_one_and_update(
                {"_id": profile_id, "merged_into": {"$exists": False},
                 "$or": [{field: {"$exists": False}}, {field: None}, {field: {"$lte": now}}]},
                {"$set": {field: now + lease}},
                projection={f"esp.{esp}": 1},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc.get("esp", {}).get(esp, {})
            held = await self.profiles.find_one({"_id": profile_id, "merged_into": {"$exists": False}}, {field: 1})
            if held is None:
                return None
            until = held.get("esp", {}).get(esp, {}).get("sending_until")
            if until is not None and until > now:
                # Sends end long before their lease: look again soon rather than at the lease's end.
                raise SyncBusy("another send of this profile is in flight", retry_after=min(1.0, (until - now).total_seconds()))
            # Released between the two reads: claim again.
        raise SyncBusy("the send lease of this profile keeps changing hands", retry_after=0.5)

    async def claim_sends(self, profile_ids: list[str], esp: str, lease: timedelta) -> dict[str, dict[str, Any]]:
        """:meth:`claim_send` for many profiles in two round trips; profiles whose lease is held are left out."""
        prefix, now, token = f"esp.{esp}", datetime.now(timezone.utc), uuid.uuid4().hex
        free = {"$or": [{f"{prefix}.sending_until": {"$exists": False}}, {f"{prefix}.sending_until": None},
                        {f"{prefix}.sending_until": {"$lte": now}}]}
        await self.profiles.update_many(
            {"_id": {"$in": profile_ids}, "merged_into": {"$exists": False}, **free},
            {"$set": {f"{prefix}.sending_until": now + lease, f"{prefix}.sending_token": token}},
        )
        cursor = self.profiles.find({"_id": {"$in": profile_ids}, f"{prefix}.sending_token": token}, {f"esp.{esp}": 1})
        return {doc["_id"]: doc["esp"][esp] async for doc in cursor}

    async def settle_many(self, esp: str, sent: list[tuple[str, str]], failed: list[tuple[str, str, str]], released: list[str]) -> None:
        """Record a batch's outcome per profile, in one round trip."""
        prefix, now = f"esp.{esp}", datetime.now(timezone.utc)
        ops = [UpdateOne({"_id": pid}, [{"$set": {f"{prefix}.sent_hash": h, f"{prefix}.sent_at": now, f"{prefix}.sending_until": None}},
                                         {"$unset": f"{prefix}.swept_at"}, *_settle(prefix)]) for pid, h in sent]
        ops += [UpdateOne({"_id": pid}, {"$set": {f"{prefix}.failed_hash": h, f"{prefix}.failed_code": code, f"{prefix}.sending_until": None}})
                for pid, h, code in failed]
        ops += [UpdateOne({"_id": pid}, [{"$set": {f"{prefix}.sending_until": None}}, *_settle(prefix)]) for pid in released]
        if ops:
            await self.profiles.bulk_write(ops, ordered=False)

    async def park(self, profile_ids: list[str], esp: str) -> None:
        """Leave pending profiles to the sweeper's next run (their ESP is down): they wait in MongoDB
        rather than cycling through the queue. Send leases are not touched."""
        await self.profiles.update_many({"_id": {"$in": profile_ids}}, {"$unset": {f"esp.{esp}.swept_at": ""}})

    async def release_send(self, profile_id: str, esp: str) -> None:
        """End the send lease and settle ``pending`` from what is stored (a no-op send leaves nothing pending)."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(
            {"_id": profile_id},
            [{"$set": {f"{prefix}.sending_until": None}}, *_settle(prefix)],
        )

    async def mark_sent(self, profile_id: str, esp: str, sent_hash: str) -> None:
        """Record what the ESP now holds; still pending if the profile moved on meanwhile."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(
            {"_id": profile_id},
            [
                {"$set": {f"{prefix}.sent_hash": sent_hash, f"{prefix}.sent_at": datetime.now(timezone.utc),
                          f"{prefix}.sending_until": None}},
                {"$unset": f"{prefix}.swept_at"},  # sent: the next change is claimable at once
                *_settle(prefix),
            ],
        )

    async def mark_failed(self, profile_id: str, esp: str, failed_hash: str, code: str) -> None:
        """Remember a member the ESP refused, so the sweeper does not resend it until it changes."""
        await self.profiles.update_one(
            {"_id": profile_id},
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
        prefix = f"esp.{esp}"
        query = {f"{prefix}.pending": True, "merged_into": {"$exists": False},
                 "$expr": {"$ne": [f"${prefix}.member_hash", f"${prefix}.failed_hash"]}}
        return await self.profiles.count_documents(query, limit=cap)

    async def pending_ids(self, esp: str, limit: int) -> list[str]:
        """Profiles waiting for ``esp`` (refused ones aside), oldest change first; nothing is claimed."""
        prefix = f"esp.{esp}"
        query = {f"{prefix}.pending": True, "merged_into": {"$exists": False},
                 "$expr": {"$ne": [f"${prefix}.member_hash", f"${prefix}.failed_hash"]}}
        cursor = self.profiles.find(query, {"_id": 1}).sort(f"{prefix}.dirty_at", ASCENDING).limit(limit)
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
            f"{prefix}.pending": True,
            f"{prefix}.dirty_at": {"$lte": now - older_than},
            "merged_into": {"$exists": False},
            "$expr": {"$ne": [f"${prefix}.member_hash", f"${prefix}.failed_hash"]},
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
    delivery again updates it instead of adding a copy. A delivery BSON cannot encode
    (lone surrogates, integers beyond 64 bits: often the very reason it was refused) is
    kept as ASCII JSON text in ``delivery_json``, with a readable summary in ``delivery``;
    :meth:`delivery` gives back the original either way.
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

    async def put(self, delivery: dict[str, Any], errors: list[dict[str, str]], schema_version: str) -> str:
        now = datetime.now(timezone.utc)
        key = self.key(delivery)
        errors = [{name: self._valid_text(str(value)) for name, value in error.items()} for error in errors]
        reasons = sorted({f"{e['event']}:{e['loc']}:{e['type']}" for e in errors})
        kept = self._storable(delivery)
        update: dict[str, Any] = {
            "$set": {**kept, "errors": errors, "reasons": reasons, "schema_version": self._valid_text(schema_version),
                     "status": "quarantined", "last_failed_at": now},
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

    async def list(self, status: str | None = "quarantined", reason: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if status:
            query["status"] = status
        if reason:
            query["reasons"] = reason
        cursor = self.collection.find(query).sort("last_failed_at", ASCENDING).limit(limit)
        return [doc async for doc in cursor]

    async def get(self, key: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": key})

    async def mark(self, key: str, status: str) -> None:
        await self.collection.update_one({"_id": key}, {"$set": {"status": status, f"{status}_at": datetime.now(timezone.utc)}})

    async def counts(self) -> dict[str, int]:
        """Quarantined deliveries per reason."""
        pipeline = [{"$match": {"status": "quarantined"}}, {"$unwind": "$reasons"}, {"$group": {"_id": "$reasons", "n": {"$sum": 1}}}]
        return {doc["_id"]: doc["n"] async for doc in await self.collection.aggregate(pipeline)}
