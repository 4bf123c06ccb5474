"""Bad input is refused (400 with a code) or quarantined with its reason, never answered 500 and never
retried into a dead letter; work per request is bounded. Real receiver, RabbitMQ, workers and MongoDB."""

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

from adapters.sources.shopify import sign
from adapters.store.quarantine import Quarantine
from broker import topology
from broker.publisher import Publisher, publish_delivery
from schemas.delivery import Delivery
from tests.conftest import HMAC_SECRET, ROOT, SHOPIFY_SECRET, WRITE_KEY, eventually
from tests.support.samples import customer

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 "
          "Mobile/15E148 Safari/604.1")


async def post(http, url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    async with http.post(url, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def dead_letter_ids(system) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "adapters.cli", "dlq", "list", "--queue", "events", "--json"], cwd=ROOT, env=system.env,
                         capture_output=True, text=True, timeout=60, check=True)
    return {letter["message_id"] for letter in json.loads(out.stdout)}


async def quarantined(system, key: str) -> dict:
    return await eventually(lambda: system.db.quarantine.find_one({"_id": key}), timeout=60)


async def test_a_lone_surrogate_message_id_is_a_400_with_its_code(receiver, http):
    body = b'{"userId": "u-1", "messageId": "m-\\ud800", "traits": {"plan": "pro"}}'
    status, problem = await post(http, f"{receiver}/v1/identify", body, AUTH)
    assert (status, problem["error"]) == (400, "invalid_unicode")
    assert "messageId" in problem["detail"]


async def test_nan_in_a_tracking_body_is_a_400(receiver, http):
    body = b'{"userId": "u-1", "event": "Order Completed", "properties": {"order_id": "o-1", "total": NaN}}'
    status, problem = await post(http, f"{receiver}/v1/track", body, AUTH)
    assert (status, problem["error"]) == (400, "invalid_number")


async def test_a_batch_of_2501_messages_is_a_400(receiver, http):
    """Refused whole, before any message is queued (that 2,500 pass is a unit test: queuing them here would load
    the shared system for the tests after this one)."""
    item = {"type": "identify", "userId": f"batch-{uuid.uuid4().hex[:8]}"}
    status, problem = await post(http, f"{receiver}/v1/batch", json.dumps({"batch": [item] * 2_501}).encode(), AUTH)
    assert (status, problem["error"]) == (400, "batch_too_large")
    assert "2500" in problem["detail"]


async def test_a_signed_shopify_body_with_a_lone_surrogate_is_a_400(receiver, http):
    body = json.dumps(customer("surrogate@example.com", first_name="\udbff")).encode()  # json.dumps escapes it: \udbff
    headers = {"Content-Type": "application/json", "X-Shopify-Topic": "customers/update", "X-Shopify-Webhook-Id": uuid.uuid4().hex,
               "X-Shopify-Hmac-Sha256": sign(body, SHOPIFY_SECRET)}
    status, problem = await post(http, f"{receiver}/webhooks/shopify", body, headers)
    assert (status, problem["error"]) == (400, "invalid_unicode")


async def test_header_bytes_that_are_not_utf8_are_a_400_not_a_500(receiver):
    """The webhook id names the delivery (and its Redis key): bytes that are not UTF-8 there are refused."""
    body = json.dumps(customer("header-bytes@example.com")).encode()
    head = (f"POST /webhooks/shopify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Shopify-Topic: customers/update\r\n"
            f"X-Shopify-Hmac-Sha256: {sign(body, SHOPIFY_SECRET)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n").encode()
    url = urlsplit(receiver)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(head + b"X-Shopify-Webhook-Id: w-\xff\xfe\r\n\r\n" + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"400"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "invalid_unicode"


async def test_a_configured_senders_absurd_amount_is_quarantined_with_its_reason_not_retried(receiver, system, http):
    uid = f"P-{uuid.uuid4().hex[:8]}"
    email = f"absurd-{uuid.uuid4().hex[:8]}@example.com"
    # 10^28 cents: 10^26 in the order total, beyond what Decimal enrichment can quantize (and an integer BSON cannot hold).
    body = json.dumps({"kind": "purchase", "uid": uid, "at": "2025-04-01T09:30:00Z", "amount_cents": 10**28,
                       "buyer": {"email": email}}).encode()
    signature = "sha256=" + base64.b64encode(hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).digest()).decode()
    status, reply = await post(http, f"{receiver}/webhooks/legacy", body, {"X-Legacy-Signature": signature})
    assert status == 202
    (message_id,) = reply["message_ids"]

    doc = await quarantined(system, f"legacy:{uid}")
    assert doc["reasons"] == ["order.completed:order.completed.total:less_than_equal"]
    assert doc["attempts"] == 1
    assert Quarantine.delivery(doc)["payload"]["amount_cents"] == 10**28  # kept whole, though BSON cannot hold the integer
    assert email not in json.dumps(doc["errors"])
    assert message_id not in await asyncio.to_thread(dead_letter_ids, system)
    assert await system.db.profiles.find_one({"email": email}) is None


async def test_a_trait_with_a_lone_surrogate_that_reaches_the_worker_is_quarantined_whole(system):
    """Published straight to the queue, as a sender the receiver does not check could: the worker refuses it."""
    user = f"sur-{uuid.uuid4().hex[:8]}"
    delivery = Delivery(source="tracking", topic="identify", delivery_id=f"m-{user}-\ud800", received_at=datetime.now(timezone.utc),
                        payload={"type": "identify", "userId": user, "messageId": f"m-{user}-\ud800",
                                 "traits": {"first_name": "Ada\ud800", "plan": "pro"}})
    queue = topology.events_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    message_id = await publish_delivery(publisher, queue, delivery)
    await publisher.close()

    doc = await quarantined(system, f"tracking:m-{user}-\\ud800")
    # The event id is made of the delivery id: both are named.
    assert doc["reasons"] == ["customer.identified:customer.identified.event_id:invalid_unicode",
                              "customer.identified:customer.identified.traits.first_name:invalid_unicode"]
    assert doc["attempts"] == 1
    assert doc["delivery"]["kept_as"] == "delivery_json" and doc["delivery"]["topic"] == "identify"
    assert Quarantine.delivery(doc) == delivery.model_dump(mode="json")  # the original, surrogates and all, for a redrive
    assert message_id not in await asyncio.to_thread(dead_letter_ids, system)
    assert await system.db.profiles.find_one({"identifiers.tracking": user}) is None


async def test_a_28kb_user_agent_is_cut_before_parsing(receiver, system, http):
    """Past the first 512 characters the UA says Googlebot: the stored device traits come from the cut one."""
    user = f"ua-{uuid.uuid4().hex[:8]}"
    agent = IPHONE.ljust(512) + " Googlebot/2.1 (+http://www.google.com/bot.html)" + " (Linux; " * 3_100
    assert 28_000 < len(agent) < 32_000
    body = json.dumps({"userId": user, "traits": {"plan": "pro"}, "context": {"userAgent": agent}}).encode()
    status, _ = await post(http, f"{receiver}/v1/identify", body, AUTH)
    assert status == 200

    async def derived():
        doc = await system.db.profiles.find_one({"identifiers.tracking": user})
        return doc if doc and "device" in doc["traits"] else None

    doc = await eventually(derived, timeout=60)
    assert {name: doc["traits"][name]["value"] for name in ("device", "os", "client")} == \
        {"device": "iPhone", "os": "iOS 17", "client": "Mobile Safari 17"}
