"""Progress markers of pollers (pulls resume from them), one document per key."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pymongo import AsyncMongoClient


class Checkpoints:
    """Progress markers of pollers, one document per key."""

    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.collection = client[database]["checkpoints"]

    async def get(self, key: str) -> dict[str, Any] | None:
        doc = await self.collection.find_one({"_id": key})
        return None if doc is None else {k: v for k, v in doc.items() if k not in {"_id", "updated"}}

    async def put(self, key: str, state: dict[str, Any]) -> None:
        await self.collection.replace_one({"_id": key}, {**state, "updated": datetime.now(timezone.utc)}, upsert=True)
