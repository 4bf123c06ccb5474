"""The MongoDB profile store, through PyMongo's asyncio API.

Common path per event: one point read by ``_id`` (or by identity key, indexed)
and one conditional write guarded by ``version`` (optimistic concurrency).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from schemas.profile import Profile

PROFILES = "profiles"


def identity_keys(profile: Profile) -> list[str]:
    """Every identifier that finds this profile, as ``kind:value`` strings (one multikey index)."""
    keys = [f"{source}:{cid}" for source, ids in profile.identifiers.items() for cid in ids]
    return sorted(keys)


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

    async def ensure_indexes(self) -> None:
        await self.profiles.create_index([("keys", ASCENDING)], name="identity_keys")
        await self.profiles.create_index(
            [("esp.mailchimp.pending", ASCENDING), ("esp.mailchimp.dirty_at", ASCENDING)], name="mailchimp_pending"
        )

    async def load(self, profile_id: str) -> tuple[Profile, dict[str, Any]] | None:
        doc = await self.profiles.find_one({"_id": profile_id})
        return self._split(doc)

    async def find_by_key(self, key: str) -> tuple[Profile, dict[str, Any]] | None:
        doc = await self.profiles.find_one({"keys": key})
        return self._split(doc)

    async def save(self, profile: Profile, version: int | None, esp: str, member: dict[str, Any], member_hash: str) -> bool:
        """Write ``profile`` if nobody else has since ``version`` (None: it must be new).

        Also records the ESP member it should become, and marks it pending when
        that differs from what was last sent. Returns False on a lost race.
        """
        now = datetime.now(timezone.utc)
        body = profile.model_dump(mode="python", exclude={"id"})
        body["keys"] = identity_keys(profile)
        if version is None:
            doc = {
                "_id": profile.id,
                **body,
                "version": 1,
                "esp": {esp: {"member": member, "member_hash": member_hash, "pending": True, "dirty_at": now}},
            }
            try:
                await self.profiles.insert_one(doc)
            except DuplicateKeyError:
                return False
            return True
        prefix = f"esp.{esp}"
        pipeline = [
            {
                "$set": {
                    **{k: _literal(v) for k, v in body.items()},
                    "version": {"$add": ["$version", 1]},
                    f"{prefix}.member": _literal(member),
                    f"{prefix}.member_hash": member_hash,
                    f"{prefix}.dirty_at": {
                        "$cond": [{"$eq": [f"${prefix}.member_hash", member_hash]}, f"${prefix}.dirty_at", now]
                    },
                }
            },
            {"$set": {f"{prefix}.pending": {"$ne": [f"${prefix}.member_hash", f"${prefix}.sent_hash"]}}},
        ]
        result = await self.profiles.update_one({"_id": profile.id, "version": version}, pipeline)
        return result.matched_count == 1

    async def sync_state(self, profile_id: str, esp: str) -> dict[str, Any] | None:
        doc = await self.profiles.find_one({"_id": profile_id}, {f"esp.{esp}": 1, "email": 1})
        if doc is None:
            return None
        return {"email": doc.get("email"), **doc.get("esp", {}).get(esp, {})}

    async def mark_sent(self, profile_id: str, esp: str, sent_hash: str) -> None:
        """Record what the ESP now holds; still pending if the profile moved on meanwhile."""
        prefix = f"esp.{esp}"
        await self.profiles.update_one(
            {"_id": profile_id},
            [
                {"$set": {f"{prefix}.sent_hash": sent_hash, f"{prefix}.sent_at": datetime.now(timezone.utc)}},
                {"$set": {f"{prefix}.pending": {"$ne": [f"${prefix}.member_hash", sent_hash]}}},
            ],
        )

    async def mark_failed(self, profile_id: str, esp: str, failed_hash: str, code: str) -> None:
        """Remember a member the ESP refused, so the sweeper does not resend it until it changes."""
        await self.profiles.update_one(
            {"_id": profile_id}, {"$set": {f"esp.{esp}.failed_hash": failed_hash, f"esp.{esp}.failed_code": code}}
        )

    async def pending(self, esp: str, older_than: timedelta, limit: int = 500) -> list[str]:
        """Profiles still pending for ``esp`` whose change is older than ``older_than``."""
        cutoff = datetime.now(timezone.utc) - older_than
        cursor = self.profiles.find(
            {
                f"esp.{esp}.pending": True,
                f"esp.{esp}.dirty_at": {"$lte": cutoff},
                "$expr": {"$ne": [f"$esp.{esp}.member_hash", f"$esp.{esp}.failed_hash"]},
            },
            {"_id": 1},
        ).limit(limit)
        return [doc["_id"] async for doc in cursor]

    @staticmethod
    def _split(doc: dict[str, Any] | None) -> tuple[Profile, dict[str, Any]] | None:
        if doc is None:
            return None
        meta = {"version": doc.pop("version"), "esp": doc.pop("esp", {})}
        doc.pop("keys", None)
        doc["id"] = doc.pop("_id")
        return Profile.model_validate(doc), meta
