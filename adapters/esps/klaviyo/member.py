"""The profile resource Klaviyo should hold for a profile: pure, so previews and tests need no account."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from adapters.esps.fields import MappingEntry, mapped
from schemas.events import Scalar
from schemas.profile import Profile

STANDARD = frozenset({"first_name", "last_name", "organization", "title", "image", "locale", "phone_number", "external_id"})
LOCATION = frozenset({"address1", "address2", "city", "country", "region", "zip", "timezone", "latitude", "longitude"})


def profile_body(profile: Profile, fields: Mapping[str, MappingEntry], today: date | None = None) -> dict[str, Any] | None:
    """The profile resource Klaviyo should hold for ``profile``, plus ``unsubscribe`` when due. Pure."""
    if profile.email is None:
        return None
    attributes: dict[str, Any] = {"email": profile.email}
    properties: dict[str, Any] = {}
    for tag, value in mapped(profile, fields, today).items():
        if tag in STANDARD:
            attributes[tag] = None if value is None else str(value)
        elif tag.startswith("location.") and tag[9:] in LOCATION:
            if value is not None or tag[9:] not in ("latitude", "longitude"):  # coordinates cannot be cleared
                attributes.setdefault("location", {})[tag[9:]] = None if value is None else str(value)
        else:
            properties[tag] = value
    if properties:
        attributes["properties"] = properties
    member: dict[str, Any] = {"profile": {"type": "profile", "attributes": attributes}}
    consent = profile.consent.get("email")
    if consent is not None and consent.state == "unsubscribed":
        member["unsubscribe"] = True
    return member


def flatten(attributes: Mapping[str, Any]) -> dict[str, Scalar]:
    """Attributes by mapping tag: standard ones by name, ``location.x``, custom properties by name."""
    out: dict[str, Scalar] = {k: v for k, v in attributes.items() if k in STANDARD}
    out.update({f"location.{k}": v for k, v in (attributes.get("location") or {}).items()})
    out.update(attributes.get("properties") or {})
    return out
