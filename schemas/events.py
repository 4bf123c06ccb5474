"""Canonical events: the one language every source is mapped into.

Each event carries its own identity (``event_id``), where it came from
(``source``), when it happened (``event_time``) and when mergetag first saw it
(``received_at``). The merge depends on ``event_time`` and ``source`` only.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

EVENT_SCHEMA_VERSION = "1.2"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_AMOUNT = Decimal(10) ** 12
AMOUNT_PLACES = 4
MAX_QUANTITY = 1_000_000
MAX_USER_AGENT = 512

_SURROGATE = re.compile("[\ud800-\udfff]")


def millisecond_utc(value: datetime) -> datetime:
    """Store and compare at the precision MongoDB keeps, in UTC, so a round trip changes nothing."""
    return value.astimezone(timezone.utc).replace(microsecond=value.microsecond // 1000 * 1000)


def has_lone_surrogate(text: str) -> bool:
    """Python strings may hold surrogates that no UTF-8 (so no BSON, Redis or HTTP) can carry."""
    return _SURROGATE.search(text) is not None


def storable(value: Any) -> Any:
    """``value`` if MongoDB can store it and the enrichment compute with it; a PydanticCustomError naming why not.

    Strings must be valid Unicode (no lone surrogates: BSON is UTF-8), integers fit BSON's signed 64
    bits, floats are finite. Walks dicts, lists and tuples (keys too); models check themselves.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                raise PydanticCustomError("invalid_unicode", "text is not valid Unicode (a lone surrogate)")
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise PydanticCustomError("number_out_of_range", "integer outside signed 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise PydanticCustomError("invalid_number", "number is not finite (NaN or infinity)")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


Scalar = Annotated[Union[str, int, float, bool, None], AfterValidator(storable)]


def _amount(value: Decimal) -> Decimal:
    """More than AMOUNT_PLACES decimals (float noise such as 59.970000000000006) are rounded half-even."""
    return value.quantize(Decimal(1).scaleb(-AMOUNT_PLACES)) if value.as_tuple().exponent < -AMOUNT_PLACES else value


def _text(value: Any) -> Any:
    """Checked before ``min_length`` reads it (pydantic would name it string_unicode): one reason for all text."""
    return storable(value) if isinstance(value, str) else value


Name = Annotated[str, BeforeValidator(_text), Field(min_length=1)]

# Money as the enrichment can sum and average it exactly in Decimal's 28 digits: finite, 0 to 10^12,
# at most 4 decimals. Lifetime sums stay exact to 10^24 (a trillion such orders); quantizing the
# average to cents never overflows.
Amount = Annotated[Decimal, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False), AfterValidator(_amount)]


class _Checked(BaseModel):
    """Every field of every event must be storable (see :func:`storable`), whatever its declared type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)


def normalize_email(value: str | None) -> str | None:
    """Trim and lowercase: one person, one key, whatever the sender typed."""
    if value is None:
        return None
    value = value.strip().lower()
    return value or None


def valid_email(value: str) -> bool:
    return "@" in value and not value.startswith("@") and not value.endswith("@")


def normalize_phone(value: str | None) -> str | None:
    """Keep a leading ``+`` and the digits; separators and spaces go."""
    if value is None:
        return None
    digits = "".join(ch for ch in value if ch.isdigit())
    if len(digits) < 5:
        return None
    return ("+" if value.strip().startswith("+") else "") + digits


class Identity(_Checked):
    """Who the event is about. At least one identifier is required."""

    email: str | None = None
    customer_id: str | None = Field(None, description="The source's own customer id, as a string.")
    anonymous_id: str | None = Field(None, description="A device or cookie id, before the person is known (since 1.1).")
    phone: str | None = Field(None, description="E.164-like: '+' and digits only (since 1.1).")

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalize_phone(value)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        value = normalize_email(value)
        if value is not None and not valid_email(value):
            raise ValueError("not an email address")
        return value

    @model_validator(mode="after")
    def _some_identifier(self) -> Identity:
        if self.email is None and self.customer_id is None and self.anonymous_id is None and self.phone is None:
            raise ValueError("an identity needs an email, a phone, a customer id or an anonymous id")
        return self


class EventContext(_Checked):
    """Where the event came from; used for enrichment, then dropped (since 1.1)."""

    ip: str | None = None
    user_agent: str | None = Field(None, description=f"Cut to its first {MAX_USER_AGENT} characters (since 1.2).")

    @field_validator("user_agent", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        """Browsers send under 512 bytes; parsing cost grows with the length, so a longer one is cut first."""
        return value[:MAX_USER_AGENT] if isinstance(value, str) else value


class LineItem(_Checked):
    product_id: str | None = None
    title: str | None = None
    category: str | None = None
    price: Amount = Decimal("0")
    quantity: int = Field(1, ge=0, le=MAX_QUANTITY)


class _Event(_Checked):
    schema_version: str = EVENT_SCHEMA_VERSION
    event_id: Name = Field(description="Stable across re-deliveries of the same happening.")
    source: Name
    event_time: AwareDatetime
    timed: bool = Field(True, description="False when the sender gave no time, so event_time is when mergetag first "
                                          "saw the delivery: such a fact never outranks one with a time of its own (since 1.2).")
    received_at: AwareDatetime
    identity: Identity
    context: EventContext | None = None

    @field_validator("event_time", "received_at")
    @classmethod
    def _millisecond_utc(cls, value: datetime) -> datetime:
        return millisecond_utc(value)


class CustomerUpdated(_Event):
    """A customer was created, identified or changed: new trait values."""

    type: Literal["customer.identified", "customer.updated"]
    traits: dict[str, Scalar] = Field(default_factory=dict)


class OrderCompleted(_Event):
    """An order and its latest state; a cancelled or test order never counts (flags since 1.1)."""

    type: Literal["order.completed"] = "order.completed"
    order_id: Name
    total: Amount
    currency: str | None = None
    items: tuple[LineItem, ...] = ()
    cancelled: bool = False
    test: bool = False


class CheckoutChanged(_Event):
    type: Literal["checkout.started", "checkout.updated"]
    checkout_id: Name
    url: str | None = None
    total: Amount
    currency: str | None = None
    items: tuple[LineItem, ...] = ()
    completed: bool = False


class ProductViewed(_Event):
    type: Literal["product.viewed"] = "product.viewed"
    product_id: str | None = None
    title: str | None = None
    category: str | None = None
    url: str | None = None


class ConsentChanged(_Event):
    type: Literal["consent.changed"] = "consent.changed"
    channel: Literal["email", "sms"] = "email"
    state: Literal["subscribed", "unsubscribed", "pending", "not_subscribed"]


class EmailOpened(_Event):
    type: Literal["email.opened"] = "email.opened"
    esp: str
    campaign_id: str | None = None


class EmailClicked(_Event):
    """Since 1.1."""

    type: Literal["email.clicked"] = "email.clicked"
    esp: str
    campaign_id: str | None = None
    url: str | None = None


class CustomerErased(_Event):
    """The person asked to be forgotten (since 1.1). Absorbing: nothing is merged into them afterwards.

    Names the person by ``identity`` and/or by ``also``: every further identifier of the request as
    an identity key (``email:…``, ``phone:…``, ``<source>:<customer id>``, ``anonymous:…``), so an
    operator can erase someone known to several senders at once (since 1.2).
    """

    type: Literal["customer.erased"] = "customer.erased"
    identity: Identity | None = None  # type: ignore[assignment]
    also: tuple[str, ...] = Field(default=(), description="More identity keys of the same person (since 1.2).")
    request_id: str | None = Field(None, description="The erasure receipt this request reports to (operators' requests; since 1.2).")

    @field_validator("also")
    @classmethod
    def _keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        normalized = []
        for key in keys:
            kind, _, value = key.partition(":")
            if not kind or not value.strip():
                raise ValueError("identity keys look like kind:value")
            value = normalize_email(value) if kind == "email" else normalize_phone(value) if kind == "phone" else value.strip()
            if not value or (kind == "email" and not valid_email(value)):
                raise ValueError(f"not a usable {kind}")
            normalized.append(f"{kind}:{value}")
        return tuple(sorted(set(normalized)))

    @model_validator(mode="after")
    def _names_someone(self) -> CustomerErased:
        if self.identity is None and not self.also:
            raise ValueError("an erasure names the person: an identity or identity keys")
        return self


Event = Annotated[
    Union[CustomerUpdated, OrderCompleted, CheckoutChanged, ProductViewed, ConsentChanged, EmailOpened, EmailClicked,
          CustomerErased],
    Field(discriminator="type"),
]
EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "MAX_AMOUNT",
    "MAX_USER_AGENT",
    "Amount",
    "CheckoutChanged",
    "ConsentChanged",
    "CustomerErased",
    "CustomerUpdated",
    "EmailClicked",
    "EventContext",
    "EmailOpened",
    "Event",
    "EventAdapter",
    "Identity",
    "LineItem",
    "OrderCompleted",
    "ProductViewed",
    "Scalar",
    "has_lone_surrogate",
    "millisecond_utc",
    "normalize_email",
    "storable",
]
