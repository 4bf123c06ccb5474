from datetime import datetime, timezone
from decimal import Decimal

import pytest

from adapters.sources.base import Rejected
from adapters.sources.shopify import ShopifySource, sign, to_events
from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from tests.support.samples import sample

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def delivery(topic: str, payload: dict) -> Delivery:
    return Delivery(source="shopify", topic=topic, delivery_id="d1", received_at=NOW, payload=payload)


def test_signature_accepts_any_current_secret_for_rotation():
    body = b'{"id": 1}'
    source = ShopifySource(["new-secret", "old-secret"])
    source.verify({"X-Shopify-Hmac-Sha256": sign(body, "old-secret")}, body)
    source.verify({"X-Shopify-Hmac-Sha256": sign(body, "new-secret")}, body)


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_signature"), ({"X-Shopify-Hmac-Sha256": "bm9wZQ=="}, "invalid_signature")],
)
def test_signature_refusals(headers, code):
    with pytest.raises(Rejected) as exc:
        ShopifySource(["s"]).verify(headers, b"{}")
    assert (exc.value.status, exc.value.code) == (401, code)


def test_signature_is_over_raw_bytes_not_reserialised_json():
    body = b'{"a":1,  "b":2}'
    with pytest.raises(Rejected):
        ShopifySource(["s"]).verify({"X-Shopify-Hmac-Sha256": sign(b'{"a": 1, "b": 2}', "s")}, body)


def test_delivery_requires_a_supported_topic():
    source = ShopifySource(["s"])
    with pytest.raises(Rejected) as exc:
        source.delivery({"X-Shopify-Webhook-Id": "w"}, {}, NOW)
    assert exc.value.code == "missing_topic"
    with pytest.raises(Rejected) as exc:
        source.delivery({"X-Shopify-Topic": "shop/update", "X-Shopify-Webhook-Id": "w"}, {}, NOW)
    assert (exc.value.status, exc.value.code) == (422, "unsupported_topic")


def test_delivery_keeps_headers_worth_keeping():
    d = ShopifySource(["s"]).delivery(
        {"X-Shopify-Topic": "orders/create", "X-Shopify-Webhook-Id": "w", "X-Shopify-Event-Id": "e",
         "X-Shopify-Triggered-At": "2024-01-01T00:00:00Z", "X-Shopify-Shop-Domain": "x.myshopify.com"},
        {"id": 1}, NOW,
    )
    assert d.meta == {"shop_domain": "x.myshopify.com", "shopify_event_id": "e"}
    assert d.triggered_at == datetime(2024, 1, 1, tzinfo=timezone.utc)


def test_customer_create_maps_to_identified_with_legacy_consent():
    events = to_events(delivery("customers/create", sample("CustomersCreate")))
    identified, consent = events
    assert identified.type == "customer.identified"
    assert identified.identity.email == "bob@biller.com"
    # The true id comes from admin_graphql_api_id: the numeric id lost precision in the sample.
    assert identified.identity.customer_id == "706405506930370084"
    assert identified.traits["first_name"] == "Bob"
    assert identified.event_time == datetime(2022, 1, 1, 0, 0, tzinfo=timezone.utc)
    assert consent.type == "consent.changed" and consent.state == "subscribed"


def test_order_maps_to_order_completed_with_customer_email_and_exact_total():
    (event,) = to_events(delivery("orders/create", sample("Order")))
    assert event.type == "order.completed"
    assert event.order_id == "820982911946154508"
    assert event.total == Decimal("388.00")
    assert event.identity.email == "john@example.com"
    assert len(event.items) == 2
    assert event.event_id == "shopify:order:820982911946154508:2021-12-31T19:00:00-05:00"
    # The published sample is a cancelled test order: it is kept, and flagged so it never counts.
    assert event.cancelled and event.test


def test_orders_paid_and_create_name_the_same_event_when_nothing_changed():
    a = to_events(delivery("orders/create", sample("Order")))
    b = to_events(delivery("orders/paid", sample("Order")))
    assert a == b


def test_customer_with_stateless_consent_keeps_its_traits():
    payload = sample("CustomersCreate") | {"email_marketing_consent": {"state": None}, "accepts_marketing": None}
    events = to_events(delivery("customers/update", payload))
    assert [e.type for e in events] == ["customer.updated"]


def test_consent_without_time_is_named_by_shopify_event_id_across_retries():
    payload = {"customer_id": 5, "email_address": "a@example.com", "email_marketing_consent": {"state": "subscribed"}}
    first = delivery("customers_email_marketing_consent/update", payload).model_copy(
        update={"delivery_id": "attempt-1", "meta": {"shopify_event_id": "evt-9"}})
    retry = first.model_copy(update={"delivery_id": "attempt-2"})
    assert to_events(first)[0].event_id == to_events(retry)[0].event_id


def test_checkout_maps_to_started_and_not_completed():
    (event,) = to_events(delivery("checkouts/create", sample("CheckoutsCreate")))
    assert event.type == "checkout.started"
    assert event.checkout_id == "123123123"
    assert event.completed is False
    assert event.url.startswith("https://checkout.local/")
    # The customer's own email goes with the customer's id.
    assert event.identity.email == "john@example.com"
    assert event.identity.customer_id == "603851970716743426"


def test_email_consent_sample_without_state_fails_validation_with_reason():
    with pytest.raises(EventInvalid) as exc:
        to_events(delivery("customers_email_marketing_consent/update", sample("CustomersEmailMarketingConsentUpdate")))
    assert exc.value.code == "validation_failed"
    assert "state" in exc.value.detail


def test_email_consent_update_maps_states():
    payload = {"customer_id": 5, "email_address": "A@Example.com",
               "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2024-02-01T00:00:00Z"}}
    (event,) = to_events(delivery("customers_email_marketing_consent/update", payload))
    assert (event.identity.email, event.state, event.channel) == ("a@example.com", "unsubscribed", "email")


def test_invalid_email_is_refused_without_echoing_it():
    payload = sample("CustomersCreate") | {"email": "not-an-address"}
    with pytest.raises(EventInvalid) as exc:
        to_events(delivery("customers/update", payload))
    assert "not-an-address" not in str(exc.value)
    assert "identity.email" in exc.value.detail
