"""Quarantine: deliveries that failed validation, kept whole with every error until re-driven."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo import ASCENDING, AsyncMongoClient

from schemas.errors import BrokerUnavailable


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

    async def counts_by_reason(self) -> dict[str, int]:
        """Quarantined deliveries per reason (a delivery with several reasons counts under each)."""
        pipeline = [{"$match": {"status": "quarantined"}}, {"$unwind": "$reasons"}, {"$group": {"_id": "$reasons", "n": {"$sum": 1}}}]
        return {d["_id"]: d["n"] async for d in await self.collection.aggregate(pipeline)}

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

    @property
    def published(self) -> int:
        """Deliveries sent back through the pipeline: a redrive's progress. One the worker refused again
        before the mark was still redriven (requarantined), so it counts."""
        return len(self.redriven) + self.requarantined

    def add(self, other: Redrive) -> None:
        """Count ``other`` (one step of a paced redrive) in."""
        self.redriven += other.redriven
        self.requarantined += other.requarantined
        self.skipped += other.skipped
        self.failed += other.failed

    def summary(self) -> dict[str, Any]:
        return {"redriven": self.redriven, "count": len(self.redriven), "requarantined": self.requarantined,
                "skipped": self.skipped, "failed": self.failed}
