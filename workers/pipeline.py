"""The pure pipeline: delivery -> validated canonical events -> merged, enriched profile."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from adapters.sources import shopify
from schemas.delivery import Delivery
from schemas.errors import EventInvalid, UnsupportedEvent
from schemas.events import Event, Identity
from schemas.profile import Profile, profile_id_for_email
from workers.enrich import enrich
from workers.merge import apply_event

MAPPINGS = {shopify.NAME: shopify.to_events}


def parse_delivery(data: Mapping[str, object]) -> Delivery:
    try:
        return Delivery.model_validate(data)
    except ValidationError as exc:
        locs = sorted({".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)})
        raise EventInvalid(f"delivery: {', '.join(locs)}") from None


def events_for(delivery: Delivery) -> list[Event]:
    """Validate and map one delivery. Raises EventInvalid or UnsupportedEvent (both permanent)."""
    mapping = MAPPINGS.get(delivery.source)
    if mapping is None:
        raise UnsupportedEvent(f"no mapping for source {delivery.source!r}")
    return mapping(delivery)


def by_identity(events: Iterable[Event]) -> dict[Identity, list[Event]]:
    """One delivery may name more than one person (an order's contact and its customer)."""
    groups: dict[Identity, list[Event]] = defaultdict(list)
    for event in events:
        groups[event.identity].append(event)
    return dict(groups)


def new_profile(identity: Identity) -> Profile | None:
    """A fresh profile for an identity that can name one (an email); None otherwise."""
    if identity.email is None:
        return None
    return Profile(id=profile_id_for_email(identity.email))


def merge_all(profile: Profile, events: Iterable[Event], tiers: dict[str, float]) -> Profile:
    for event in events:
        profile = apply_event(profile, event)
    return enrich(profile, tiers)
