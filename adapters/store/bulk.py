"""Bulk writes as the store makes them: many single-document updates in one round trip."""

from __future__ import annotations

from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection


async def each(collection: AsyncCollection, ids: list[str], where: dict[str, Any], update: dict[str, Any]) -> None:
    """``update`` each document of ``ids`` that matches ``where``: one unordered bulk write of
    single-document updates, never a multi-document update. (SecantusDB runs a multi-document update
    holding the collection's lock while it retries a conflict with an open transaction, and that
    transaction's next statement waits for the lock: neither moves until the transaction expires.)"""
    if ids:
        await collection.bulk_write([UpdateOne({"_id": i, **where}, update) for i in ids], ordered=False)
