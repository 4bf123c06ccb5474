"""The contact SendGrid should hold for a profile: pure, so previews and tests need no account."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from adapters.esps.fields import MappingEntry, mapped
from schemas.profile import Profile

RESERVED = frozenset({"first_name", "last_name", "address_line_1", "address_line_2", "city", "state_province_region",
                      "postal_code", "country"})


def contact_body(profile: Profile, fields: Mapping[str, MappingEntry], today: date | None = None) -> dict[str, Any] | None:
    """The contact SendGrid should hold (custom fields by name), plus ``unsubscribe`` when due. Pure."""
    if profile.email is None:
        return None
    contact: dict[str, Any] = {"email": profile.email.lower()}
    custom: dict[str, Any] = {}
    for tag, value in mapped(profile, fields, today).items():
        # A blank computed value is sent as "", which SendGrid takes as "no value" for every field type.
        if tag in RESERVED:
            contact[tag] = "" if value is None else str(value)
        else:
            custom[tag] = "" if value is None else value
    if custom:
        contact["custom_fields"] = custom
    member: dict[str, Any] = {"contact": contact}
    consent = profile.consent.get("email")
    if consent is not None and consent.state == "unsubscribed":
        member["unsubscribe"] = True
    return member
