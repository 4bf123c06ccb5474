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

from adapters.store.erasures import ErasureReceipts
from broker.publisher import Publisher, publish_delivery
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


async def request_erasure(receipts: ErasureReceipts, publisher: Publisher, queue: str, hasher: IdentityHasher,
                          keys: list[str], requested_by: str) -> str:
    """An operator's erasure: the receipt first (so its status can be asked at once), then the
    request, confirmed into the events queue. Returns the receipt id."""
    request_id = new_request_id()
    await receipts.request(request_id, hashed(keys, hasher), requested_by)
    await publish_delivery(publisher, queue, erasure_delivery(keys, request_id, requested_by))
    return request_id
