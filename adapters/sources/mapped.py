"""Declarative mappings: a sender's event type -> a canonical event, by field paths.

A CRM that signs its own way and sends its own JSON needs configuration, not
code: each canonical field names a dotted path into the payload (``data.email``),
a constant, or a path with a divisor (cents -> units).
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from adapters.sources.base import path_get
from schemas.delivery import Delivery

CanonicalType = Literal[
    "customer.identified", "customer.updated", "order.completed", "checkout.started", "checkout.updated",
    "product.viewed", "consent.changed", "email.opened", "email.clicked", "customer.erased",
]


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    const: Any = None
    divide: float | None = Field(None, gt=0, description="Divide a number (e.g. cents by 100).")

    def read(self, payload: Any) -> Any:
        value = path_get(payload, self.path) if self.path else self.const
        if value is not None and self.divide and isinstance(value, int | float | str):
            value = Decimal(str(value)) / Decimal(str(self.divide))
        return value


FieldRef = Union[str, FieldSpec]


class EventSpec(BaseModel):
    """How one sender event type becomes one canonical event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: CanonicalType
    email: FieldRef | None = None
    customer_id: FieldRef | None = None
    anonymous_id: FieldRef | None = None
    event_time: FieldRef | None = Field(None, description="ISO 8601, or Unix seconds or milliseconds.")
    event_id: FieldRef | None = Field(None, description="Defaults to the delivery's de-duplication key or id.")
    traits: dict[str, FieldRef] = Field(default_factory=dict)
    fields: dict[str, FieldRef] = Field(default_factory=dict, description="Other canonical fields (order_id, total...).")


def read(ref: FieldRef | None, payload: Any) -> Any:
    if ref is None:
        return None
    return (FieldSpec(path=ref) if isinstance(ref, str) else ref).read(payload)


def as_time(value: Any) -> Any:
    """Unix seconds or milliseconds become aware datetimes; anything else is left to validation."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, tz=timezone.utc)
    return value


def context(ip: Any, user_agent: Any) -> dict[str, str] | None:
    """An event context from whatever the sender provides; None when it gives neither."""
    found = {k: v for k, v in (("ip", ip), ("user_agent", user_agent)) if isinstance(v, str) and v}
    return found or None


def _id(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else str(value)


def map_event(spec: EventSpec, delivery: Delivery) -> dict[str, Any]:
    """The raw canonical event (validated by the caller) that ``spec`` makes of ``delivery``. Pure."""
    p = delivery.payload
    name = _id(read(spec.event_id, p)) or delivery.dedup_key or delivery.delivery_id
    at = as_time(read(spec.event_time, p)) or delivery.triggered_at
    return {
        "type": spec.event,
        "event_id": f"{delivery.source}:{name}:{spec.event}",
        "source": delivery.source,
        "event_time": at or delivery.received_at,
        "timed": at is not None,
        "received_at": delivery.received_at,
        "identity": {
            "email": read(spec.email, p),
            "customer_id": _id(read(spec.customer_id, p)),
            "anonymous_id": _id(read(spec.anonymous_id, p)),
        },
        **({"traits": {k: read(v, p) for k, v in spec.traits.items()}} if spec.event in ("customer.identified", "customer.updated") else {}),
        **{k: read(v, p) for k, v in spec.fields.items()},
    }


STRIPE_PRESET: dict[str, EventSpec] = {
    kind: EventSpec(
        event="customer.updated", email="data.object.email", customer_id="data.object.id", event_time="created",
        event_id="id", traits={"name": "data.object.name", "phone": "data.object.phone"},
    )
    for kind in ("customer.created", "customer.updated")
} | {
    "checkout.session.completed": EventSpec(
        event="order.completed", email="data.object.customer_details.email", customer_id="data.object.customer",
        event_time="created", event_id="id",
        fields={"order_id": "data.object.id", "total": FieldSpec(path="data.object.amount_total", divide=100),
                "currency": "data.object.currency"},
    ),
    "invoice.paid": EventSpec(
        event="order.completed", email="data.object.customer_email", customer_id="data.object.customer",
        event_time="created", event_id="id",
        fields={"order_id": "data.object.id", "total": FieldSpec(path="data.object.amount_paid", divide=100),
                "currency": "data.object.currency"},
    ),
}
PRESETS = {"stripe": STRIPE_PRESET}
