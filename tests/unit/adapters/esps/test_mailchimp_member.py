from datetime import datetime, timezone
from decimal import Decimal

from adapters.esps.base import member_hash
from adapters.esps.mailchimp import DEFAULT_FIELDS as DEFAULT_MERGE_FIELDS
from adapters.esps.mailchimp.member import member_body, subscriber_hash
from schemas.profile import Computed, Consent, Profile, Trait

T = datetime(2024, 3, 4, 5, 6, tzinfo=timezone.utc)
STAMP = {"event_time": T, "source": "shopify", "event_id": "e"}


def profile(**changes) -> Profile:
    base = Profile(
        id="p",
        email="ann@example.com",
        traits={"first_name": Trait(value="Ann", **STAMP), "last_name": Trait(value=None, **STAMP)},
        computed=Computed(lifetime_value=Decimal("12.50"), order_count=2, last_order_date=T, loyalty_tier="bronze"),
    )
    return base.model_copy(update=changes)


def test_member_maps_traits_to_tags_and_leaves_missing_values_out():
    body = member_body(profile(), DEFAULT_MERGE_FIELDS)
    assert body["merge_fields"] == {"FNAME": "Ann", "LTV": 12.5, "ORDERS": 2, "LASTORDER": "2024-03-04", "TIER": "bronze"}
    assert "LNAME" not in body["merge_fields"]
    assert body["email_address"] == "ann@example.com"


def test_consent_only_ever_sets_status_for_new_members_except_unsubscribe():
    unknown = member_body(profile(), DEFAULT_MERGE_FIELDS)
    assert unknown["status_if_new"] == "transactional" and "status" not in unknown
    subscribed = member_body(profile(consent={"email": Consent(state="subscribed", **STAMP)}), DEFAULT_MERGE_FIELDS)
    assert subscribed["status_if_new"] == "subscribed" and "status" not in subscribed
    unsubscribed = member_body(profile(consent={"email": Consent(state="unsubscribed", **STAMP)}), DEFAULT_MERGE_FIELDS)
    assert unsubscribed["status"] == "unsubscribed" and unsubscribed["status_if_new"] == "unsubscribed"


def test_no_email_no_member():
    assert member_body(profile(email=None), DEFAULT_MERGE_FIELDS) is None


def test_hashes():
    assert subscriber_hash("ann@example.com") == "257c57037d384ae37ea27a07e8a01665"
    assert subscriber_hash("Ann@Example.com") == subscriber_hash("ann@example.com")
    a = member_body(profile(), DEFAULT_MERGE_FIELDS)
    assert member_hash(a) == member_hash(dict(reversed(list(a.items()))))
    assert member_hash(a) != member_hash(member_body(profile(email="b@example.com"), DEFAULT_MERGE_FIELDS))


def test_recency_values_are_counted_to_the_day_given():
    from datetime import date

    body = member_body(profile(), {"days_since_last_order": "DAYSORDER", "days_since_last_open": "DAYSOPEN"}, today=date(2024, 3, 14))
    assert body["merge_fields"] == {"DAYSORDER": 10, "DAYSOPEN": ""}
