"""Every kind of sender, end to end, with the senders' own client libraries producing the requests:
receiver -> RabbitMQ -> workers -> MongoDB profile (and the Mailchimp member)."""

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlencode

import rudderstack.analytics.client as rudder
import standardwebhooks
import stripe
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from segment.analytics import Client as SegmentClient
from segment.analytics.request import APIError

from adapters.sources.mailchimp import mandrill_signature
from tests.conftest import (
    HMAC_SECRET,
    MAILCHIMP_URL_SECRET,
    MANDRILL_KEY,
    SENDGRID_KEY,
    STANDARD_SECRET,
    STRIPE_SECRET,
    WRITE_KEY,
    eventually,
)
from tests.support.metrics import value


def fresh_email(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}@example.com"


async def profile_where(system, email, check, timeout=20.0):
    async def probe():
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc and check(doc) else None

    return await eventually(probe, timeout=timeout)


async def post(http, url, body: bytes, headers: dict) -> tuple[int, dict]:
    async with http.post(url, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_standard_webhooks_sender(receiver, system, http):
    email = fresh_email("crm")
    body = json.dumps({"type": "contact.updated", "data": {"id": 991, "email": email, "first_name": "Sam", "last_name": "Lee",
                                                           "updated_at": "2025-03-01T12:00:00Z", "revision": 7}}).encode()
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(timezone.utc)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": standardwebhooks.Webhook(STANDARD_SECRET).sign(msg_id, now, body.decode()),
               "Content-Type": "application/json"}
    status, reply = await post(http, f"{receiver}/webhooks/crm", body, headers)
    assert status == 202 and len(reply["message_ids"]) == 1
    status, again = await post(http, f"{receiver}/webhooks/crm", body, headers)
    assert status == 202 and again == {"status": "accepted", "message_ids": [], "duplicates": 1}
    doc = await profile_where(system, email, lambda d: "first_name" in d["traits"])
    assert doc["traits"]["first_name"]["value"] == "Sam"
    assert doc["traits"]["first_name"]["source"] == "crm"
    assert doc["identifiers"]["crm"] == ["991"]

    unmapped = json.dumps({"type": "contact.deleted", "data": {"id": 991}}).encode()
    other_id = f"msg_{uuid.uuid4().hex}"
    headers |= {"webhook-id": other_id, "webhook-signature": standardwebhooks.Webhook(STANDARD_SECRET).sign(other_id, now, unmapped.decode())}
    status, reply = await post(http, f"{receiver}/webhooks/crm", unmapped, headers)
    assert status == 202 and reply["message_ids"] == []


async def test_stripe_style_sender_with_the_stripe_preset(receiver, system, http):
    email = fresh_email("billing")
    event = {"id": f"evt_{uuid.uuid4().hex[:12]}", "type": "invoice.paid", "created": int(time.time()),
             "data": {"object": {"id": f"in_{uuid.uuid4().hex[:8]}", "customer": "cus_1", "customer_email": email,
                                 "amount_paid": 123456, "currency": "eur"}}}
    body = json.dumps(event)
    headers = {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, STRIPE_SECRET),
               "Content-Type": "application/json"}
    status, _ = await post(http, f"{receiver}/webhooks/billing", body.encode(), headers)
    assert status == 202
    doc = await profile_where(system, email, lambda d: d["computed"]["order_count"] == 1)
    assert doc["computed"]["lifetime_value"] == "1234.56"
    assert doc["computed"]["loyalty_tier"] == "gold"


async def test_generic_hmac_sender_by_configuration(receiver, system, http):
    email = fresh_email("legacy")
    body = json.dumps({"kind": "purchase", "uid": f"P-{uuid.uuid4().hex[:6]}", "at": "2025-04-01T09:30:00+02:00",
                       "amount_cents": 4999, "buyer": {"email": email}}).encode()
    signature = "sha256=" + base64.b64encode(hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).digest()).decode()
    status, _ = await post(http, f"{receiver}/webhooks/legacy", body, {"X-Legacy-Signature": signature})
    assert status == 202
    status, problem = await post(http, f"{receiver}/webhooks/legacy", body, {"X-Legacy-Signature": "sha256=AAAA"})
    assert (status, problem["error"]) == (401, "invalid_signature")
    doc = await profile_where(system, email, lambda d: d["computed"]["order_count"] == 1)
    assert doc["computed"]["lifetime_value"] == "49.99"
    order = next(iter(doc["orders"].values()))
    assert order["currency"] == "EUR"


async def test_official_segment_sdk_unchanged(receiver, system, sandbox, http):
    email = fresh_email("segment")
    errors = []
    client = SegmentClient(WRITE_KEY, host=receiver, sync_mode=True, gzip=True, max_retries=1,
                           on_error=lambda e, batch: errors.append(e))

    def send():
        client.identify("user-seg-1" + email, {"email": email, "firstName": "Ina", "first_name": "Ina"},
                        context={"timezone": "Europe/Oslo", "ip": "81.2.69.160",
                                 "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"})
        client.track("user-seg-1" + email, "Product Viewed", {"product_id": "p1", "category": "Shoes"})
        client.track("user-seg-1" + email, "Order Completed",
                     {"order_id": f"o-{uuid.uuid4().hex[:6]}", "total": 300, "currency": "NOK", "products": [{"product_id": "p1", "price": 300, "category": "Shoes"}]})
        client.page("user-seg-1" + email, "Docs", "Home")
        client.flush()

    await asyncio.to_thread(send)
    assert errors == []
    doc = await profile_where(system, email, lambda d: d["computed"]["order_count"] == 1 and d["categories_viewed"])
    assert doc["traits"]["first_name"]["value"] == "Ina"
    assert doc["traits"]["timezone"]["value"] == "Europe/Oslo"
    # Enriched from the context: location from the IP (test GeoIP database), client from the user agent.
    assert doc["traits"]["geo_city"]["value"] == "London"
    assert doc["traits"]["client"]["value"] == "Chrome 126"
    assert "81.2.69.160" not in str(doc)
    assert doc["categories_viewed"] == ["Shoes"]
    assert doc["identifiers"]["tracking"] == ["user-seg-1" + email]
    member = await eventually(lambda: sandbox.member(http, email))
    assert member["merge_fields"]["FNAME"] == "Ina"

    bad = SegmentClient("wrong-key", host=receiver, sync_mode=True, max_retries=1)

    def refused():
        try:
            bad.identify("u", {"email": email})
        except APIError as exc:
            return exc
        return None

    error = await asyncio.to_thread(refused)
    assert error is not None and (error.status, error.code) == (401, "invalid_write_key")


async def test_official_rudderstack_sdk_unchanged(receiver, system, http):
    email = fresh_email("rudder")
    errors = []
    client = rudder.Client(WRITE_KEY, host=receiver, sync_mode=True, gzip=True, max_retries=1,
                           on_error=lambda e, batch: errors.append(e))

    def send():
        client.identify("user-rs-" + email, {"email": email, "last_name": "Rudd"})
        client.flush()

    await asyncio.to_thread(send)
    assert errors == []
    doc = await profile_where(system, email, lambda d: "last_name" in d["traits"])
    assert doc["traits"]["last_name"]["value"] == "Rudd"


async def test_tracking_api_contract(receiver, http):
    auth = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    big = {"userId": "u", "traits": {"blob": "x" * 33_000}}
    async with http.post(f"{receiver}/v1/identify", json=big, headers=auth) as r:
        assert (r.status, (await r.json())["error"]) == (400, "message_too_large")
    async with http.post(f"{receiver}/v1/track", json={"userId": "u"}, headers=auth) as r:
        assert (r.status, (await r.json())["error"]) == (400, "invalid_message")
    async with http.post(f"{receiver}/v1/identify", json={"traits": {}}, headers=auth) as r:
        assert r.status == 400
    async with http.post(f"{receiver}/v1/identify", json={"userId": "u", "writeKey": WRITE_KEY}) as r:
        assert r.status == 200 and await r.json() == {"success": True}
    async with http.post(f"{receiver}/v1/identify", json={"userId": "u"}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "missing_write_key")
    for call in ("screen", "group", "alias"):
        async with http.post(f"{receiver}/v1/{call}", json={"userId": "u", "previousId": "a", "groupId": "g"}, headers=auth) as r:
            assert r.status == 200
    async with http.post(f"{receiver}/v1/nope", json={"userId": "u"}, headers=auth) as r:
        assert r.status == 404
    duplicate = {"userId": "u", "messageId": f"m-{uuid.uuid4().hex}"}
    async with http.post(f"{receiver}/v1/batch", json={"batch": [{**duplicate, "type": "identify"}]}, headers=auth) as r:
        assert r.status == 200
    async with http.post(f"{receiver}/metrics") as r:
        assert r.status == 405
    async with http.get(f"{receiver}/metrics") as r:
        text = await r.text()
    assert value(text, "mergetag_deliveries_total", source="tracking", outcome="rejected", reason="message_too_large") >= 1


def _sendgrid_headers(body: bytes, at: int | None = None) -> dict[str, str]:
    stamp = str(at or int(time.time()))
    signature = SENDGRID_KEY.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp, "Content-Type": "application/json"}


async def test_sendgrid_opens_give_a_preferred_send_hour_and_unsubscribes_win(receiver, system, sandbox, http):
    email = fresh_email("sendgrid")
    from tests.conftest import post_webhook
    from tests.support.samples import customer

    assert (await post_webhook(http, receiver, "customers/create", customer(email))).status == 202
    member = await eventually(lambda: sandbox.member(http, email))
    assert member["status"] == "subscribed"

    day = datetime(2025, 5, 1, tzinfo=timezone.utc).timestamp()
    opens = [{"email": email, "timestamp": int(day + h * 3600 + d * 86400), "event": "open", "sg_event_id": uuid.uuid4().hex,
              "sg_message_id": "m1", "singlesend_id": "ss1"} for d, h in ((0, 18), (1, 18), (2, 7), (3, 18))]
    body = json.dumps(opens + [{"email": email, "timestamp": int(day + 5 * 86400), "event": "delivered", "sg_event_id": uuid.uuid4().hex}]).encode()
    status, reply = await post(http, f"{receiver}/webhooks/sendgrid", body, _sendgrid_headers(body))
    assert status == 200 and len(reply["message_ids"]) == 5
    doc = await profile_where(system, email, lambda d: len(d["email_opens"]) == 4)
    assert doc["computed"]["preferred_send_hour"] == 18
    assert doc["computed"]["last_email_open"].replace(tzinfo=timezone.utc) == datetime(2025, 5, 4, 18, tzinfo=timezone.utc)

    status, problem = await post(http, f"{receiver}/webhooks/sendgrid", body, _sendgrid_headers(body, at=int(time.time()) - 3600))
    assert (status, problem["error"]) == (401, "timestamp_out_of_tolerance")
    tampered = body.replace(b"open", b"click", 1)
    status, problem = await post(http, f"{receiver}/webhooks/sendgrid", tampered, _sendgrid_headers(body))
    assert (status, problem["error"]) == (401, "invalid_signature")

    unsubscribe = json.dumps([{"email": email, "timestamp": int(time.time()), "event": "unsubscribe", "sg_event_id": uuid.uuid4().hex}]).encode()
    status, _ = await post(http, f"{receiver}/webhooks/sendgrid", unsubscribe, _sendgrid_headers(unsubscribe))
    assert status == 200

    async def unsubscribed():
        m = await sandbox.member(http, email)
        return m if m["status"] == "unsubscribed" else None

    await eventually(unsubscribed)


async def test_mailchimp_mandrill_and_audience_webhooks(receiver, system, sandbox, http):
    email = fresh_email("mandrill")
    events = [{"event": "open", "_id": uuid.uuid4().hex, "ts": int(datetime(2025, 6, 1, 9, tzinfo=timezone.utc).timestamp()),
               "msg": {"email": email, "_id": "m1"}},
              {"event": "click", "_id": uuid.uuid4().hex, "ts": int(time.time()), "url": "https://shop.example/x",
               "msg": {"email": email, "_id": "m1"}}]
    params = [("mandrill_events", json.dumps(events))]
    url = f"{receiver}/webhooks/mailchimp"
    headers = {"X-Mandrill-Signature": mandrill_signature(MANDRILL_KEY, url, params),
               "Content-Type": "application/x-www-form-urlencoded"}
    status, reply = await post(http, url, urlencode(params).encode(), headers)
    assert status == 200 and len(reply["message_ids"]) == 2
    doc = await profile_where(system, email, lambda d: d.get("last_email_click") and d.get("last_email_open"))
    assert doc["computed"]["preferred_send_hour"] == 9
    status, problem = await post(http, url, urlencode(params).encode(), {**headers, "X-Mandrill-Signature": "bad"})
    assert (status, problem["error"]) == (401, "invalid_signature")

    async with http.head(url) as r:
        assert r.status == 200
    form = {"type": "unsubscribe", "fired_at": "2025-06-02 10:00:00", "data[email]": email, "data[id]": "abc", "data[list_id]": "sandbox"}
    status, problem = await post(http, f"{url}?key=wrong", urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, problem["error"]) == (401, "invalid_signature")
    status, _ = await post(http, f"{url}?key={MAILCHIMP_URL_SECRET}", urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    doc = await profile_where(system, email, lambda d: d["consent"].get("email", {}).get("state") == "unsubscribed")
    assert doc["consent"]["email"]["source"] == "mailchimp"
