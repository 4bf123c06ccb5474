"""Dates sent to ESPs are taken in UTC every time: the same member whatever built the profile, before and
after a round trip through MongoDB (which keeps instants in UTC and hands them back in UTC)."""

from datetime import date, datetime, timedelta, timezone

import bson
from bson.codec_options import CodecOptions

from adapters.esps.fields import FieldMapping, convert, mapped
from adapters.sources.shopify import to_events
from schemas.delivery import Delivery
from schemas.profile import Profile
from workers.profiles.merge import merge_all

# 22:30 in the shop's time zone (-05:00) on March 1st is 03:30 UTC on March 2nd.
LATE_LOCAL = "2026-03-01T22:30:00-05:00"
FIELDS = {"last_order_date": {"tag": "LASTORDER", "type": "date"}, "last_email_open": "LASTOPEN", "days_since_last_order": "DAYS",
          "signed_up_at": {"tag": "SIGNUP", "type": "date"}}
TODAY = date(2026, 3, 12)


def round_trip(profile: Profile) -> Profile:
    """Through BSON exactly as the store writes and reads a profile (``tz_aware=True``)."""
    raw = bson.encode(profile.model_dump(mode="python"))
    return Profile.model_validate(bson.decode(raw, CodecOptions(tz_aware=True)))


def shop_order() -> Profile:
    delivery = Delivery(source="shopify", topic="orders/create", delivery_id="w1", received_at=datetime(2026, 3, 2, 3, 31, tzinfo=timezone.utc),
                        payload={"id": 5, "email": "a@example.com", "updated_at": LATE_LOCAL, "total_price": "10.00", "line_items": []})
    return merge_all(Profile(id="p1"), to_events(delivery), {})


def test_an_order_late_in_the_shops_day_gives_the_same_utc_date_before_and_after_the_store():
    merged = shop_order()
    assert mapped(merged, FIELDS, TODAY) == mapped(round_trip(merged), FIELDS, TODAY)
    assert mapped(merged, FIELDS, TODAY)["LASTORDER"] == "2026-03-02"


def test_a_profile_holding_local_times_maps_like_its_round_trip():
    """Whatever built it (events are UTC already; a migration, a test or an admin tool may not be): the profile's
    own times are UTC, and a datetime becomes a date in UTC."""
    stored = shop_order().model_dump(mode="json")
    local = datetime.fromisoformat(LATE_LOCAL)
    for fact in stored["orders"].values():
        fact["event_time"] = LATE_LOCAL
    stored["computed"] |= {"last_order_date": LATE_LOCAL, "last_email_open": LATE_LOCAL}
    stored["traits"]["signed_up_at"] = {"value": LATE_LOCAL, "event_time": LATE_LOCAL, "source": "shopify", "event_id": "e"}
    profile = Profile.model_validate(stored)
    assert profile.computed.last_order_date == local and profile.computed.last_order_date.utcoffset() == timedelta(0)
    member = mapped(profile, FIELDS, TODAY)
    assert member == mapped(round_trip(profile), FIELDS, TODAY)
    assert member == {"LASTORDER": "2026-03-02", "LASTOPEN": "2026-03-02", "DAYS": 10, "SIGNUP": "2026-03-02"}


def test_datetimes_and_iso_strings_with_offsets_become_utc_dates():
    as_date = FieldMapping(tag="D", type="date")
    local = datetime.fromisoformat(LATE_LOCAL)
    assert convert(local, as_date) == convert(local, FieldMapping(tag="D")) == "2026-03-02"
    assert convert(LATE_LOCAL, as_date) == "2026-03-02"
    assert convert("2026-03-02T01:00:00+09:00", as_date) == "2026-03-01"
    assert convert("2026-03-01T22:30:00Z", as_date) == convert("2026-03-01T22:30:00", as_date) == convert("2026-03-01", as_date) == "2026-03-01"
    assert convert("not a date", as_date) is None
