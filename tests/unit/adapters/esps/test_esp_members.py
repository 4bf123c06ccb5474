"""What each ESP is sent for a profile (pure), checked against the vendors' specs, and how targets are configured."""

import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.esps.fields import FieldMapping, mapped
from adapters.esps.klaviyo.client import CONTENT_TYPE, REVISION
from adapters.esps.klaviyo.member import profile_body
from adapters.esps.sendgrid.member import contact_body
from adapters.esps.targets import load_file
from adapters.settings import Settings
from schemas.profile import AbandonedCart, Computed, Consent, Profile, Trait
from tests.support.openapi_check import check_request

T = datetime(2026, 3, 4, 5, 6, tzinfo=timezone.utc)
STAMP = {"event_time": T, "source": "shopify", "event_id": "e"}
README = Path(__file__).resolve().parents[4] / "README.md"


def profile(**changes) -> Profile:
    base = Profile(
        id="p", email="Ann@Example.com",
        traits={"first_name": Trait(value="Ann", **STAMP), "city": Trait(value="Oslo", **STAMP), "zip": Trait(value=1234, **STAMP)},
        computed=Computed(lifetime_value=Decimal("42.50"), order_count=3, loyalty_tier="silver"),
    )
    return base.model_copy(update=changes)


def test_mapped_values_defaults_and_blanks():
    values = mapped(profile(), {"first_name": "F", "last_name": FieldMapping(tag="L", default="there"), "nickname": "N",
                                "abandoned_cart_url": "CART", "lifetime_value": FieldMapping(tag="LTV", type="text")})
    # A trait without a value is left out (never erases), its default is used when there is one,
    # and a computed value that is gone is None: each ESP blanks it its own way.
    assert values == {"F": "Ann", "L": "there", "CART": None, "LTV": "42.5"}


def test_klaviyo_profile_is_spec_valid_and_blanks_with_null():
    fields = {"first_name": "first_name", "city": "location.city", "zip": "location.zip", "lifetime_value": "lifetime_value",
              "loyalty_tier": "tier", "abandoned_cart_url": "cart_url"}
    member = profile_body(profile(), fields)
    attributes = member["profile"]["attributes"]
    assert attributes["email"] == "Ann@Example.com" and attributes["first_name"] == "Ann"
    assert attributes["location"] == {"city": "Oslo", "zip": "1234"}  # location values are strings
    assert attributes["properties"] == {"lifetime_value": 42.5, "tier": "silver", "cart_url": None}
    assert "unsubscribe" not in member
    body = json.dumps({"data": member["profile"]})
    headers = {"Authorization": "Klaviyo-API-Key", "revision": REVISION, "Content-Type": CONTENT_TYPE}
    assert check_request("klaviyo", "POST", "/api/profile-import", "", headers, body) == []

    leaving = profile_body(profile(consent={"email": Consent(state="unsubscribed", **STAMP)}), fields)
    assert leaving["unsubscribe"] is True and "subscriptions" not in leaving["profile"]["attributes"]  # never (re)subscribes
    assert profile_body(profile(email=None), fields) is None


def test_sendgrid_contact_is_spec_valid_lowercased_and_blanks_with_empty_string():
    fields = {"first_name": "first_name", "city": "city", "lifetime_value": "ltv", "abandoned_cart_value": "cart_value"}
    member = contact_body(profile(), fields)
    assert member == {"contact": {"email": "ann@example.com", "first_name": "Ann", "city": "Oslo",
                                  "custom_fields": {"ltv": 42.5, "cart_value": ""}}}
    wire = {"list_ids": ["5f0a1c3e-8b7d-4e2a-9c61-0d3b2a4e5f67"],
            "contacts": [{**member["contact"], "custom_fields": {"e1_N": 42.5, "e2_N": ""}}]}
    assert check_request("sendgrid", "PUT", "/v3/marketing/contacts", "", {"Authorization": "Bearer", "Content-Type": "application/json"},
                         json.dumps(wire)) == []
    cart = AbandonedCart(checkout_id="c", url="https://shop/c", value=Decimal("9.5"), at=T)
    with_cart = contact_body(profile(computed=Computed(abandoned_cart=cart), consent={"email": Consent(state="unsubscribed", **STAMP)}), fields)
    assert with_cart["contact"]["custom_fields"]["cart_value"] == 9.5 and with_cart["unsubscribe"] is True


def test_targets_from_a_toml_file_read_keys_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KLAVIYO_EU_KEY", "pk_eu_secret")
    path = tmp_path / "esps.toml"
    path.write_text('[klaviyo-eu]\nkind = "klaviyo"\napi_key_env = "KLAVIYO_EU_KEY"\naudience = "Xy12"\n'
                    '[klaviyo-eu.fields]\nfirst_name = "first_name"\nlifetime_value = { tag = "ltv", type = "number" }\n')
    targets = load_file(str(path))
    assert list(targets) == ["klaviyo-eu"]
    target = targets["klaviyo-eu"]
    assert target.key() == "pk_eu_secret" and "pk_eu_secret" not in repr(target)
    assert target.fields["lifetime_value"] == FieldMapping(tag="ltv", type="number")
    path.write_text('[x]\nkind = "hubspot"\n')
    with pytest.raises(ValidationError):
        load_file(str(path))


def test_targets_without_a_file_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("MERGETAG_SENDGRID_LIST_ID", "L1")
    settings = Settings(esps="mailchimp,sendgrid")
    targets = settings.esp_targets()
    assert [(n, t.kind) for n, t in targets.items()] == [("mailchimp", "mailchimp"), ("sendgrid", "sendgrid")]
    assert targets["sendgrid"].audience == "L1" and targets["sendgrid"].fields["lifetime_value"] == "ltv"
    with pytest.raises(ValueError, match="hubspot"):
        Settings(esps="mailchimp,hubspot").esp_targets()


def test_the_readme_esp_file_example_loads(tmp_path, monkeypatch):
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README shows an ESP file"
    path = tmp_path / "esps.toml"
    path.write_text(block.group(1))
    for name in re.findall(r'api_key_env = "([A-Z_]+)"', block.group(1)):
        monkeypatch.setenv(name, "k")
    targets = load_file(str(path))
    assert {t.kind for t in targets.values()} == {"mailchimp", "klaviyo", "sendgrid"}
    assert all(t.key() == "k" and t.fields for t in targets.values())


def test_a_target_without_its_key_or_audience_fails_loudly_at_start_up(monkeypatch):
    from adapters.esps import registry

    for name in ("MERGETAG_MAILCHIMP_API_KEY", "MERGETAG_MAILCHIMP_LIST_ID", "MERGETAG_KLAVIYO_API_KEY", "MERGETAG_SENDGRID_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for kind in ("mailchimp", "klaviyo", "sendgrid"):
        with pytest.raises(ValueError, match="API key|audience"):
            registry.build_all(Settings(esps=kind))
    monkeypatch.setenv("MERGETAG_MAILCHIMP_API_KEY", "0123456789abcdef0123456789abcdef-us6")
    with pytest.raises(ValueError, match="audience"):
        registry.build_all(Settings(esps="mailchimp"))
    monkeypatch.setenv("MERGETAG_MAILCHIMP_LIST_ID", "a1b2c3")
    [(client, guard)] = registry.build_all(Settings(esps="mailchimp")).values()
    assert client.http.base == "https://us6.api.mailchimp.com/3.0"  # the data centre named by the key
