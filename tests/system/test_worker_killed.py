"""A worker killed with SIGKILL in the middle of its merge rounds loses nothing and doubles nothing:
its unacked messages come back, the next worker merges them, and every profile and ESP member ends
exactly as if nothing had happened."""

from __future__ import annotations

import asyncio
import signal
import uuid
from decimal import Decimal

from tests.conftest import deliver_webhook, eventually, own_pipeline, queue_counts, spawn
from tests.system.test_batched_merge import EVENTS_PER_PERSON, PEOPLE, burst

ORDERS = [n for n in range(EVENTS_PER_PERSON) if n % 3 == 2]
LAST_UPDATE = max(n for n in range(EVENTS_PER_PERSON) if n % 3 != 2)


async def test_a_worker_killed_mid_round_loses_nothing_and_doubles_nothing(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    tag = uuid.uuid4().hex[:8]
    deliveries = burst(tag)
    async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_EVENTS_WORKER_THREADS="32", MERGETAG_MERGE_BATCH_MAX="100") as pipeline:
        prefix = pipeline.env["MERGETAG_QUEUE_PREFIX"]
        first = pipeline.processes[0]
        first.terminate()  # the burst queues up first, so the worker starts with a full queue and full rounds
        first.wait(timeout=30)
        gate = asyncio.Semaphore(32)

        async def send(topic, body):
            async with gate:
                assert (await deliver_webhook(http, pipeline.url, topic, body, webhook_id=uuid.uuid4().hex)).status == 202

        await asyncio.gather(*(send(topic, body) for topic, body in deliveries))
        doomed = spawn(pipeline.env, tmp_path / "worker-doomed.log", "worker")
        pipeline.processes.append(doomed)

        async def merging():
            return await pipeline.db.profiles.count_documents({}) > 0 or None

        await eventually(merging, timeout=120, interval=0.05)
        queued = (await asyncio.to_thread(queue_counts, prefix)).get(f"{prefix}.events", 0)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        pipeline.processes.append(spawn(pipeline.env, tmp_path / "worker-after.log", "worker"))
        pipeline.start_sync()

        async def settled():
            docs = [d async for d in pipeline.db.profiles.find({"merged_into": {"$exists": False}})]
            done = len(docs) == PEOPLE and all(len(d["orders"]) == len(ORDERS) and not d["esp"]["mailchimp"]["pending"] for d in docs)
            return docs if done else None

        docs = await eventually(settled, timeout=240)
        assert queued > 0  # the kill came while the burst was still being merged
        for doc in docs:
            p = int(doc["email"].split("-")[0].removeprefix("burst"))
            assert doc["traits"]["first_name"]["value"] == f"F{p}-{LAST_UPDATE}"
            assert doc["computed"]["order_count"] == len(ORDERS)  # every order once: none lost, none doubled
            assert Decimal(str(doc["computed"]["lifetime_value"])) == sum(Decimal(f"{10 + n}.00") for n in ORDERS)
            member = await sandbox.member(http, doc["email"])
            assert member is not None and member["merge_fields"] == doc["esp"]["mailchimp"]["member"]["merge_fields"]
        backlog = await asyncio.to_thread(queue_counts, prefix)
        assert backlog.get(f"{prefix}.events.XQ", 0) == 0 and backlog.get(f"{prefix}.sync.XQ", 0) == 0  # nothing dead-lettered
