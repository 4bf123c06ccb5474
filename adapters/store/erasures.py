"""Erasure receipts: one per request, what it asked for (hashed) and how far each ESP target got.

A receipt holds no personal data: the request's identifiers as keyed hashes, the ids of the
profiles it erased, and per ESP target a status — ``pending`` (addresses wait for deletion),
``deleted`` (the ESP accepted the deletion; its read-back is due), ``verified`` (a read-back found
nothing) or ``failed`` (the ESP refused; retried until it works, and shown until then) — with
when it got there and a reason free of personal data.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pymongo import DESCENDING, AsyncMongoClient

from adapters.store.bulk import each

ERASURES = "erasures"
OPEN = ("pending", "deleted", "failed")


def status(receipt: dict[str, Any]) -> str:
    """The request's state, derived from its targets': requested (not processed yet), pending, failed, completed."""
    targets = receipt.get("targets") or {}
    if not targets:
        return "requested"
    states = {t.get("status") for t in targets.values()}
    if "failed" in states:
        return "failed"
    return "completed" if states == {"verified"} else "pending"


def shown(receipt: dict[str, Any]) -> dict[str, Any]:
    """The receipt as operators see it (JSON-ready)."""
    def iso(value: Any) -> Any:
        return value.isoformat() if isinstance(value, datetime) else value

    return {
        "id": receipt["_id"],
        "status": status(receipt),
        "requested_at": iso(receipt.get("requested_at")),
        "requested_by": receipt.get("requested_by"),
        "identifiers": sorted(receipt.get("keys", [])),
        "profiles": sorted(receipt.get("profile_ids", [])),
        "late_events_dropped": receipt.get("late_events", 0),
        "payloads_removed": receipt.get("removed", {}),
        "targets": {name: {k: iso(v) for k, v in target.items()} for name, target in sorted((receipt.get("targets") or {}).items())},
    }


class ErasureReceipts:
    """Parameters:
      client: an ``AsyncMongoClient`` (``tz_aware=True``).
      database: database name.
    """

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.collection = client[database][ERASURES]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("profile_ids", name="erased_profiles")

    async def request(self, receipt_id: str, keys: list[str], requested_by: str) -> None:
        """An operator's request, recorded before it is queued so its status can be asked at once."""
        await self.collection.update_one(
            {"_id": receipt_id},
            {"$setOnInsert": {"requested_at": datetime.now(timezone.utc), "requested_by": requested_by},
             "$addToSet": {"keys": {"$each": keys}}},
            upsert=True,
        )

    async def get(self, receipt_id: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": receipt_id})

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return [doc async for doc in self.collection.find().sort("requested_at", DESCENDING).limit(limit)]

    async def mark(self, profile_id: str, target: str, state: str, reason: str | None = None) -> None:
        """Every open receipt of the erased profile ``profile_id`` reaches ``state`` at ``target``."""
        at = f"targets.{target}"
        update = {f"{at}.status": state, f"{at}.at": datetime.now(timezone.utc), f"{at}.reason": reason}
        where = {"profile_ids": profile_id, f"{at}.status": {"$in": list(OPEN)}}
        await each(self.collection, await self._ids(where), where, {"$set": update})

    async def removed(self, receipt_id: str, **counts: int) -> None:
        """Raw payloads of the person the erasure removed (dead letters, quarantined deliveries)."""
        await self.collection.update_one({"_id": receipt_id}, {"$inc": {f"removed.{kind}": n for kind, n in counts.items()}})

    async def late_event(self, profile_id: str) -> None:
        """An event for the erased person arrived and was dropped: counted on the person's receipts."""
        where = {"profile_ids": profile_id}
        await each(self.collection, await self._ids(where), where, {"$inc": {"late_events": 1}})

    async def _ids(self, where: dict[str, Any]) -> list[str]:
        return [doc["_id"] async for doc in self.collection.find(where, {"_id": 1})]

