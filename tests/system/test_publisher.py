"""Group commit in the receiver's publisher: concurrent publishes share socket writes and confirms."""

from __future__ import annotations

import asyncio
import uuid

from broker import publisher, topology
from tests.conftest import AMQP_URL, delete_queues, queue_counts


async def test_concurrent_publishes_share_writes_and_are_each_confirmed(rabbitmq, monkeypatch):
    writes = 0
    write = publisher.asyncio.StreamWriter.write

    def counted(self, data):  # noqa: ANN001
        nonlocal writes
        writes += 1
        return write(self, data)

    prefix = "pub" + uuid.uuid4().hex[:8]
    queue = topology.events_queue(prefix)
    pub = publisher.Publisher(AMQP_URL, [queue], 30)
    try:
        await pub.connect()
        monkeypatch.setattr(publisher.asyncio.StreamWriter, "write", counted)
        messages = [publisher.encode_message(queue, topology.PROCESS_EVENT_ACTOR, ({"n": n},)) for n in range(500)]
        await asyncio.gather(*(pub.publish(queue, body, message_id) for message_id, body in messages))
        assert writes < len(messages) / 5  # the frames of many publishes leave in one write
        assert (await asyncio.to_thread(queue_counts, prefix))[queue] == len(messages)  # every one confirmed and held
    finally:
        await pub.close()
        delete_queues(prefix)
