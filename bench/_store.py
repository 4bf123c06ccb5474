"""What the benches share about the store itself: its own bulk-upsert rate and the server's request count.

The pipeline benches compare their rates with :func:`bulk_upserts` measured in the same run against the
same server, so a slow or busy machine shows as the same ratio, not as a different number."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any


async def bulk_upserts(store, n: int, batch: int, profile, members, distinct: int | None = None, indexed: bool = True) -> float:  # noqa: ANN001
    """The store's own rate: unordered bulk upserts of documents the size of a merged profile, ``batch``
    a request, over ``distinct`` ids (the first upsert of an id inserts it, the later ones change it),
    into a collection with the profile collection's indexes (``indexed``) or none."""
    from pymongo import ASCENDING, UpdateOne

    body = profile.model_dump(mode="python", exclude={"id"})
    body["esp"] = {esp: {"member": member, "member_hash": member_hash, "dirty_at": datetime.now(timezone.utc), "pending": True}
                   for esp, (member, member_hash) in members.items()}
    raw = store.profiles.database["bench_raw_" + uuid.uuid4().hex[:6]]
    if indexed:
        async for index in await store.profiles.list_indexes():
            if index["name"] != "_id_":
                await raw.create_index([(k, ASCENDING) for k in index["key"]], name=index["name"], unique=index.get("unique", False))
    distinct = distinct or n
    start = time.perf_counter()
    for first in range(0, n, batch):
        await raw.bulk_write([UpdateOne({"_id": f"raw-{i % distinct}"},
                                        {"$set": {**body, "keys": [f"k{i % distinct}a", f"k{i % distinct}b"], "n": i}}, upsert=True)
                              for i in range(first, min(n, first + batch))], ordered=False)
    rate = n / (time.perf_counter() - start)
    await raw.drop()
    return rate


async def server_requests(client: Any) -> int:
    """Requests the server has answered so far, this call included (SecantusDB and MongoDB count one per
    command: a bulk write is one, a find and each of its getMores one each)."""
    return (await client.admin.command("serverStatus"))["network"]["numRequests"]
