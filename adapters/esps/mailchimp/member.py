"""The member Mailchimp should hold for a profile: pure, so previews and tests need no account."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import date
from typing import Any

from adapters.esps.fields import MappingEntry, mapped
from schemas.profile import Profile

_STATUS_IF_NEW = {
    "subscribed": "subscribed",
    "unsubscribed": "unsubscribed",
    "pending": "pending",
    "not_subscribed": "transactional",
}


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()


def member_body(profile: Profile, merge_fields: Mapping[str, MappingEntry], today: date | None = None) -> dict[str, Any] | None:
    """The member Mailchimp should hold for ``profile``. Pure.

    Parameters:
      merge_fields: trait name -> merge tag, or a :class:`FieldMapping` (type, length, default).
        A trait without a value is sent as its default, else left out; a computed one is blanked ("").
    """
    if profile.email is None:
        return None
    fields = {tag: "" if value is None else value for tag, value in mapped(profile, merge_fields, today).items()}
    consent = profile.consent.get("email")
    state = consent.state if consent else "not_subscribed"
    body: dict[str, Any] = {
        "email_address": profile.email,
        "status_if_new": _STATUS_IF_NEW[state],
        "merge_fields": fields,
    }
    if state == "unsubscribed":
        body["status"] = "unsubscribed"
    return body
