"""A Segment-compatible tracking API: ``/v1/identify|track|page|screen|group|alias|batch``.

Write-key auth (HTTP Basic username, or ``writeKey`` in the body), gzip bodies,
Segment's limits (32 KB per message, 500 KB per request, 2,500 messages per batch,
all 400), and one delivery per message de-duplicated on ``messageId``. The official Segment and
RudderStack SDKs, pointed here with ``host=``, work unchanged.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import json
import uuid
import zlib
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from adapters.sources.base import Inbound, Rejected, header, json_object, validate_events
from adapters.sources.mapped import context as event_context
from schemas.delivery import Delivery
from schemas.events import Event

NAME = "tracking"
CALLS = ("identify", "track", "page", "screen", "group", "alias")
MAX_MESSAGE = 32 * 1024
MAX_REQUEST = 500 * 1024
MAX_BATCH = 2_500

# Segment's e-commerce spec event names -> canonical types.
ORDER_EVENTS = {"Order Completed"}
PRODUCT_EVENTS = {"Product Viewed"}
CHECKOUT_EVENTS = {"Checkout Started": "checkout.started", "Checkout Step Completed": "checkout.updated"}
EMAIL_EVENTS = {"Email Opened": "email.opened", "Email Link Clicked": "email.clicked"}


class TrackingSource:
    """The tracking API. ``write_keys``: accepted keys, several at once for rotation."""

    name = NAME

    def __init__(self, write_keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in write_keys]

    def accept(self, inbound: Inbound) -> list[Delivery]:
        call = inbound.path.rstrip("/").rsplit("/", 1)[-1]
        if call not in (*CALLS, "batch"):
            raise Rejected(404, "unknown_call")
        body = self._decode(inbound)
        self._authenticate(inbound.headers, body)
        messages = body.get("batch") if call == "batch" else [{**body, "type": body.get("type", call)}]
        if not isinstance(messages, list) or not messages:
            raise Rejected(400, "invalid_batch", "batch must be a non-empty list")
        if len(messages) > MAX_BATCH:
            raise Rejected(400, "batch_too_large", f"a batch holds at most {MAX_BATCH} messages, this one {len(messages)}")
        shared_context = body.get("context") if call == "batch" and isinstance(body.get("context"), dict) else {}
        deliveries = []
        for index, message in enumerate(messages):
            self._check(index, message)
            message = {k: v for k, v in message.items() if k != "writeKey"}
            if shared_context:
                message["context"] = {**shared_context, **(message.get("context") or {})}
            message_id = str(message.get("messageId") or uuid.uuid4())
            deliveries.append(Delivery(
                source=NAME, topic=message["type"], delivery_id=message_id,
                dedup_key=f"{NAME}:{message_id}" if message.get("messageId") else None,
                received_at=inbound.received_at, payload=message,
            ))
        return deliveries

    def _decode(self, inbound: Inbound) -> dict[str, Any]:
        raw = inbound.body
        # aiohttp already inflates ``Content-Encoding: gzip``; inflate here only what is still gzip.
        if raw[:2] == b"\x1f\x8b":
            try:
                decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                raw = decompressor.decompress(raw, MAX_REQUEST + 1)
            except (zlib.error, gzip.BadGzipFile):
                raise Rejected(400, "invalid_gzip") from None
        if len(raw) > MAX_REQUEST:
            raise Rejected(400, "request_too_large", f"limit is {MAX_REQUEST} bytes")
        return json_object(raw)

    def _authenticate(self, headers: Any, body: dict[str, Any]) -> None:
        key = None
        scheme, _, value = (header(headers, "Authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(value, validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                raise Rejected(401, "invalid_write_key") from None
        key = key or (body.get("writeKey") if isinstance(body.get("writeKey"), str) else None)
        if not key:
            raise Rejected(401, "missing_write_key")
        given = key.encode()
        if not any([hmac.compare_digest(given, k) for k in self._keys]):
            raise Rejected(401, "invalid_write_key")

    @staticmethod
    def _check(index: int, message: Any) -> None:
        where = f"message {index}"
        if not isinstance(message, dict):
            raise Rejected(400, "invalid_message", f"{where} is not an object")
        if message.get("type") not in CALLS:
            raise Rejected(400, "invalid_message", f"{where}: unknown type")
        if len(json.dumps(message)) > MAX_MESSAGE:
            raise Rejected(400, "message_too_large", f"{where} is over {MAX_MESSAGE} bytes")
        if not (message.get("userId") or message.get("anonymousId")):
            raise Rejected(400, "invalid_message", f"{where}: userId or anonymousId is required")
        if message["type"] == "track" and not message.get("event"):
            raise Rejected(400, "invalid_message", f"{where}: track needs an event")

    def reply(self, message_ids: list[str], duplicates: int) -> tuple[int, dict[str, Any]]:
        return 200, {"success": True}

    def to_events(self, delivery: Delivery) -> list[Event]:
        return to_events(delivery)


def to_events(delivery: Delivery) -> list[Event]:
    return validate_events(_raw_events(delivery))


def _raw_events(delivery: Delivery) -> list[dict[str, Any]]:
    """Map one tracking message. Calls without a canonical meaning (group, alias, other
    track events) map to no event: they are accepted, counted and left out on purpose."""
    m = delivery.payload
    context = m.get("context") if isinstance(m.get("context"), dict) else {}
    traits = {**(context.get("traits") or {}), **(m.get("traits") or {})} if m["type"] == "identify" else dict(context.get("traits") or {})
    properties = m.get("properties") if isinstance(m.get("properties"), dict) else {}
    base = {
        "event_id": f"{NAME}:{delivery.delivery_id}",
        "source": NAME,
        "event_time": m.get("timestamp") or m.get("originalTimestamp") or delivery.received_at,
        "timed": bool(m.get("timestamp") or m.get("originalTimestamp")),
        "received_at": delivery.received_at,
        "identity": {"email": traits.get("email") or properties.get("email"), "customer_id": _str(m.get("userId")),
                     "anonymous_id": _str(m.get("anonymousId"))},
        "context": event_context(context.get("ip"), context.get("userAgent")),
    }
    kind, event = m["type"], m.get("event")
    if kind == "identify":
        profile_traits = {k: v for k, v in traits.items() if k != "email" and _scalar(v)}
        for key in ("timezone", "locale"):
            if isinstance(context.get(key), str):
                profile_traits.setdefault(key, context[key])
        return [{**base, "type": "customer.identified", "traits": profile_traits}]
    if kind in ("page", "screen"):
        visit = {k: context[k] for k in ("timezone", "locale") if isinstance(context.get(k), str)}
        return [{**base, "type": "customer.updated", "traits": visit}]
    if kind != "track":
        return []
    if event in ORDER_EVENTS:
        return [{**base, "type": "order.completed", "order_id": _str(properties.get("order_id")),
                 "total": _money(properties.get("total", properties.get("revenue"))), "currency": properties.get("currency"),
                 "items": [_item(p) for p in properties.get("products") or [] if isinstance(p, dict)]}]
    if event in PRODUCT_EVENTS:
        return [{**base, "type": "product.viewed", "product_id": _str(properties.get("product_id")),
                 "title": properties.get("name"), "category": properties.get("category"), "url": properties.get("url")}]
    if event in CHECKOUT_EVENTS:
        return [{**base, "type": CHECKOUT_EVENTS[event], "checkout_id": _str(properties.get("checkout_id") or properties.get("order_id")),
                 "total": _money(properties.get("value", properties.get("revenue", 0))), "currency": properties.get("currency"),
                 "items": [_item(p) for p in properties.get("products") or [] if isinstance(p, dict)]}]
    if event in EMAIL_EVENTS:
        return [{**base, "type": EMAIL_EVENTS[event], "esp": str(properties.get("email_service") or "tracking"),
                 "campaign_id": _str(properties.get("campaign_id")),
                 **({"url": properties.get("link_url")} if EMAIL_EVENTS[event] == "email.clicked" else {})}]
    return []


def _item(p: dict[str, Any]) -> dict[str, Any]:
    return {"product_id": _str(p.get("product_id")), "title": p.get("name"), "category": p.get("category"),
            "price": _money(p.get("price", 0)), "quantity": p.get("quantity") or 1}


def _money(value: Any) -> Any:
    try:
        return Decimal(str(value)) if value is not None else None
    except InvalidOperation:
        return value


def _str(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else str(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


