"""The core claim, proved by property: any permutation, with any duplications, of a set of
events yields the same profile — under recency, source priority, consent and counters."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import CheckoutChanged, ConsentChanged, CustomerUpdated, EmailOpened, OrderCompleted, ProductViewed
from schemas.profile import Profile
from workers.profiles.enrich import enrich
from workers.profiles.merge import MergeRules, merge_all, merge_profiles

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TIERS = {"bronze": 0, "silver": 100, "gold": 500}
RULES = MergeRules({"first_name": ("crm", "shopify")})

sources = st.sampled_from(["shopify", "crm", "tracking"])
times = st.integers(min_value=0, max_value=50).map(lambda m: T0 + timedelta(minutes=m))
values = st.one_of(st.none(), st.sampled_from(["Ann", "Bo", "Cy"]), st.integers(0, 3))


def base(draw, i):
    return {"event_id": f"e{i}", "source": draw(sources), "event_time": draw(times), "received_at": T0 + timedelta(days=1),
            "identity": {"email": "p@example.com", "customer_id": draw(st.sampled_from(["1", "2"])),
                         "anonymous_id": draw(st.sampled_from([None, "a1", "a2"]))}}


@st.composite
def event(draw, i):
    kind = draw(st.sampled_from(["update", "order", "checkout", "view", "consent", "open"]))
    b = base(draw, i)
    if kind == "update":
        return CustomerUpdated(type="customer.updated", traits={draw(st.sampled_from(["first_name", "city", "tier"])): draw(values)}, **b)
    if kind == "order":
        return OrderCompleted(order_id=draw(st.sampled_from(["o1", "o2", "o3"])), total=Decimal(draw(st.integers(0, 400))),
                              cancelled=draw(st.booleans()), **b)
    if kind == "checkout":
        return CheckoutChanged(type="checkout.updated", checkout_id="c1", total=Decimal(draw(st.integers(0, 99))),
                               completed=draw(st.booleans()), **b)
    if kind == "view":
        return ProductViewed(category=draw(st.sampled_from(["shoes", "hats", None])), **b)
    if kind == "consent":
        return ConsentChanged(state=draw(st.sampled_from(["subscribed", "unsubscribed", "pending", "not_subscribed"])), **b)
    return EmailOpened(esp="sendgrid", **b)


@st.composite
def histories(draw):
    n = draw(st.integers(1, 12))
    events = [draw(event(i)) for i in range(n)]
    # The same events, shuffled, with some delivered more than once.
    replayed = draw(st.permutations(events + draw(st.lists(st.sampled_from(events), max_size=8))))
    return events, replayed


@settings(max_examples=300, deadline=None)
@given(histories())
def test_any_order_and_any_duplication_gives_the_same_profile(history):
    events, replayed = history
    once = merge_all(Profile(id="p"), events, TIERS, RULES)
    assert merge_all(Profile(id="p"), replayed, TIERS, RULES) == once


@settings(max_examples=100, deadline=None)
@given(histories())
def test_applying_a_history_twice_changes_nothing(history):
    events, _ = history
    once = merge_all(Profile(id="p"), events, TIERS, RULES)
    assert merge_all(once, events, TIERS, RULES) == once


def test_source_priority_beats_recency_for_chosen_traits_only():
    crm_old = CustomerUpdated(type="customer.updated", traits={"first_name": "Ann", "city": "Oslo"},
                              **{"event_id": "a", "source": "crm", "event_time": T0, "received_at": T0,
                                 "identity": {"email": "p@example.com"}})
    shop_new = CustomerUpdated(type="customer.updated", traits={"first_name": "Annie", "city": "Bergen"},
                               **{"event_id": "b", "source": "shopify", "event_time": T0 + timedelta(days=3), "received_at": T0,
                                  "identity": {"email": "p@example.com"}})
    for order in ([crm_old, shop_new], [shop_new, crm_old]):
        profile = merge_all(Profile(id="p"), order, TIERS, RULES)
        assert profile.traits["first_name"].value == "Ann"  # the CRM owns first_name
        assert profile.traits["city"].value == "Bergen"  # recency elsewhere


@settings(max_examples=200, deadline=None)
@given(histories(), st.data())
def test_merging_the_profiles_of_two_halves_gives_the_profile_of_the_whole(history, data):
    events, _ = history
    cut = data.draw(st.integers(0, len(events)))
    left = merge_all(Profile(id="p_left"), events[:cut], TIERS, RULES)
    right = merge_all(Profile(id="p_right"), events[cut:], TIERS, RULES)
    whole = merge_all(Profile(id="p_left"), events, TIERS, RULES)
    for survivor, absorbed in ((left, right), (right, left)):
        merged = enrich(merge_profiles(survivor, absorbed, RULES), TIERS)
        assert merged.model_copy(update={"id": "p_left", "merged_from": ()}) == whole
