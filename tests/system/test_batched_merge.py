"""Group commit changes nothing: a burst merged in rounds by two worker processes gives exactly the
profiles and ESP members that one-at-a-time processing of the same webhooks gives. The rounds are
small (16 merges) next to the messages in flight, so two rounds are often in flight at once."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from tests.conftest import deliver_webhook, eventually, own_pipeline, spawn, start_mailchimp, stop_sandbox
from tests.support.samples import customer, order

PEOPLE = 40
EVENTS_PER_PERSON = 12


def burst(tag: str) -> list[tuple[str, dict[str, Any]]]:
    """Updates and orders of every person, some sent twice under a new delivery id, in reverse order."""
    deliveries: list[tuple[str, dict[str, Any]]] = []
    for p in range(PEOPLE):
        email = f"burst{p}-{tag}@example.com"
        for n in range(EVENTS_PER_PERSON):
            at = f"2025-05-01T10:{n:02d}:{p % 60:02d}Z"
            if n % 3 == 2:
                deliveries.append(("orders/create", order(email, order_gid=10**15 + p * 100 + n, total=f"{10 + n}.00", processed_at=at)))
            else:
                deliveries.append(("customers/update", customer(email, first_name=f"F{p}-{n}", updated_at=at,
                                                                default_address={"city": f"City{n}", "country_code": "NO"})))
    twice = random.Random(tag).sample(deliveries, len(deliveries) // 5)
    return list(reversed(deliveries + twice))


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored profile without what depends on timing (versions, sync bookkeeping, arrival stamps)."""
    return {"id": doc["_id"], "email": doc["email"], "traits": {k: v["value"] for k, v in doc["traits"].items()},
            "orders": sorted(doc["orders"]), "computed": doc["computed"], "member": doc["esp"]["mailchimp"]["member"]}


async def run(deliveries, pipeline, http) -> dict[str, dict[str, Any]]:
    gate = asyncio.Semaphore(32)

    async def send(topic: str, body: dict[str, Any]) -> None:
        async with gate:
            assert (await deliver_webhook(http, pipeline.url, topic, body, webhook_id=uuid.uuid4().hex)).status == 202

    await asyncio.gather(*(send(topic, body) for topic, body in deliveries))

    async def settled():
        docs = [d async for d in pipeline.db.profiles.find({"merged_into": {"$exists": False}})]
        done = len(docs) == PEOPLE and all(len(d["orders"]) == EVENTS_PER_PERSON // 3 and not d["esp"]["mailchimp"]["pending"]
                                           for d in docs)
        return docs if done else None

    return {d["email"]: comparable(d) for d in await eventually(settled, timeout=180)}


async def test_a_burst_merged_in_rounds_equals_one_at_a_time(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    tag = uuid.uuid4().hex[:8]
    deliveries = burst(tag)
    (tmp_path / "rounds").mkdir()
    (tmp_path / "single").mkdir()
    async with own_pipeline(mongo_uri, sandbox, tmp_path / "rounds", MERGETAG_EVENTS_WORKER_THREADS="64", MERGETAG_MERGE_BATCH_MAX="16") as rounds:
        rounds.processes.append(spawn(rounds.env, tmp_path / "rounds" / "worker-2.log", "worker"))
        rounds.start_sync()
        batched = await run(deliveries, rounds, http)
        members = {email: await sandbox.member(http, email) for email in batched}
    alone_sandbox = start_mailchimp()
    try:
        async with own_pipeline(mongo_uri, alone_sandbox, tmp_path / "single", MERGETAG_EVENTS_WORKER_THREADS="1",
                                MERGETAG_MERGE_BATCH_MAX="1") as single:
            single.start_sync()
            one_at_a_time = await run(deliveries, single, http)
    finally:
        stop_sandbox(alone_sandbox)
    assert batched == one_at_a_time
    for email, profile in batched.items():
        assert members[email]["merge_fields"] == profile["member"]["merge_fields"]
