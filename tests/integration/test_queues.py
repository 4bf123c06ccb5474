"""Queue declarations against the real RabbitMQ: dead letters never expire, and Dramatiq and the receiver
declare identical queues."""

import asyncio
import json
import os
import subprocess
import sys
import uuid

import aiohttp

from adapters.dev import free_port, wait_for_port
from broker import admin, topology
from broker.publisher import Publisher
from broker.setup import TopologyBroker
from tests.conftest import AMQP_URL, ROOT, SHOPIFY_SECRET, post_webhook, source_env, stop
from tests.samples import customer

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
