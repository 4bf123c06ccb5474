"""The audit log: every operator action — who (the token's name), when, what, on which selection,
how many, and how it ended — kept in MongoDB, shown in the console, exported by ``mergetag audit``.

An entry names selections and counts, never a person: filters are operator input (queue, actor,
reason, ids), and a profile filter is a profile id.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from pymongo import DESCENDING, AsyncMongoClient

AUDIT = "audit"


class AuditLog:
    def __init__(self, client: AsyncMongoClient, database: str) -> None:
        self.collection = client[database][AUDIT]

    async def record(self, token: str, action: str, selection: dict[str, Any], counts: dict[str, int], outcome: str) -> str:
        entry_id = uuid.uuid4().hex
        await self.collection.insert_one({"_id": entry_id, "at": datetime.now(timezone.utc), "token": token, "action": action,
                                          "selection": selection, "counts": counts, "outcome": outcome})
        return entry_id

    async def update(self, entry_id: str, counts: dict[str, int], outcome: str) -> None:
        """A long action (a replay at a rate) records where it got to, and how it ended."""
        await self.collection.update_one({"_id": entry_id}, {"$set": {"counts": counts, "outcome": outcome}})

    async def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first."""
        return [doc async for doc in self.collection.find({}).sort("at", DESCENDING).limit(limit)]
