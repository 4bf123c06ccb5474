"""The merge's core claim: any order, any duplication of the same events gives the same profile."""

import itertools
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from schemas.events import ConsentChanged, CustomerUpdated, EventAdapter, OrderCompleted, ProductViewed
from schemas.profile import Profile
from workers.profiles.enrich import enrich, loyalty_tier
from workers.profiles.merge import merge_all

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TIERS = {"bronze": 0, "silver": 250, "gold": 1000}
IDENTITY = {"email": "a@example.com", "customer_id": "1"}


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def base(event_id: str, minutes: int, source: str = "shopify") -> dict:
    return {"event_id": event_id, "source": source, "event_time": at(minutes), "received_at": at(100), "identity": IDENTITY}


def update(event_id, minutes, source="shopify", **traits):
    return CustomerUpdated(type="customer.updated", traits=traits, **base(event_id, minutes, source))


def order(order_id, minutes, total):
    return OrderCompleted(order_id=order_id, total=Decimal(total), **base(f"o{order_id}", minutes))


def consent(event_id, minutes, state):
    return ConsentChanged(state=state, **base(event_id, minutes))


def fresh() -> Profile:
    return Profile(id="p_1")


EVENTS = [
    update("u1", 1, first_name="Ann", city="Oslo"),
    update("u2", 5, first_name="Anna"),
    update("u3", 3, city="Bergen"),
    order("1", 2, "100.00"),
    order("2", 4, "300.50"),
    consent("c1", 2, "subscribed"),
    consent("c2", 6, "unsubscribed"),
    ProductViewed(category="shoes", **base("v1", 1)),
]


def test_every_permutation_gives_the_same_profile():
    expected = merge_all(fresh(), EVENTS, TIERS)
    for perm in itertools.islice(itertools.permutations(EVENTS), 0, None, 97):
        assert merge_all(fresh(), perm, TIERS) == expected


def test_duplicates_in_any_order_change_nothing():
    expected = merge_all(fresh(), EVENTS, TIERS)
    rng = random.Random(7)
    for _ in range(200):
        stream = EVENTS + rng.choices(EVENTS, k=rng.randint(1, 10))
        rng.shuffle(stream)
        assert merge_all(fresh(), stream, TIERS) == expected


def test_latest_event_time_wins_per_trait_not_arrival():
    profile = merge_all(fresh(), EVENTS, TIERS)
    assert profile.traits["first_name"].value == "Anna"
    assert profile.traits["first_name"].event_id == "u2"
    assert profile.traits["city"].value == "Bergen"
    assert profile.traits["city"].source == "shopify"


def test_counters_never_double_count_redelivered_orders():
    profile = merge_all(fresh(), [order("1", 2, "100.00")] * 5 + [order("2", 4, "300.50")] * 3, TIERS)
    assert profile.computed.order_count == 2
    assert profile.computed.lifetime_value == Decimal("400.50")
    assert profile.computed.last_order_date == at(4)
    assert profile.computed.loyalty_tier == "silver"


def test_cancelled_and_test_orders_never_count():
    cancelled = OrderCompleted(order_id="1", total=Decimal("100"), cancelled=True, **base("o1-cancel", 9))
    test_order = OrderCompleted(order_id="3", total=Decimal("70"), test=True, **base("o3", 2))
    events = [order("1", 2, "100.00"), cancelled, order("2", 4, "300.50"), test_order]
    for stream in (events, events[::-1]):
        profile = merge_all(fresh(), stream, TIERS)
        assert profile.computed.order_count == 1
        assert profile.computed.lifetime_value == Decimal("300.50")


def test_equal_keys_with_different_content_resolve_the_same_way_in_any_order():
    a = update("same", 1, first_name="A")
    b = update("same", 1, first_name="B")
    assert merge_all(fresh(), [a, b], TIERS) == merge_all(fresh(), [b, a], TIERS)


def test_consent_is_last_writer_wins_and_restrictive_on_ties():
    assert merge_all(fresh(), EVENTS, TIERS).consent["email"].state == "unsubscribed"
    tie = [consent("z", 9, "subscribed"), consent("a", 9, "unsubscribed")]
    assert merge_all(fresh(), tie, TIERS).consent["email"].state == "unsubscribed"
    assert merge_all(fresh(), tie[::-1], TIERS).consent["email"].state == "unsubscribed"


def test_first_and_last_seen_and_identifiers():
    profile = merge_all(fresh(), EVENTS, TIERS)
    assert (profile.first_seen, profile.last_seen) == (at(1), at(6))
    assert profile.identifiers == {"shopify": ("1",), "email": ("a@example.com",)}
    assert profile.email == "a@example.com"
    assert profile.computed.categories_viewed == ("shoes",)


def test_loyalty_tier_thresholds():
    assert loyalty_tier(Decimal("0"), TIERS) == "bronze"
    assert loyalty_tier(Decimal("999.99"), TIERS) == "silver"
    assert loyalty_tier(Decimal("1000"), TIERS) == "gold"
    assert loyalty_tier(Decimal("5"), {"vip": 100}) is None


def test_enrich_is_idempotent():
    once = enrich(merge_all(fresh(), EVENTS, TIERS), TIERS)
    assert enrich(once, TIERS) == once


def test_event_times_are_normalised_to_utc_milliseconds():
    event = EventAdapter.validate_python(
        {**base("x", 0), "event_time": "2024-01-01T10:00:00.123456+02:00", "type": "customer.updated"}
    )
    assert event.event_time == datetime(2024, 1, 1, 8, 0, 0, 123000, tzinfo=timezone.utc)


def test_erasure_keeps_nothing_and_stays_whatever_arrives_later():
    from schemas.events import CustomerErased
    from schemas.profile import IdentityHasher
    from schemas.sync import Stored
    from workers.profiles.erasure import plan

    hasher = IdentityHasher((b"unit-test-secret-0123456789",))
    profile = merge_all(fresh(), EVENTS, TIERS)
    erased = plan([(profile, Stored(version=3))], CustomerErased(**base("x", 10)), hasher).tombstone
    assert erased.erased is not None and erased.email is None and erased.traits == {} and erased.orders == {}
    assert erased.computed.order_count == 0
    dumped = erased.model_dump_json()
    assert "a@example.com" not in dumped and "Anna" not in dumped
    assert "email:a@example.com" not in dumped and hasher.index_key("email:a@example.com") in dumped
    late = [update("late", 1, first_name="Z"), order("9", 20, "5.00"), consent("c9", 30, "subscribed")]
    assert merge_all(erased, late, TIERS) == erased


def untimed(event_id, arrived_minutes, source="crm", **traits):
    """A sender's event without a time of its own: its time is when it arrived."""
    return CustomerUpdated(type="customer.updated", traits=traits, timed=False, **base(event_id, arrived_minutes, source))


def test_an_event_without_a_time_of_its_own_never_outranks_one_with_a_real_time():
    timed = update("t1", 10, first_name="Real")
    # Arrived long after the real one happened, but says nothing of when it happened itself.
    late = untimed("crm:d9", 500, first_name="Guess")
    for events in ([timed, late], [late, timed]):
        assert merge_all(fresh(), events, TIERS).traits["first_name"].value == "Real"
    # Alone, or against other untimed facts, it counts: the later arrival wins.
    assert merge_all(fresh(), [untimed("crm:d1", 20, first_name="Old"), untimed("crm:d2", 30, first_name="New")],
                     TIERS).traits["first_name"].value == "New"


def test_a_retry_of_an_older_untimed_delivery_never_changes_the_profile():
    first, newer = untimed("crm:d1", 20, first_name="Old"), untimed("crm:d2", 30, first_name="New")
    retried = untimed("crm:d1", 45, first_name="Old")  # the sender never saw our 2xx and sent d1 again, later
    profile = merge_all(fresh(), [first, newer], TIERS)
    again = merge_all(profile, [retried], TIERS)
    assert again.traits["first_name"].value == "New" and again == profile
    # The same after the profile went through the store (what a retry past Redis' window meets).
    stored = Profile.model_validate(profile.model_dump(mode="json"))
    assert merge_all(stored, [retried], TIERS) == stored
