"""Retries never change a profile, with or without the receiver's de-duplication."""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.conftest import eventually, index_key, queue_backlog


async def test_a_retried_delivery_without_a_time_never_changes_the_profile_even_past_deduplication(receiver, system, http):
    from datetime import datetime, timezone

    import redis.asyncio as redis
    import standardwebhooks

    from tests.conftest import STANDARD_SECRET

    email = f"untimed-{uuid.uuid4().hex[:10]}@example.com"

    async def send(msg_id: str, name: str) -> None:
        body = json.dumps({"type": "contact.updated", "data": {"email": email, "first_name": name}})
        now = datetime.now(timezone.utc)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "Content-Type": "application/json",
                   "webhook-signature": standardwebhooks.Webhook(STANDARD_SECRET).sign(msg_id, now, body)}
        async with http.post(f"{receiver}/webhooks/plaincrm", data=body, headers=headers) as r:
            assert r.status == 202

    async def named(name: str):
        doc = await system.db.profiles.find_one({"keys": index_key(f"email:{email}")})
        return doc if doc and doc["traits"].get("first_name", {}).get("value") == name else None

    first, second = f"msg_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    await send(first, "Old")
    await eventually(lambda: named("Old"))
    await send(second, "New")
    settled = await eventually(lambda: named("New"))
    # Past the receiver's de-duplication (its window ran out, or Redis was down): the sender retries the older state.
    client = redis.Redis.from_url(system.settings.redis_url)
    assert await client.delete(f"{system.settings.queue_prefix}:dedup:plaincrm:{first}") == 1
    await client.aclose()
    await send(first, "Old")

    async def worked_off():  # RabbitMQ holds nothing of the prefix, ready or unacked: the retry was taken and acked
        return not await asyncio.to_thread(queue_backlog, system.settings.queue_prefix)

    await eventually(worked_off, timeout=60)
    doc = await system.db.profiles.find_one({"_id": settled["_id"]})
    assert doc["traits"]["first_name"]["value"] == "New" and doc["version"] == settled["version"]
