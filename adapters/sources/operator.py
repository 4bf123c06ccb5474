"""Erasures requested by operators (``mergetag erase``, ``POST /admin/erasures``), queued like any
delivery so they take the same durable path, retries and ordering as a sender's.

The delivery carries the identifiers in the clear, as every delivery does, only as far as the
worker that erases them; the receipt written beforehand holds their keyed hashes only.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import CustomerErased, Event
from schemas.profile import EMAIL, PHONE, IdentityHasher

NAME = "operator"
TOPIC = "erasure"


def request_keys(emails: list[str], phones: list[str], ids: list[str]) -> list[str]:
    """The request's identity keys, validated and normalised; raises EventInvalid naming what is wrong."""
    keys = [f"{EMAIL}:{e}" for e in emails] + [f"{PHONE}:{p}" for p in phones] + list(ids)
    try:
        event = CustomerErased(event_id="check", source=NAME, event_time=datetime.now(timezone.utc),
                               received_at=datetime.now(timezone.utc), also=tuple(keys))
    except ValidationError as exc:
        errors = [{"event": "customer.erased", "loc": "identifiers", "type": e["type"], "msg": e["msg"]}
                  for e in exc.errors(include_input=False, include_url=False, include_context=False)]
        raise EventInvalid("erasure: unusable identifiers", errors=errors) from None
    return list(event.also)


def erasure_delivery(keys: list[str], request_id: str, requested_by: str) -> Delivery:
    return Delivery(source=NAME, topic=TOPIC, delivery_id=request_id, received_at=datetime.now(timezone.utc),
                    meta={"requested_by": requested_by}, payload={"request_id": request_id, "keys": keys})


def new_request_id() -> str:
    return "er_" + uuid.uuid4().hex[:24]


def hashed(keys: list[str], hasher: IdentityHasher) -> list[str]:
    return sorted(hasher.index_key(k) for k in keys)


def to_events(delivery: Delivery) -> list[Event]:
    p: dict[str, Any] = delivery.payload
    return [CustomerErased(event_id=f"{NAME}:{TOPIC}:{p['request_id']}", source=NAME, event_time=delivery.received_at,
                           received_at=delivery.received_at, also=tuple(p["keys"]), request_id=p["request_id"])]
