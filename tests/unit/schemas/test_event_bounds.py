"""The canonical events refuse what MongoDB cannot store or Decimal cannot compute, with a reason per field,
so such a delivery is quarantined (EventInvalid) instead of failing at the store and being retried."""

from datetime import datetime, timezone
from decimal import Decimal

import bson
import pytest

from adapters.sources import tracking
from adapters.sources.configured import SourceConfig, configured_mapping
from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import MAX_AMOUNT, MAX_USER_AGENT, EventAdapter
from schemas.profile import Profile
from workers.profiles.merge import merge_all

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
BASE = {"event_id": "e", "source": "s", "event_time": NOW, "received_at": NOW, "identity": {"email": "a@example.com"}}


def reasons(event: dict) -> set[tuple[str, str]]:
    with pytest.raises(EventInvalid) as exc:
        tracking.validate_events([{**BASE, **event}])
    return {(e["loc"], e["type"]) for e in exc.value.errors}


@pytest.mark.parametrize(("event", "loc"), [
    ({"type": "customer.updated", "traits": {"first_name": "Ada\ud800"}}, "customer.updated.traits.first_name"),
    ({"type": "customer.updated", "traits": {"\udc00": "x"}}, "customer.updated.traits"),
    ({"type": "customer.updated", "identity": {"email": "a\udbff@example.com"}}, "customer.updated.identity.email"),
    ({"type": "customer.updated", "identity": {"anonymous_id": "\ud800"}}, "customer.updated.identity.anonymous_id"),
    ({"type": "product.viewed", "title": "\udfff", "url": "https://shop.example/p"}, "product.viewed.title"),
    ({"type": "email.clicked", "esp": "x", "url": "https://x/\ud800"}, "email.clicked.url"),
    ({"type": "order.completed", "order_id": "1", "total": 1, "items": [{"category": "\ud800"}]}, "order.completed.items.0.category"),
    ({"type": "customer.updated", "event_id": "\ud800"}, "customer.updated.event_id"),
    ({"type": "order.completed", "order_id": "o-\udc00", "total": 1}, "order.completed.order_id"),
])
def test_lone_surrogates_anywhere_in_an_event_are_refused(event, loc):
    assert reasons(event) == {(loc, "invalid_unicode")}


@pytest.mark.parametrize(("value", "kind"), [(2**63, "number_out_of_range"), (-(2**63) - 1, "number_out_of_range"),
                                             (float("nan"), "invalid_number"), (float("inf"), "invalid_number")])
def test_trait_numbers_must_fit_bson(value, kind):
    assert reasons({"type": "customer.updated", "traits": {"n": value}}) == {("customer.updated.traits.n", kind)}


def test_the_extremes_bson_can_hold_are_kept():
    event = EventAdapter.validate_python({**BASE, "type": "customer.updated",
                                          "traits": {"max": 2**63 - 1, "min": -(2**63), "emoji": "\U0001F600", "f": 1e308}})
    bson.encode(event.model_dump(mode="python"))


@pytest.mark.parametrize(("total", "kind"), [("1e26", "less_than_equal"), ("NaN", "finite_number"), ("Infinity", "finite_number"),
                                             ("-0.01", "greater_than_equal"), (str(MAX_AMOUNT + Decimal("0.0001")), "less_than_equal")])
def test_order_and_checkout_totals_are_bounded(total, kind):
    assert reasons({"type": "order.completed", "order_id": "1", "total": total}) == {("order.completed.total", kind)}
    assert reasons({"type": "checkout.started", "checkout_id": "c", "total": total}) == {("checkout.started.total", kind)}


def test_line_item_prices_and_quantities_are_bounded():
    found = reasons({"type": "order.completed", "order_id": "1", "total": 1,
                     "items": [{"price": "-1"}, {"price": "1e13"}, {"price": "NaN"}, {"quantity": -1}, {"quantity": 10**6 + 1}]})
    assert found == {("order.completed.items.0.price", "greater_than_equal"), ("order.completed.items.1.price", "less_than_equal"),
                     ("order.completed.items.2.price", "finite_number"), ("order.completed.items.3.quantity", "greater_than_equal"),
                     ("order.completed.items.4.quantity", "less_than_equal")}


def test_amounts_keep_at_most_four_decimals_so_float_noise_is_rounded():
    event = EventAdapter.validate_python({**BASE, "type": "order.completed", "order_id": "1", "total": "59.970000000000006",
                                          "items": [{"price": "0.00005"}]})
    assert (event.total, event.items[0].price) == (Decimal("59.9700"), Decimal("0.0000"))
    assert EventAdapter.validate_python({**BASE, "type": "order.completed", "order_id": "1", "total": "10.00"}).total.as_tuple().exponent == -2


def test_lifetime_sums_and_averages_of_the_largest_orders_are_exact():
    largest = MAX_AMOUNT - Decimal("0.0001")
    events = [EventAdapter.validate_python({**BASE, "event_id": f"e{i}", "type": "order.completed", "order_id": str(i), "total": largest})
              for i in range(2_000)]
    profile = merge_all(Profile(id="p"), events, {"gold": 1000})
    assert profile.computed.lifetime_value == largest * 2_000
    assert profile.computed.average_order_value == MAX_AMOUNT.quantize(Decimal("0.01"))
    assert profile.computed.loyalty_tier == "gold"


def test_a_configured_senders_absurd_amount_is_refused_with_its_reason():
    config = SourceConfig.model_validate({"scheme": "hmac", "secrets": ["s"], "mapping": {"purchase": {
        "event": "order.completed", "email": "buyer.email", "fields": {"order_id": "uid", "total": {"path": "amount_cents", "divide": 100}}}}})
    delivery = Delivery(source="legacy", topic="purchase", delivery_id="P-1", received_at=NOW,
                        payload={"uid": "P-1", "amount_cents": 10**28, "buyer": {"email": "a@example.com"}})
    with pytest.raises(EventInvalid) as exc:
        configured_mapping("legacy", config)(delivery)
    assert [(e["loc"], e["type"]) for e in exc.value.errors] == [("order.completed.total", "less_than_equal")]


def test_user_agents_are_cut_to_512_characters_before_anything_reads_them():
    event = EventAdapter.validate_python({**BASE, "type": "customer.updated", "context": {"user_agent": "Mozilla/5.0 " + "x" * 28_000}})
    assert event.context.user_agent == ("Mozilla/5.0 " + "x" * 28_000)[:MAX_USER_AGENT]
    assert len(event.context.user_agent) == MAX_USER_AGENT == 512
