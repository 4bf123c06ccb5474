"""The receiver against real RabbitMQ: 202 only after a confirm, clear refusals, 503 when it cannot."""

import json
import os
import uuid
from unittest import mock

import dramatiq
import pika
import pytest
from aiohttp.test_utils import TestServer

from adapters.http.receiver import create_app
from adapters.settings import Settings
from broker import topology
from sandboxes.local import free_port
from tests.conftest import AMQP_URL, SHOPIFY_SECRET, Reply, delete_queues, eventually, post_webhook, queue_counts
from tests.support.metrics import value
from tests.support.proxy import StallingProxy
from tests.support.samples import customer

LIMIT = 64 * 1024


def settings_for(prefix: str, amqp_url: str = AMQP_URL, **extra: str) -> Settings:
    env = {"MERGETAG_AMQP_URL": amqp_url, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_SHOPIFY_SECRETS": f"rotated,{SHOPIFY_SECRET}",
           "MERGETAG_MAX_BODY_BYTES": str(LIMIT), "MERGETAG_PUBLISH_TIMEOUT_S": "3", **extra}
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


async def serve(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings), host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


@pytest.fixture
async def idle(rabbitmq):
    """A receiver whose queues no worker consumes, so what it enqueued can be counted."""
    prefix = "r" + uuid.uuid4().hex[:10]
    server = await serve(settings_for(prefix))
    yield prefix, str(server.make_url("")).rstrip("/")
    await server.close()
    delete_queues(prefix)


def take_one(queue: str) -> dramatiq.Message:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        assert method is not None, "queue is empty"
        assert properties.delivery_mode == 2, "message must be persistent"
        return dramatiq.Message.decode(body)
    finally:
        connection.close()


async def test_accepted_delivery_is_a_durable_dramatiq_message(idle, http):
    prefix, url = idle
    payload = customer("queue@example.com")
    payload["id"] = 2**63 - 1
    response = await post_webhook(http, url, "customers/update", payload, webhook_id="wh-1")
    assert response.status == 202
    assert queue_counts(prefix)[topology.events_queue(prefix)] == 1
    message = take_one(topology.events_queue(prefix))
    assert message.actor_name == "process_event"
    (delivery,) = message.args
    assert delivery["source"] == "shopify"
    assert delivery["topic"] == "customers/update"
    assert delivery["delivery_id"] == "wh-1"
    assert delivery["payload"]["id"] == 2**63 - 1  # 64-bit ids survive, never floats


async def test_old_secret_still_accepted_during_rotation(idle, http):
    prefix, url = idle
    response = await post_webhook(http, url, "customers/update", customer("rot@example.com"), secret="rotated")
    assert response.status == 202


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("bad_signature", 401, "invalid_signature"),
        ("no_signature", 401, "missing_signature"),
        ("malformed_json", 400, "malformed_json"),
        ("not_an_object", 400, "invalid_payload"),
        ("oversized", 413, "payload_too_large"),
        ("unknown_source", 404, "unknown_source"),
    ],
)
async def test_refusals_have_a_status_a_code_and_enqueue_nothing(idle, http, kind, status, code):
    prefix, url = idle
    topic, payload, secret, source = "customers/update", json.dumps(customer("x@example.com")).encode(), SHOPIFY_SECRET, "shopify"
    if kind == "bad_signature":
        secret = "wrong"
    elif kind == "malformed_json":
        payload = b'{"email": "x@example.com",'
    elif kind == "not_an_object":
        payload = b"[1, 2]"
    elif kind == "oversized":
        payload = json.dumps({"note": "x" * (LIMIT + 1)}).encode()
    elif kind == "unknown_source":
        source = "woocommerce"
    if kind == "no_signature":
        async with http.post(f"{url}/webhooks/shopify", data=payload, headers={"X-Shopify-Topic": topic}) as r:
            response = Reply(r.status, dict(r.headers), await r.read())
    else:
        response = await post_webhook(http, url, topic, payload, secret=secret, source=source)
    assert response.status == status
    assert response.json()["error"] == code
    assert response.headers["Content-Type"].startswith("application/json")
    assert sum(queue_counts(prefix).values()) == 0


async def test_unreachable_broker_answers_503_with_retry_after(http):
    closed_port = free_port()
    server = await serve(settings_for("u" + uuid.uuid4().hex[:8], amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F"))
    url = str(server.make_url("")).rstrip("/")
    try:
        response = await post_webhook(http, url, "customers/update", customer("down@example.com"))
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert response.json()["error"] == "broker_unavailable"
        async with http.get(f"{url}/readyz") as ready:
            assert ready.status == 503
        async with http.get(f"{url}/healthz") as alive:
            assert alive.status == 200
    finally:
        await server.close()


async def test_broker_that_stops_confirming_gets_503_not_202(rabbitmq, http):
    proxy = StallingProxy("127.0.0.1", int(pika.URLParameters(AMQP_URL).port))
    await proxy.start()
    prefix = "s" + uuid.uuid4().hex[:10]
    server = await serve(settings_for(prefix, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"))
    url = str(server.make_url("")).rstrip("/")
    try:
        assert (await post_webhook(http, url, "customers/update", customer("a@example.com"))).status == 202
        async with http.get(f"{url}/readyz") as ready:
            assert ready.status == 200
        proxy.stall()
        response = await post_webhook(http, url, "customers/update", customer("b@example.com"))
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        proxy.resume()

        async def accepted():  # after the stall the receiver reconnects and accepts again (a sender retries a 503)
            return (await post_webhook(http, url, "customers/update", customer("c@example.com"))).status == 202

        await eventually(accepted, timeout=60)
    finally:
        await server.close()
        await proxy.close()
        delete_queues(prefix)


async def test_redis_down_falls_back_to_the_merge_idempotency(rabbitmq, http):
    prefix = "d" + uuid.uuid4().hex[:10]
    server = await serve(settings_for(prefix, MERGETAG_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    url = str(server.make_url("")).rstrip("/")
    try:
        payload = customer("dup@example.com")
        first = await post_webhook(http, url, "customers/update", payload, webhook_id="same")
        second = await post_webhook(http, url, "customers/update", payload, webhook_id="same")
        assert (first.status, second.status) == (202, 202)
        # Not recognised without Redis: both queued, and the merge makes the second a no-op.
        assert queue_counts(prefix)[topology.events_queue(prefix)] == 2
    finally:
        await server.close()
        delete_queues(prefix)


async def test_duplicate_is_answered_2xx_and_not_queued_again(idle, http):
    prefix, url = idle
    payload = customer("twice@example.com")
    first = await post_webhook(http, url, "customers/update", payload, webhook_id="w-1")
    second = await post_webhook(http, url, "customers/update", payload, webhook_id="w-1")
    assert (first.status, second.status) == (202, 202)
    assert second.json()["duplicates"] == 1
    assert queue_counts(prefix)[topology.events_queue(prefix)] == 1


async def test_verified_delivery_on_an_unmapped_topic_is_acknowledged_and_counted(idle, http):
    prefix, url = idle
    reply = await post_webhook(http, url, "shop/update", {"id": 1})
    assert reply.status == 202 and reply.json()["message_ids"] == []
    assert sum(queue_counts(prefix).values()) == 0
    async with http.get(f"{url}/metrics") as r:
        assert value(await r.text(), "mergetag_deliveries_total", source="shopify", outcome="ignored") == 1


async def test_junk_headers_and_bodies_are_400_not_500(idle, http):
    prefix, url = idle
    body = json.dumps(customer("junk@example.com")).encode()
    async with http.post(f"{url}/webhooks/shopify", data=body, headers={"X-Shopify-Hmac-Sha256": "é\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "X-Shopify-Topic": "customers/update"}) as r:
        assert r.status in (400, 401)
    nested = b"[" * 20_000 + b"]" * 20_000
    from adapters.sources.shopify import sign
    async with http.post(f"{url}/webhooks/shopify", data=nested, headers={"X-Shopify-Hmac-Sha256": sign(nested, SHOPIFY_SECRET), "X-Shopify-Topic": "customers/update"}) as r:
        assert (r.status, (await r.json())["error"]) == (400, "malformed_request")
