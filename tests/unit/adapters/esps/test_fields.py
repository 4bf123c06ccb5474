from datetime import datetime, timezone
from decimal import Decimal

from adapters.esps.fields import FieldMapping, convert, normalize, problems
from adapters.esps.mailchimp.member import member_body
from schemas.profile import Profile, Trait

STAMP = {"event_time": datetime(2024, 1, 1, tzinfo=timezone.utc), "source": "s", "event_id": "e"}


def test_conversion_length_and_defaults():
    assert convert("12.5", FieldMapping(tag="N", type="number")) == 12.5
    assert convert("lots", FieldMapping(tag="N", type="number")) is None
    assert convert(Decimal("3"), FieldMapping(tag="N")) == 3.0
    assert convert("2024-05-06T10:00:00Z", FieldMapping(tag="D", type="date")) == "2024-05-06"
    assert convert("x" * 40, FieldMapping(tag="T", max_length=10)) == "x" * 10
    assert convert(7, FieldMapping(tag="T", type="text")) == "7"

    profile = Profile(id="p", email="a@example.com", traits={"first_name": Trait(value=None, **STAMP), "city": Trait(value="Oslo", **STAMP)})
    mapping = {"first_name": {"tag": "FNAME", "default": "there"}, "city": FieldMapping(tag="CITY", max_length=2),
               "last_name": "LNAME"}
    body = member_body(profile, {k: FieldMapping(**v) if isinstance(v, dict) else v for k, v in mapping.items()})
    assert body["merge_fields"] == {"FNAME": "there", "CITY": "Os"}


def test_mapping_checked_against_the_audience():
    mapping = normalize({"first_name": "FNAME", "lifetime_value": FieldMapping(tag="LTV", type="text"), "city": "CITY"})
    found = problems(mapping, {"FNAME": "text", "LTV": "number"})
    assert found == ["city: merge field CITY is not defined on the audience",
                     "lifetime_value: LTV is a number field, the mapping converts to text"]
    assert problems(normalize({"first_name": "FNAME"}), {"FNAME": "text"}) == []
