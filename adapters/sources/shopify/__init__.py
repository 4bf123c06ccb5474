"""Shopify webhooks: HMAC verification and the mapping into canonical events.

Event ids are derived from the content (entity id and its own timestamp), not
from delivery headers, so a retried webhook, a second topic about the same
order and a later REST pull of the same record all name the same event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from adapters.sources.base import Inbound, Rejected, WebhookSource, json_object, validate_events
from adapters.sources.mapped import context
from schemas.delivery import Delivery
from schemas.errors import UnsupportedEvent
from schemas.events import Event

NAME = "shopify"

CUSTOMER_TOPICS = {"customers/create": "customer.identified", "customers/update": "customer.updated"}
ORDER_TOPICS = {"orders/create", "orders/paid", "orders/updated", "orders/cancelled"}
CHECKOUT_TOPICS = {"checkouts/create": "checkout.started", "checkouts/update": "checkout.updated"}
CONSENT_TOPICS = {"customers/marketing_consent_update", "customers_email_marketing_consent/update"}
ERASURE_TOPIC = "customers/redact"
TOPICS = frozenset({*CUSTOMER_TOPICS, *ORDER_TOPICS, *CHECKOUT_TOPICS, *CONSENT_TOPICS, ERASURE_TOPIC})

_CONSENT_STATES = {
    "subscribed": "subscribed",
    "unsubscribed": "unsubscribed",
    "not_subscribed": "not_subscribed",
    "pending": "pending",
    "redacted": "unsubscribed",
    "invalid": "not_subscribed",
}
_TRAITS = ("first_name", "last_name", "phone", "tags", "currency", "state", "verified_email")


def sign(body: bytes, secret: str) -> str:
    """The value Shopify puts in ``X-Shopify-Hmac-Sha256`` for ``body``."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


class ShopifySource(WebhookSource):
    """``POST /webhooks/shopify``. Accepts any of several secrets, for rotation."""

    name = NAME
    topics = TOPICS

    def __init__(self, secrets: Sequence[str]) -> None:
        self._secrets = tuple(secrets)

    def accept(self, inbound: Inbound) -> list[Delivery]:
        self.verify(inbound.headers, inbound.body)
        topic = inbound.headers.get("X-Shopify-Topic")
        if topic and topic not in TOPICS:
            # Answered 2xx and counted as ignored: a refusal would make Shopify retry, then drop the subscription.
            return []
        return [self.delivery(inbound.headers, json_object(inbound.body), inbound.received_at)]

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        given = headers.get("X-Shopify-Hmac-Sha256")
        if not given:
            raise Rejected(401, "missing_signature")
        if not self._secrets:
            raise Rejected(401, "invalid_signature", "no secret configured for this source")
        given_bytes = given.encode()
        # Compare against every secret, without short-circuit, in constant time each.
        matched = [hmac.compare_digest(sign(body, s).encode(), given_bytes) for s in self._secrets]
        if not any(matched):
            raise Rejected(401, "invalid_signature")

    def delivery(self, headers: Mapping[str, str], payload: dict[str, Any], received_at: datetime) -> Delivery:
        topic = headers.get("X-Shopify-Topic")
        if not topic:
            raise Rejected(400, "missing_topic")
        if topic not in TOPICS:
            raise Rejected(422, "unsupported_topic", f"topic {topic!r} has no mapping")
        webhook_id, event_id = headers.get("X-Shopify-Webhook-Id"), headers.get("X-Shopify-Event-Id")
        delivery_id = webhook_id or event_id
        if not delivery_id:
            raise Rejected(400, "missing_delivery_id")
        meta = {
            key: headers[header]
            for key, header in (
                ("shop_domain", "X-Shopify-Shop-Domain"),
                ("api_version", "X-Shopify-API-Version"),
                ("shopify_event_id", "X-Shopify-Event-Id"),
            )
            if headers.get(header)
        }
        triggered = headers.get("X-Shopify-Triggered-At")
        return Delivery(
            source=NAME,
            topic=topic,
            delivery_id=delivery_id,
            # Shopify's advice: the event id is shared by every retry of one merchant action.
            dedup_key=f"shopify:{topic}:{event_id or webhook_id}",
            received_at=received_at,
            triggered_at=_parse_time(triggered) if triggered else None,
            meta=meta,
            payload=payload,
        )

    def to_events(self, delivery: Delivery) -> list[Event]:
        return to_events(delivery)


def to_events(delivery: Delivery) -> list[Event]:
    """Map one Shopify delivery to canonical events. Pure."""
    topic, p = delivery.topic, delivery.payload
    if topic in CUSTOMER_TOPICS:
        raw = _customer_events(delivery, CUSTOMER_TOPICS[topic])
    elif topic in ORDER_TOPICS:
        raw = [_order_event(delivery)]
    elif topic in CHECKOUT_TOPICS:
        raw = [_checkout_event(delivery, CHECKOUT_TOPICS[topic])]
    elif topic == "customers_email_marketing_consent/update":
        consent = p.get("email_marketing_consent") or {}
        identity = {"email": p.get("email_address"), "customer_id": _id_str(p.get("customer_id"))}
        raw = [_consent(delivery, identity, "email", consent, _id_str(p.get("customer_id")))]
    elif topic == ERASURE_TOPIC:
        # Shopify's mandatory privacy webhook: the shop must forget this customer.
        customer = p.get("customer") or {}
        cid = _id_str(customer.get("id"))
        identity = {"email": customer.get("email"), "customer_id": cid, "phone": customer.get("phone")}
        raw = [{**_base(delivery, f"shopify:redact:{cid}", None, identity), "type": "customer.erased"}]
    elif topic == "customers/marketing_consent_update":
        consent = p.get("sms_marketing_consent") or {}
        identity = {"email": p.get("email"), "customer_id": _customer_id(p)}
        raw = [_consent(delivery, identity, "sms", consent, _customer_id(p))]
    else:
        raise UnsupportedEvent(f"shopify topic {topic!r} has no mapping")
    return validate_events(raw)


def _base(delivery: Delivery, event_id: str, event_time: Any, identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "source": NAME,
        "event_time": event_time or delivery.triggered_at or delivery.received_at,
        "timed": bool(event_time or delivery.triggered_at),
        "received_at": delivery.received_at,
        "identity": identity,
    }


def _customer_events(delivery: Delivery, kind: str) -> list[dict[str, Any]]:
    p = delivery.payload
    cid = _customer_id(p)
    at = p.get("updated_at") or p.get("created_at")
    identity = {"email": p.get("email"), "customer_id": cid}
    traits = {name: p.get(name) for name in _TRAITS if name in p}
    address = p.get("default_address") or {}
    for name, key in (("city", "city"), ("country", "country_code"), ("province", "province_code")):
        if key in address:
            traits[name] = address.get(key)
    events = [{**_base(delivery, f"shopify:customer:{cid}:{at}", at, identity), "type": kind, "traits": traits}]
    # Consent embedded in a customer payload counts only with its own time: stamped with the customer's
    # updated_at, any unrelated edit would re-assert a stale "subscribed" over a newer unsubscribe.
    consent = p.get("email_marketing_consent")
    if consent and consent.get("state") and consent.get("consent_updated_at"):
        events.append(_consent(delivery, identity, "email", consent, cid))
    elif isinstance(p.get("accepts_marketing"), bool) and p.get("accepts_marketing_updated_at"):
        legacy = {
            "state": "subscribed" if p["accepts_marketing"] else "not_subscribed",
            "consent_updated_at": p["accepts_marketing_updated_at"],
        }
        events.append(_consent(delivery, identity, "email", legacy, cid))
    return events


def _consent(
    delivery: Delivery,
    identity: dict[str, Any],
    channel: str,
    consent: Mapping[str, Any],
    cid: str | None,
    fallback_time: Any = None,
) -> dict[str, Any]:
    at = consent.get("consent_updated_at") or fallback_time
    state = consent.get("state")
    # Without a consent time, Shopify's event id (shared by every retry) names the happening.
    stamp = at or delivery.meta.get("shopify_event_id") or delivery.delivery_id
    event_id = f"shopify:consent:{channel}:{cid}:{stamp}"
    return {
        **_base(delivery, event_id, at, identity),
        "type": "consent.changed",
        "channel": channel,
        "state": _CONSENT_STATES.get(state, state),
    }


def _order_event(delivery: Delivery) -> dict[str, Any]:
    p = delivery.payload
    customer = p.get("customer") or {}
    identity = {"email": customer.get("email") or p.get("email") or p.get("contact_email"), "customer_id": _customer_id(customer)}
    order_id = _entity_id(p)
    client = p.get("client_details") or {}
    # The order's own last change orders its states: paid after created, cancelled after paid.
    at = p.get("updated_at") or p.get("processed_at") or p.get("created_at")
    return {
        **_base(delivery, f"shopify:order:{order_id}:{at}", at, identity),
        "type": "order.completed",
        "order_id": order_id,
        "total": p.get("total_price"),
        "currency": p.get("currency"),
        "items": _items(p.get("line_items") or []),
        "cancelled": p.get("cancelled_at") is not None,
        "test": bool(p.get("test")),
        "context": context(p.get("browser_ip") or client.get("browser_ip"), client.get("user_agent")),
    }


def _checkout_event(delivery: Delivery, kind: str) -> dict[str, Any]:
    p = delivery.payload
    customer = p.get("customer") or {}
    # As for orders: the customer's own email goes with the customer's id, never another contact's.
    identity = {"email": customer.get("email") or p.get("email"), "customer_id": _customer_id(customer)}
    checkout_id = str(p.get("token") or _entity_id(p))
    at = p.get("updated_at") or p.get("created_at")
    return {
        **_base(delivery, f"shopify:checkout:{checkout_id}:{at}", at, identity),
        "type": kind,
        "checkout_id": checkout_id,
        "url": p.get("abandoned_checkout_url"),
        "total": p.get("total_price"),
        "currency": p.get("currency"),
        "items": _items(p.get("line_items") or []),
        "completed": p.get("completed_at") is not None,
    }


def _items(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "product_id": _id_str(line.get("product_id")),
            "title": line.get("title"),
            "category": line.get("product_type") or None,
            "price": line.get("price") or "0",
            "quantity": line.get("quantity") or 1,
        }
        for line in lines
    ]


def _entity_id(p: Mapping[str, Any]) -> str | None:
    """The true id: ``admin_graphql_api_id`` survives JSON float round trips, ``id`` may not."""
    gid = p.get("admin_graphql_api_id")
    if isinstance(gid, str) and "/" in gid:
        return gid.rsplit("/", 1)[1]
    return _id_str(p.get("id"))


def _customer_id(p: Mapping[str, Any]) -> str | None:
    return _entity_id(p) if p else None


def _id_str(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    return str(value)


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
