"""Queue declarations against the real RabbitMQ: dead letters never expire, Dramatiq and the receiver
declare identical queues, and ``mergetag queues migrate`` converts old declarations without losing a message."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import aiohttp
import dramatiq
import pika
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import dq_name
from dramatiq.errors import ConnectionClosed

from broker import admin, topology
from broker.dead_letters import DeadLetters
from broker.migrate import MigrationRefused, migrate, temporary_name
from broker.publisher import Publisher, encode_message
from broker.setup import TopologyBroker, Worker
from sandboxes.local import free_port, wait_for_port
from tests.conftest import AMQP_URL, ROOT, SHOPIFY_SECRET, eventually, post_webhook, source_env, stop
from tests.support.samples import customer

# Arguments that make RabbitMQ drop a message without an operator doing anything.
EXPIRING = {"x-message-ttl", "x-expires", "x-max-length", "x-max-length-bytes"}


def declared(prefix: str) -> dict[str, dict[str, object]]:
    """Every queue of ``prefix`` with its arguments, as RabbitMQ itself reports them."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "arguments", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    return {row["name"]: {key: value for key, _, value in row["arguments"]}
            for row in json.loads(out.stdout) if row["name"].startswith(prefix + ".")}


def drop(prefix: str) -> None:
    admin.drop_queues(AMQP_URL, prefix)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    for name, _ in topology.prefix_declarations(prefix):
        connection.channel().queue_delete(temporary_name(name))
    connection.close()


def dramatiq_declares(prefix: str) -> None:
    """Declare every queue of ``prefix`` the way the workers do (raises ConnectionClosed on a mismatch)."""
    broker = TopologyBroker(url=AMQP_URL, confirm_delivery=True, middleware=[])
    try:
        for queue in topology.all_queues(prefix):
            broker.declare_queue(queue, ensure=True)
    finally:
        broker.close()


def by_suffix(queues: dict[str, dict[str, object]], prefix: str) -> dict[str, dict[str, object]]:
    """Arguments keyed by the name without the prefix; routing keys too."""
    return {name.removeprefix(prefix): {k: v.removeprefix(prefix) if isinstance(v, str) else v for k, v in arguments.items()}
            for name, arguments in queues.items()}


async def test_dead_letters_are_kept_until_an_operator_acts_no_queue_expires_them(rabbitmq, tmp_path):
    """A real `mergetag receiver` on a fresh prefix accepts a webhook; then no queue of the prefix drops
    messages by itself: no TTL, expiry or length limit without a dead-letter target."""
    prefix = "k" + uuid.uuid4().hex[:10]
    port = free_port()
    env = {**os.environ, **source_env(), "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix,
           "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET}
    receiver = subprocess.Popen([sys.executable, "-m", "adapters.cli", "receiver", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=open(tmp_path / "receiver.log", "w"), stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_for_port, port, 60, receiver)
        async with aiohttp.ClientSession() as http:
            reply = await post_webhook(http, f"http://127.0.0.1:{port}", "customers/update", customer(f"k-{prefix}@example.com"))
        assert reply.status == 202
        queues = declared(prefix)
        assert set(queues) == {name for name, _ in topology.prefix_declarations(prefix)}
        for name, arguments in queues.items():
            if EXPIRING & set(arguments):
                assert "x-dead-letter-exchange" in arguments and "x-dead-letter-routing-key" in arguments, (name, arguments)
        for queue in topology.all_queues(prefix):
            assert not EXPIRING & set(queues[topology.xq_name(queue)]), queues[topology.xq_name(queue)]
    finally:
        stop([receiver])
        drop(prefix)


async def test_dramatiq_and_the_receiver_declare_identical_queues(rabbitmq):
    """Whichever declares first, the other's declaration is accepted (RabbitMQ refuses any difference),
    and both leave exactly the same arguments behind."""
    receiver_first, workers_first = "r" + uuid.uuid4().hex[:10], "w" + uuid.uuid4().hex[:10]
    try:
        publisher = Publisher(AMQP_URL, topology.all_queues(receiver_first), 5)
        await publisher.connect()
        await publisher.close()
        dramatiq_declares(receiver_first)

        dramatiq_declares(workers_first)
        publisher = Publisher(AMQP_URL, topology.all_queues(workers_first), 5)
        await publisher.connect()
        assert publisher.ready
        await publisher.close()

        first, second = by_suffix(declared(receiver_first), receiver_first), by_suffix(declared(workers_first), workers_first)
        assert first == second
        assert first == by_suffix(dict(topology.prefix_declarations(receiver_first)), receiver_first)
    finally:
        drop(receiver_first)
        drop(workers_first)


def publish(channel, queue: str, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    for message_id in ids:
        channel.basic_publish("", queue, json.dumps({"n": message_id}).encode(),
                              properties=pika.BasicProperties(delivery_mode=2, message_id=message_id, headers={"origin": tag}),
                              mandatory=True)
    return ids


def drain(queue: str) -> list[tuple[str, dict, bytes]]:
    """Every message of ``queue`` (consumed)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel, found = connection.channel(), []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        found.append((properties.message_id, properties.headers, body))
    connection.close()
    return found


def depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def previous_arguments(name: str, dead_letter_ttl: bool) -> dict[str, object]:
    """A queue as earlier versions declared it: classic, with message priorities; before that, dead-letter
    queues with Dramatiq's 7-day TTL."""
    if name.endswith(".XQ"):
        return {"x-message-ttl": DEAD_MESSAGE_TTL} if dead_letter_ttl else {}
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": topology.xq_name(topology.q_name(name)), "x-max-priority": 10}


def old_deployment(prefix: str, dead_letter_ttl: bool = False) -> pika.BlockingConnection:
    """The queues of ``prefix`` as an earlier version declared them (it had no urgent queue)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    for queue in (topology.events_queue(prefix), topology.sync_queue(prefix)):
        for name, _ in topology.declarations(queue):
            channel.queue_declare(name, durable=True, arguments=previous_arguments(name, dead_letter_ttl))
    return connection


def cli(prefix: str, *args: str) -> dict:
    env = {**os.environ, "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix}
    out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def test_migrate_turns_classic_queues_into_quorum_queues_without_losing_a_message_and_a_rerun_changes_nothing(rabbitmq):
    prefix = "m" + uuid.uuid4().hex[:10]
    events, sync = topology.events_queue(prefix), topology.sync_queue(prefix)
    try:
        connection = old_deployment(prefix)
        channel = connection.channel()
        channel.confirm_delivery()
        dead_events = publish(channel, topology.xq_name(events), 5, "ev")
        dead_sync = publish(channel, topology.xq_name(sync), 2, "sy")
        waiting = publish(channel, events, 3, "main")
        connection.close()
        with pytest.raises(ConnectionClosed):
            dramatiq_declares(prefix)  # what the workers would hit at start-up

        summary = cli(prefix, "queues", "migrate")
        assert summary["migrated"] == {topology.xq_name(events): 5, topology.xq_name(sync): 2, events: 3, sync: 0,
                                       topology.dq_name(events): 0, topology.dq_name(sync): 0}
        assert summary["messages_moved"] == 10
        assert summary["unchanged"] == []
        assert set(summary["absent"]) == {name for name, _ in topology.declarations(topology.urgent_queue(prefix))}
        queues = declared(prefix)
        for queue in (events, sync):
            for name, arguments in topology.declarations(queue):
                assert queues[name] == arguments and queues[name]["x-queue-type"] == "quorum"
        assert not any(name.endswith(".migrating") for name in queues)
        dramatiq_declares(prefix)

        again = cli(prefix, "queues", "migrate")
        assert again["migrated"] == {} and again["messages_moved"] == 0
        moved = drain(topology.xq_name(events))
        assert [m[0] for m in moved] == dead_events  # all there, in order, properties kept
        # Kept as published; a quorum queue adds its count of earlier deliveries (none).
        assert [({k: v for k, v in headers.items() if k != "x-delivery-count"}, headers.get("x-delivery-count", 0), json.loads(body)["n"])
                for _, headers, body in moved] == [({"origin": "ev"}, 0, mid) for mid in dead_events]
        assert [m[0] for m in drain(topology.xq_name(sync))] == dead_sync
        assert [m[0] for m in drain(events)] == waiting
    finally:
        drop(prefix)


def test_a_rerun_finishes_a_migration_that_crashed_half_way(rabbitmq):
    """The crash left some messages in the temporary queue and the rest in the old queue: a rerun ends
    with every message back in the queue, declared anew."""
    prefix = "h" + uuid.uuid4().hex[:10]
    xq = topology.xq_name(topology.events_queue(prefix))
    try:
        connection = old_deployment(prefix)
        channel = connection.channel()
        channel.confirm_delivery()
        left = publish(channel, xq, 3, "left")
        channel.queue_declare(temporary_name(xq), durable=True)
        parked = publish(channel, temporary_name(xq), 2, "parked")
        connection.close()

        summary = migrate(AMQP_URL, topology.prefix_declarations(prefix))
        assert summary.migrated[xq] == 5 and sum(summary.migrated.values()) == 5  # the other queues were empty
        assert declared(prefix)[xq] == topology.arguments(xq)
        assert sorted(m[0] for m in drain(xq)) == sorted(left + parked)
        assert temporary_name(xq) not in declared(prefix)

        # Crashed after the old queue was deleted, before it was declared again: only the temporary queue is left.
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_delete(xq)
        channel.queue_declare(temporary_name(xq), durable=True)
        parked = publish(channel, temporary_name(xq), 4, "only")
        connection.close()
        assert migrate(AMQP_URL, topology.prefix_declarations(prefix)).migrated == {xq: 4}  # the rest was done before
        assert [m[0] for m in drain(xq)] == parked
    finally:
        drop(prefix)


async def test_migrate_refuses_a_queue_with_consumers_and_moves_nothing(rabbitmq):
    prefix = "c" + uuid.uuid4().hex[:10]
    xq = topology.xq_name(topology.events_queue(prefix))
    try:
        connection = old_deployment(prefix, dead_letter_ttl=True)
        channel = connection.channel()
        channel.confirm_delivery()
        publish(channel, xq, 2, "held")
        consumer = connection.channel()
        consumer.basic_qos(prefetch_count=0)
        consumer.basic_consume(xq, lambda *_: None)
        connection.process_data_events(time_limit=0)
        with pytest.raises(MigrationRefused, match="consumer"):
            migrate(AMQP_URL, topology.prefix_declarations(prefix))
        assert set(migrate(AMQP_URL, topology.prefix_declarations(prefix), dry_run=True).migrated) == {
            name for queue in (topology.events_queue(prefix), topology.sync_queue(prefix)) for name, _ in topology.declarations(queue)}
        connection.close()
        queues = declared(prefix)
        # Refused before touching any queue, even those without consumers.
        assert all(queues[name] == {"x-message-ttl": DEAD_MESSAGE_TTL} for name in queues if name.endswith(".XQ"))
        # The consumer's unacked messages go back to the queue once it is gone: none was moved away.
        assert await eventually(lambda: asyncio.to_thread(lambda: depth(xq) == 2))
        assert temporary_name(xq) not in declared(prefix)
    finally:
        drop(prefix)


def test_a_message_delivered_too_often_is_dead_lettered_with_its_reason_and_reading_it_keeps_it(rabbitmq):
    """Workers that die holding a message (a poison message) return it each time: past the delivery limit
    RabbitMQ dead-letters it, at least once, instead of looping or dropping it; operators see why, and
    reading the dead letter (fetched, then returned) more often than any limit keeps it."""
    prefix = "p" + uuid.uuid4().hex[:10]
    events = topology.events_queue(prefix)
    xq = topology.xq_name(events)
    try:
        dramatiq_declares(prefix)
        message_id, body = encode_message(events, topology.PROCESS_EVENT_ACTOR, ({"poison": True},))
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        confirmed = connection.channel()
        confirmed.confirm_delivery()
        confirmed.basic_publish("", events, body, properties=pika.BasicProperties(delivery_mode=2, message_id=message_id),
                                mandatory=True)
        deliveries = 0
        for _ in range(3 * topology.DELIVERY_LIMIT):
            channel = connection.channel()
            method, _, _ = channel.basic_get(events, auto_ack=False)
            channel.close()  # the worker died with it unsettled
            if method is None and depth(xq) == 1:
                break
            deliveries += method is not None
        connection.close()
        assert topology.DELIVERY_LIMIT <= deliveries <= topology.DELIVERY_LIMIT + 1
        assert depth(events) == 0 and depth(xq) == 1
        tools = DeadLetters(AMQP_URL, prefix)
        for _ in range(topology.DELIVERY_LIMIT + 5):
            letters = tools.list()
        assert [(letter.message_id, letter.code) for letter in letters] == [(message_id, "broker_delivery_limit")]
        assert letters[0].age_s is not None and letters[0].age_s < 300
        assert depth(xq) == 1
    finally:
        drop(prefix)


def test_the_delay_queues_consumers_wake_every_delay_poll_and_a_delayed_message_runs(rabbitmq):
    """A delayed message is moved to its queue when its delay queue's consumer wakes: that consumer polls
    every ``delay_poll_ms``; the queue's own consumer and the worker threads keep ``worker_timeout``."""
    prefix = "dp" + uuid.uuid4().hex[:8]
    queue = topology.events_queue(prefix)
    broker = TopologyBroker(url=AMQP_URL, middleware=[])
    ran: list[str] = []
    actor = dramatiq.actor(ran.append, broker=broker, actor_name="note", queue_name=queue)
    worker = Worker(broker, worker_threads=2, worker_timeout=500, delay_poll_ms=20)
    worker.start()
    try:
        actor.send_with_options(args=("later",), delay=300)
        deadline = time.monotonic() + 60
        while not ran and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ran == ["later"]
        assert worker.consumers[dq_name(queue)].worker_timeout == 20 and worker.consumers[queue].worker_timeout == 500
        assert {thread.timeout for thread in worker.workers} == {0.5}
    finally:
        worker.stop()
        broker.close()
        drop(prefix)
