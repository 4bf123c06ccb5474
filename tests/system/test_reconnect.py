"""After the broker drops a worker's connections, a message the worker received before settles nothing
of the new channel.

RabbitMQ numbers deliveries per channel, from 1. The worker goes on with the messages it holds from the
old channel (RabbitMQ redelivers them on the new one anyway), and settles each by its number through the
consumer it has now: an ack would settle another message before it is processed (lost if the worker then
dies), a reject would dead-letter another message unprocessed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import uuid
from collections import Counter

import dramatiq
from dramatiq.middleware import Middleware

from broker import admin, topology
from broker.setup import TopologyBroker
from tests.conftest import AMQP_URL, eventually
from tests.support.proxy import DroppingProxy


class RejectOnFailure(Middleware):
    """What ``RetryOrDeadLetter`` does when the broker will not take a message's retry: reject it."""

    def after_process_message(self, broker, message, *, result=None, exception=None):  # noqa: ANN001
        if exception is not None:
            message.fail()


def settled(queue: str) -> dict[str, int]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    row = next((q for q in json.loads(out.stdout) if q["name"] == queue), {})
    return {"ready": row.get("messages_ready", 0), "unacked": row.get("messages_unacknowledged", 0)}


async def test_a_message_received_before_a_reconnect_settles_nothing_of_the_new_channel(rabbitmq):
    prefix = "rc" + uuid.uuid4().hex[:8]
    queue = topology.events_queue(prefix)
    proxy = DroppingProxy("127.0.0.1", int(AMQP_URL.rsplit(":", 1)[1].split("/")[0]))
    proxy.start()
    broker = TopologyBroker(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", middleware=[RejectOnFailure()])
    direct = TopologyBroker(url=AMQP_URL, middleware=[])
    calls: Counter[str] = Counter()
    holding, go = threading.Event(), threading.Event()

    def work(name: str) -> None:
        calls[name] += 1
        if name == "old" and calls[name] == 1:
            holding.set()
            go.wait(120)
            raise RuntimeError("fails once the broker is back: the worker rejects it")

    actor = dramatiq.actor(work, broker=broker, actor_name="work", queue_name=queue)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)  # one thread: it holds "old" throughout
    try:
        actor.send("old")
        worker.start()
        await eventually(lambda: asyncio.to_thread(holding.is_set), timeout=90)
        proxy.cut(3600)  # "old" goes back to its queue; the worker's thread is still on it
        # Published while the worker is away, first in line when it is back: delivery 1 of the new channel.
        await asyncio.to_thread(direct.enqueue, dramatiq.Message(queue_name=queue, actor_name="work", args=("new",), kwargs={},
                                                                 options={}))
        await eventually(lambda: asyncio.to_thread(lambda: settled(queue)["ready"] == 2), timeout=60)
        proxy.reopen()
        await eventually(lambda: asyncio.to_thread(lambda: settled(queue) == {"ready": 0, "unacked": 2}), timeout=90)
        go.set()  # "old" fails now and is rejected, by its number on the old channel
        await eventually(lambda: asyncio.to_thread(lambda: calls["new"] >= 1 and calls["old"] >= 2 and settled(queue)["unacked"] == 0),
                         timeout=90)
        assert admin.queue_depths(AMQP_URL, prefix)[topology.xq_name(queue)] == 0  # "new" was not dead-lettered by it
    finally:
        go.set()
        worker.stop()
        broker.close()
        direct.close()
        proxy.close()
        admin.drop_queues(AMQP_URL, prefix)
