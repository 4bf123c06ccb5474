"""Each enrichment rule on its own: device, location, commerce, engagement."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import ua_parser

from adapters.geoip import build_test_database, geo_traits, open_reader
from schemas.events import CustomerUpdated, OrderCompleted
from schemas.profile import OrderFact
from workers.profiles.context import device_traits, with_context
from workers.profiles.enrich import preferred_send_hour, top_categories

T = datetime(2024, 1, 1, tzinfo=timezone.utc)
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    return open_reader(str(build_test_database(tmp_path_factory.mktemp("geo") / "test-city.mmdb")))


def test_device_os_and_client_from_the_user_agent():
    assert dict(device_traits(IPHONE)) == {"device": "iPhone", "os": "iOS 17", "client": "Mobile Safari 17"}
    assert dict(device_traits(WINDOWS)) == {"os": "Windows 10", "client": "Chrome 126"}
    assert device_traits(None) == () and device_traits("curl/8") == (("client", "curl 8"),)


def test_only_the_first_512_characters_of_a_user_agent_are_parsed():
    # 28 KB, a bot token past the first 512 characters: parsed whole it would read as Googlebot (after
    # seconds of regex work for the pure-Python resolver).
    hostile = IPHONE.ljust(512) + " Googlebot/2.1 (+http://www.google.com/bot.html)" + " (Linux; " * 3_500
    assert len(hostile) > 28_000
    assert device_traits(hostile) == device_traits(IPHONE) == (("client", "Mobile Safari 17"), ("device", "iPhone"), ("os", "iOS 17"))


def test_user_agents_are_parsed_by_the_native_resolver():
    """ua-parser picks its fastest installed resolver: ua-parser-rs must be installed (pyproject's ``ua-parser[regex]``)."""
    assert ua_parser.RegexResolver is not None and ua_parser.BestAvailableResolver is ua_parser.RegexResolver


def test_location_and_time_zone_from_ip(geo):
    assert geo_traits("81.2.69.160", geo) == {"geo_country": "GB", "geo_city": "London", "geo_timezone": "Europe/London"}
    assert geo_traits("2001:db8::1", geo)["geo_timezone"] == "Asia/Tokyo"
    assert geo_traits("8.8.8.8", geo) == {}
    assert geo_traits("not-an-ip", geo) == {}
    assert geo_traits("81.2.69.160", None) == {}


def test_running_without_a_database_says_so(caplog):
    with caplog.at_level("INFO"):
        assert open_reader(None) is None
    assert "location enrichment is off" in caplog.text


def test_context_becomes_derived_traits_and_the_ip_is_not_kept(geo):
    order = OrderCompleted(order_id="1", total=Decimal("5"), event_id="e1", source="tracking", event_time=T, received_at=T,
                           identity={"email": "a@example.com"}, context={"ip": "192.0.2.7", "user_agent": IPHONE})
    original, derived = with_context(order, geo)
    assert original == order
    assert isinstance(derived, CustomerUpdated) and derived.event_id == "e1#context"
    assert derived.traits == {"device": "iPhone", "os": "iOS 17", "client": "Mobile Safari 17",
                              "geo_country": "NO", "geo_city": "Oslo", "geo_timezone": "Europe/Oslo"}
    assert "192.0.2.7" not in derived.model_dump_json()
    assert with_context(order.model_copy(update={"context": None}), geo) == [order.model_copy(update={"context": None})]


def test_preferred_send_hour_is_local_and_ties_take_the_earliest():
    opens = [T + timedelta(days=d, hours=h) for d, h in ((0, 17), (1, 17), (2, 8), (3, 8), (4, 20))]
    assert preferred_send_hour(opens, None) == 8
    assert preferred_send_hour(opens, ZoneInfo("Asia/Tokyo")) == 2  # 17:00 UTC is 02:00 in Tokyo; ties -> earliest
    assert preferred_send_hour([], None) is None


def test_top_categories_weigh_orders_over_views():
    stamp = {"event_time": T, "source": "s", "event_id": "e"}
    orders = [OrderFact(total=Decimal("1"), categories=("hats",), **stamp), OrderFact(total=Decimal("1"), categories=("hats", "socks"), **stamp)]
    assert top_categories(orders, ["shoes", "socks"]) == ("hats", "socks", "shoes")
    assert top_categories([], ["b", "a"]) == ("a", "b")


def test_quality_flags_mark_without_rejecting():
    from schemas.profile import Profile
    from workers.profiles.merge import merge_all
    from workers.profiles.quality import quality_flags

    base = {"source": "s", "received_at": T, "identity": {"email": "a@example.com"}}
    future = CustomerUpdated(type="customer.updated", event_id="f", event_time=T + timedelta(hours=2), **base)
    ancient = CustomerUpdated(type="customer.updated", event_id="o", event_time=T - timedelta(days=365 * 30), **base)
    odd = CustomerUpdated(type="customer.updated", event_id="m", event_time=T, **{**base, "identity": {"email": "a..b@localhost"}})
    huge = OrderCompleted(order_id="1", total=Decimal("250000"), event_id="h", event_time=T, **base)
    fine = OrderCompleted(order_id="2", total=Decimal("25"), event_id="ok", event_time=T, **base)
    assert quality_flags(future) == ("event_time_in_future",)
    assert quality_flags(ancient) == ("event_time_too_old",)
    assert quality_flags(odd) == ("email_malformed",)
    assert quality_flags(huge) == ("amount_implausible",)
    assert quality_flags(fine) == ()
    profile = merge_all(Profile(id="p"), [future, huge, fine, huge], {})
    assert profile.flags == {"amount_implausible": ("h",), "event_time_in_future": ("f",)}
    assert profile.computed.order_count == 2  # flagged, still counted: flags never reject


def test_cart_abandonment_is_derived_from_facts_and_cleared_by_an_order():
    from schemas.events import CheckoutChanged
    from schemas.profile import Profile
    from workers.profiles.enrich import enrich, expire_checkout
    from workers.profiles.merge import merge_all

    base = {"source": "shopify", "received_at": T, "identity": {"email": "a@example.com"}}
    started = CheckoutChanged(type="checkout.started", checkout_id="c1", url="https://shop/c1", total=Decimal("40"),
                              items=[{"price": "20", "quantity": 2}], event_id="c", event_time=T, **base)
    profile = merge_all(Profile(id="p"), [started], {})
    assert profile.computed.abandoned_cart is None  # not before the delay ran out
    assert expire_checkout(profile, "c1", T - timedelta(minutes=1)) == profile  # changed since that check was scheduled
    expired = enrich(expire_checkout(profile, "c1", T), {})
    cart = expired.computed.abandoned_cart
    assert (cart.checkout_id, cart.url, cart.value, cart.item_count) == ("c1", "https://shop/c1", Decimal("40"), 2)
    assert enrich(expire_checkout(expired, "c1", T), {}) == expired  # re-delivered check: no change
    after = OrderCompleted(order_id="o", total=Decimal("40"), event_id="o", event_time=T + timedelta(minutes=30), **base)
    assert merge_all(expired, [after], {}).computed.abandoned_cart is None
    completed = started.model_copy(update={"type": "checkout.updated", "completed": True, "event_id": "c2",
                                           "event_time": T + timedelta(minutes=5)})
    assert merge_all(expired, [completed], {}).computed.abandoned_cart is None
    assert expire_checkout(merge_all(profile, [completed], {}), "c1", T).expired_checkouts == ()
