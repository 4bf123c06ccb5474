"""Group commit in the receiver's publisher: concurrent publishes share socket writes and confirms."""

from __future__ import annotations

import asyncio
import uuid

import dramatiq

from broker import admin, publisher, setup, topology
from sandboxes.local import free_port
from schemas.errors import BrokerUnavailable
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


async def test_a_node_that_is_gone_is_passed_over_for_the_next(rabbitmq):
    """A cluster's first node is down: the receiver's publisher, Dramatiq's broker and the operators'
    tools all go on to the next one."""
    prefix = "fo" + uuid.uuid4().hex[:8]
    queue = topology.events_queue(prefix)
    nodes = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F,{AMQP_URL}"  # nothing listens on the first
    pub = publisher.Publisher(nodes, topology.all_queues(prefix), 10)
    broker = setup.create_broker(nodes, retry_max=1, min_backoff_ms=10, max_backoff_ms=10)
    try:
        message_id, body = publisher.encode_message(queue, topology.PROCESS_EVENT_ACTOR, ({"n": 1},))
        await pub.publish(queue, body, message_id)
        await asyncio.to_thread(broker.enqueue, dramatiq.Message(queue_name=queue, actor_name=topology.PROCESS_EVENT_ACTOR,
                                                                   args=({"n": 2},), kwargs={}, options={}))
        assert (await asyncio.to_thread(admin.queue_depths, nodes, prefix))[queue] == 2
    finally:
        await pub.close()
        broker.close()
        await asyncio.to_thread(delete_queues, prefix)


async def test_a_refused_publish_is_broker_unavailable_and_its_neighbours_are_confirmed(rabbitmq):
    """One batch, three fates read by aiormq's reader from our hand-packed frames: a queue that does not
    exist returns the message (mandatory), a full queue nacks it (``reject-publish``), the rest are acked."""
    prefix = "ref" + uuid.uuid4().hex[:8]
    queue, full = topology.events_queue(prefix), f"{prefix}.full"
    pub = publisher.Publisher(AMQP_URL, [queue], 30)
    try:
        await pub.connect()
        await pub._channel.queue_declare(full, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        sends = [(queue, n) for n in range(20)] + [(f"{prefix}.nowhere", 20), (full, 21), (full, 22)]
        messages = [(q, *publisher.encode_message(q, topology.PROCESS_EVENT_ACTOR, ({"n": n},))) for q, n in sends]
        results = await asyncio.gather(*(pub.publish(q, body, mid) for q, mid, body in messages), return_exceptions=True)
        assert results[:20] == [None] * 20
        assert isinstance(results[20], BrokerUnavailable)  # unroutable: returned
        assert results[21] is None  # the first fits in the full queue
        assert isinstance(results[22], BrokerUnavailable)  # nacked
        await pub.publish(queue, *reversed(publisher.encode_message(queue, topology.PROCESS_EVENT_ACTOR, ({"n": 23},))))
        assert (await asyncio.to_thread(queue_counts, prefix))[queue] == 21  # the channel still publishes after both
        await pub._channel.queue_delete(full)
    finally:
        await pub.close()
        delete_queues(prefix)
