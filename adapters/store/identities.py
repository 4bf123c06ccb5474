"""Identity claims: which profile each identity key belongs to, in a collection keyed by the key.

``{_id: <index key>, profile: <profile id>, at: <when claimed>}``. Keyed by identity key, so a sharded
cluster enforces it (by hashed ``_id``) where a unique index over profiles' keys would have to start
with the profiles' shard key. A write that gives a profile a key claims it first; a claim whose write
never landed (its process died in between) is an orphan, taken over by the next claimant once it is
older than any write could still be in flight and its profile does not hold the key.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

IDENTITIES = "identities"


class ClaimLost(Exception):
    """Inside a transaction, a key another profile holds: abort, re-read, and the merge finds its owner."""


def only_duplicates(exc: BulkWriteError) -> bool:
    """Whether every error of a bulk write is a duplicate key (someone else holds it), and there is one."""
    errors = exc.details.get("writeErrors", [])
    return bool(errors) and all(e.get("code") == 11000 for e in errors)


class Identities:
    """Parameters:
      collection: the claims.
      profiles: the profiles, to tell an orphan claim (its profile lacks the key) from a held one.
      orphan_after: how old a claim must be before it can be an orphan.
    """

    def __init__(self, collection: AsyncCollection, profiles: AsyncCollection, orphan_after: timedelta) -> None:
        self.collection = collection
        self._profiles = profiles
        self._orphan_after = orphan_after

    async def any(self) -> bool:
        return await self.collection.find_one({}, {"_id": 1}) is not None

    async def backfill(self, profile_id: str, keys: list[str]) -> None:
        """Claim ``keys`` for a profile that holds them already (an upgrade; idempotent)."""
        if keys:
            await self.collection.bulk_write([UpdateOne({"_id": k}, {"$set": {"profile": profile_id}, "$setOnInsert": {"at": None}},
                                                        upsert=True) for k in keys], ordered=False)

    async def claim_in(self, session: AsyncClientSession, owners: dict[str, str], takes_from: tuple[str, ...] = ()) -> None:
        """Claim each key of ``owners`` (key -> profile id) inside ``session``'s transaction: a key nobody
        holds, or one its owner already holds or a profile in ``takes_from`` held (absorbed into it, erased
        with it). Raises :class:`ClaimLost` when another profile holds one. One round trip."""
        if not owners:
            return
        now = datetime.now(timezone.utc)
        try:
            await self.collection.bulk_write(
                [UpdateOne({"_id": k, "profile": {"$in": [owner, *takes_from]}}, {"$set": {"profile": owner, "at": now}}, upsert=True)
                 for k, owner in owners.items()], ordered=False, session=session)
        except BulkWriteError as exc:
            if only_duplicates(exc):
                raise ClaimLost from None
            raise

    async def claim(self, owners: dict[str, str]) -> set[str]:
        """Claim each key of ``owners`` (key -> profile id) ahead of the write that gives it the key: a
        key nobody holds, one its owner holds, or an orphan's. Returns the profiles that could not claim
        all of theirs (their writes lost a race); what those just claimed is given back. One round trip,
        two or three more when a key is held."""
        if not owners:
            return set()
        now = datetime.now(timezone.utc)
        items = list(owners.items())
        try:
            await self.collection.bulk_write([UpdateOne({"_id": k, "profile": owner}, {"$set": {"at": now}}, upsert=True) for k, owner in items],
                                             ordered=False)
            return set()
        except BulkWriteError as exc:
            if not only_duplicates(exc):
                raise
            held = {items[e["index"]][0] for e in exc.details["writeErrors"]}
            upserted = [items[u["index"]] for u in exc.details.get("upserted", [])]
        claims = {d["_id"]: d async for d in self.collection.find({"_id": {"$in": sorted(held)}})}
        lost = {owners[key] for key in held if not await self._take_orphan(key, owners[key], now, claims.get(key))}
        given_back = [key for key, owner in upserted if owner in lost]
        if given_back:
            await self.collection.delete_many({"_id": {"$in": given_back}, "at": now})
        return lost

    async def _take_orphan(self, key: str, owner: str, now: datetime, claim: dict[str, Any] | None) -> bool:
        """Take ``key`` for ``owner`` if its claim is an orphan's; whether it is now ``owner``'s."""
        if claim is None or (claim.get("at") is not None and claim["at"] >= now - self._orphan_after):
            return False
        if await self._profiles.find_one({"_id": claim["profile"], "keys": key}, {"_id": 1}) is not None:
            return False  # its profile holds it: no orphan
        done = await self.collection.update_one({"_id": key, "profile": claim["profile"], "at": claim.get("at")},
                                                {"$set": {"profile": owner, "at": now}})
        return done.modified_count == 1
