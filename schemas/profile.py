"""The profile: one per customer, the single source of every merge field.

Every stored fact keeps its lineage (event time, source, event id) so that the
merge can decide by event time alone and anyone can see where a value came from.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer

from schemas.events import Scalar, millisecond_utc

PROFILE_SCHEMA_VERSION = "1.2"

ANONYMOUS = "anonymous"
EMAIL = "email"
PHONE = "phone"

# Placeholder values senders put where an identifier should be: never used to find or join profiles.
DEFAULT_BLOCKED = frozenset({
    "", "null", "none", "nil", "undefined", "anonymous", "unknown", "n/a", "na", "0", "-1", "test", "guest",
    "test@test.com", "test@example.com", "email@example.com", "noreply@example.com", "no-reply@example.com",
})


Money = Annotated[Decimal, PlainSerializer(lambda d: str(d), return_type=str)]
# Every time a profile holds is UTC at MongoDB's precision, as event times are, whatever built the profile:
# its dates are then the same in memory and after the store handed it back (BSON keeps UTC instants).
UtcTime = Annotated[AwareDatetime, AfterValidator(millisecond_utc)]


class Stamp(BaseModel):
    """Where and when a value came from; the merge orders facts by ``key``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_time: UtcTime
    source: str
    event_id: str
    timed: bool = Field(True, description="False when event_time is an arrival time: such a fact ranks below every timed one (since 1.2).")

    @property
    def key(self) -> tuple[bool, datetime, str, str]:
        return (self.timed, self.event_time, self.source, self.event_id)


class Trait(Stamp):
    value: Scalar


class OrderFact(Stamp):
    total: Money
    currency: str | None = None
    categories: tuple[str, ...] = ()
    counts: bool = Field(True, description="False for cancelled and test orders (since 1.1).")


class CheckoutFact(Stamp):
    url: str | None = None
    total: Money
    item_count: int = 0
    completed: bool = False


ConsentState = Literal["subscribed", "unsubscribed", "pending", "not_subscribed"]


class Consent(Stamp):
    state: ConsentState


class AbandonedCart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    checkout_id: str
    url: str | None = None
    value: Money
    item_count: int = 0
    at: UtcTime


class Computed(BaseModel):
    """Derived by enrichment from the facts above; never merged, always recomputed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lifetime_value: Money = Decimal("0")
    order_count: int = 0
    last_order_date: UtcTime | None = None
    loyalty_tier: str | None = None
    categories_viewed: tuple[str, ...] = ()
    average_order_value: Money = Decimal("0")
    top_categories: tuple[str, ...] = Field(default=(), description="Most ordered, then most viewed (since 1.1).")
    last_email_open: UtcTime | None = None
    preferred_send_hour: int | None = Field(None, ge=0, le=23, description="Local hour with most opens (since 1.1).")
    abandoned_cart: AbandonedCart | None = Field(None, description="The latest checkout left open past the delay, with no order after it (since 1.1).")


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = PROFILE_SCHEMA_VERSION
    id: str
    email: str | None = None
    email_stamp: Stamp | None = Field(None, description="Which event set the primary email: the latest one wins (since 1.1).")
    identifiers: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Every identifier by kind: email, phone, anonymous, and customer ids per source; sorted."
    )
    merged_from: tuple[str, ...] = Field(default=(), description="Ids of profiles absorbed into this one (since 1.1).")
    erased: Stamp | None = Field(None, description="Set when the person was erased: the profile keeps nothing else (since 1.1).")
    traits: dict[str, Trait] = Field(default_factory=dict)
    orders: dict[str, OrderFact] = Field(default_factory=dict)
    checkouts: dict[str, CheckoutFact] = Field(default_factory=dict)
    categories_viewed: tuple[str, ...] = ()
    expired_checkouts: tuple[str, ...] = Field(default=(), description="Checkouts still open when their abandonment delay ran out (since 1.1).")
    consent: dict[str, Consent] = Field(default_factory=dict)
    last_email_open: Stamp | None = None
    last_email_click: Stamp | None = None
    email_opens: tuple[Stamp, ...] = Field(default=(), description="The latest opens, newest first (since 1.1).")
    flags: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Data-quality flag -> the (latest 20) event ids that raised it (since 1.1)."
    )
    first_seen: UtcTime | None = None
    last_seen: UtcTime | None = None
    arrivals: dict[str, UtcTime] = Field(
        default_factory=dict, description="Untimed events (by id): when each first arrived, so a retry is the same fact (latest 50; since 1.2).")
    computed: Computed = Field(default_factory=Computed)


def identity_key(kind: str, value: str) -> str:
    """How an identifier is indexed: ``email:...``, ``<source>:<customer id>``, ``anonymous:...``."""
    return f"{kind}:{value}"


def profile_keys(profile: Profile) -> list[str]:
    """Every identifier that finds this profile."""
    keys = {identity_key(kind, value) for kind, values in profile.identifiers.items() for value in values}
    if profile.email:
        keys.add(identity_key(EMAIL, profile.email))
    return sorted(keys)


ERASED = "erased"


@dataclass(frozen=True)
class IdentityHasher:
    """Keyed hashes (HMAC-SHA256) of identifiers: profile ids, tombstone keys, erasure ids.

    A plain hash of ``email:<address>`` can be recomputed by anyone who guesses the address, so
    every hash that leaves the person's own profile (ids in logs, dead letters, Sentry; the keys
    that recognise an erased person) is keyed with a secret from settings. Secrets rotate: the
    first makes new hashes, every one of them still recognises what older ones made.

    Parameters:
      secrets: newest first; at least one.
    """

    secrets: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("an identity hasher needs at least one secret")

    def digest(self, text: str, secret: bytes | None = None) -> str:
        return hmac.new(secret or self.secrets[0], text.encode(), hashlib.sha256).hexdigest()

    def profile_id(self, key: str) -> str:
        """A stable id for the profile created with identity key ``key``, without spelling it out."""
        return "p_" + self.digest("profile\0" + key)[:32]

    def index_key(self, key: str) -> str:
        """How identity key ``key`` is indexed, for live profiles and tombstones alike: one keyspace, so
        the identity claims themselves keep an erased identifier from ever belonging to a live profile again,
        and a tombstone remembers an erased person without anyone being able to read who they were."""
        return "h:" + self.digest(key)[:40]

    def index_keys(self, key: str) -> list[str]:
        """``key``'s index form under every secret: a rotation finds what older secrets indexed."""
        return ["h:" + self.digest(key, secret)[:40] for secret in self.secrets]

    def erasure_id(self, name: str) -> str:
        """The receipt id of an erasure request named ``name`` (a sender's event id): the same for every retry."""
        return "er_" + self.digest("erasure\0" + name)[:24]
