"""Edge cases before a campaign: which merge tags fall back, get cut, overflow the ESP or render empty."""

import pytest

from adapters.esps.registry import build_esp, descriptor
from adapters.esps.targets import EspTarget
from adapters.esps.templates import TemplateError
from workers.sync import scenarios

TEMPLATE = "Hi *|IF:FNAME|**|FNAME|**|ELSE:|*there*|END:IF|* *|LNAME|*! Orders: *|ORDERS|*. *|IF:CARTURL|*Cart: *|CARTURL|**|END:IF|* *|PROMO|*"
MAILCHIMP = EspTarget(kind="mailchimp", api_key="k-us1", audience="l", fields={
    "first_name": "FNAME", "last_name": {"tag": "LNAME", "max_length": 40, "default": "friend"}, "order_count": "ORDERS",
    "abandoned_cart_url": "CARTURL"})


def run(target: EspTarget = MAILCHIMP, template: str = TEMPLATE) -> dict[str, scenarios.Outcome]:
    return {o.scenario: o for o in scenarios.run(template, target, descriptor(target.kind), build_esp("t", target, offline=True))}


def test_each_edge_case_reports_what_breaks_and_the_complete_profile_nothing_but_its_missing_tag():
    found = run()
    assert found["complete"].tags == {"CARTURL": ["fell_back"], "PROMO": ["unmapped", "empty"]}
    assert found["complete"].rendered.startswith("Hi Ada Lovelace! Orders: 3.")
    assert found["missing_first_name"].tags["FNAME"] == ["fell_back"]
    assert found["missing_first_name"].rendered.startswith("Hi there Hopper!")
    # The mapping cuts last names to 40 characters; a 336-character first name overflows Mailchimp's 255.
    assert found["very_long_values"].tags["LNAME"] == ["truncated"] and found["very_long_values"].tags["FNAME"] == ["overflow"]
    assert found["zero_orders"].tags["LNAME"] == ["fell_back"] and "friend" in found["zero_orders"].rendered
    assert "CARTURL" not in found["abandoned_cart"].tags and "https://shop.example/cart/c0ffee" in found["abandoned_cart"].rendered
    assert "李小龍 👩🏽‍💻" in found["non_latin_and_emoji"].rendered and "FNAME" not in found["non_latin_and_emoji"].tags


def test_limits_are_the_targets_own():
    sendgrid = EspTarget(kind="sendgrid", api_key="SG.x", audience="l", fields={"first_name": "first_name", "city": "city"})
    found = run(sendgrid, "*|first_name|* in *|city|*")
    assert found["very_long_values"].tags == {"first_name": ["overflow"], "city": ["overflow"]}  # 50 and 60 characters at SendGrid
    assert "first_name" not in found["non_latin_and_emoji"].tags


def test_the_report_groups_problems_by_tag_and_refuses_unknown_targets_and_broken_templates():
    shown = scenarios.report(TEMPLATE, {"mailchimp": MAILCHIMP}, "mailchimp")
    assert shown["problems"]["FNAME"] == {"fell_back": ["missing_first_name"], "overflow": ["very_long_values"]}
    assert len(shown["scenarios"]) == len(scenarios.SCENARIOS) >= 7
    with pytest.raises(ValueError):
        scenarios.report(TEMPLATE, {"mailchimp": MAILCHIMP}, "klaviyo")
    with pytest.raises(TemplateError):
        scenarios.report("*|IF:FNAME|* unclosed", {"mailchimp": MAILCHIMP}, "mailchimp")
