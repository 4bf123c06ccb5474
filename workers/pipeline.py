"""The pure pipeline: delivery -> validated canonical events -> merged, enriched profile."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from adapters.sources.registry import EventMapping
from schemas.delivery import Delivery
from schemas.errors import EventInvalid, MergetagError, UnsupportedEvent
from schemas.events import Event, Identity
from schemas.profile import ANONYMOUS, DEFAULT_BLOCKED, EMAIL, PHONE, IdentityHasher, Profile, identity_key
from workers.enrich import enrich
from workers.merge import DEFAULT_RULES, MergeRules, apply_event


def parse_delivery(data: Mapping[str, object]) -> Delivery:
    try:
        return Delivery.model_validate(data)
    except ValidationError as exc:
        errors = [{"event": "delivery", "loc": ".".join(map(str, e["loc"])), "type": e["type"], "msg": e["msg"]}
                  for e in exc.errors(include_input=False, include_url=False, include_context=False)]
        raise EventInvalid(f"delivery: {', '.join(sorted({e['loc'] for e in errors}))}", errors=errors) from None


def events_for(delivery: Delivery, mappings: dict[str, EventMapping]) -> list[Event]:
    """Validate and map one delivery. Raises EventInvalid or UnsupportedEvent (both permanent)."""
    mapping = mappings.get(delivery.source)
    if mapping is None:
        raise UnsupportedEvent(f"no mapping for source {delivery.source!r}")
    try:
        return mapping(delivery)
    except MergetagError:
        raise
    except (ArithmeticError, AttributeError, KeyError, LookupError, OSError, OverflowError, TypeError, ValueError) as exc:
        # The payload is not shaped as the mapping expects: bad input, kept in quarantine, never retried.
        error = {"event": delivery.topic, "loc": "payload", "type": "mapping_failed", "msg": type(exc).__name__}
        raise EventInvalid(f"{delivery.source} {delivery.topic}: mapping failed ({type(exc).__name__})", errors=[error]) from None


def by_identity(events: Iterable[Event]) -> dict[Identity, list[Event]]:
    """One delivery may name more than one person (an order's contact and its customer)."""
    groups: dict[Identity, list[Event]] = defaultdict(list)
    for event in events:
        groups[event.identity].append(event)
    return dict(groups)


def usable_identity(identity: Identity, blocked: frozenset[str] = DEFAULT_BLOCKED) -> Identity | None:
    """The identity without placeholder values that would tie strangers together; None if nothing is left."""
    fields = {
        name: value
        for name in ("email", "customer_id", "anonymous_id", "phone")
        if (value := getattr(identity, name)) is not None and value.strip().lower() not in blocked
    }
    return Identity(**fields) if fields else None


def attributable(events: list[Event], blocked: frozenset[str]) -> list[Event]:
    """Events with placeholder identifiers removed; EventInvalid when one has no real identifier left."""
    kept, problems = [], []
    for event in events:
        if event.identity is None:  # an operator's erasure, naming the person by identity keys only
            kept.append(event)
            continue
        identity = usable_identity(event.identity, blocked)
        if identity is None:
            problems.append({"event": event.type, "loc": "identity", "type": "blocked_identifier",
                             "msg": "every identifier is a blocked placeholder value"})
        else:
            kept.append(event if identity == event.identity else event.model_copy(update={"identity": identity}))
    if problems:
        raise EventInvalid("identity: only blocked identifiers", errors=problems)
    return kept


def lookup_keys(identity: Identity, source: str) -> list[str]:
    """The identity's keys, strongest first: email, phone, the source's customer id, anonymous id."""
    pairs = ((EMAIL, identity.email), (PHONE, identity.phone), (source, identity.customer_id), (ANONYMOUS, identity.anonymous_id))
    return [identity_key(kind, value) for kind, value in pairs if value is not None]


def addresses(profile: Profile) -> set[str]:
    """Every email address a live profile knows: the current one, earlier ones, those of absorbed profiles."""
    return {*profile.identifiers.get(EMAIL, ()), *([profile.email] if profile.email else [])}


def unsubscribed(profile: Profile) -> bool:
    consent = profile.consent.get("email")
    return consent is not None and consent.state == "unsubscribed"


def address_work(before: Profile | None, after: Profile, sent: Mapping[str, bool]) -> dict[str, dict[str, list[str]]]:
    """Per ESP target, what the person's other addresses need now that ``before`` became ``after``. Pure.

    - An unsubscribe reaches every address the person had (earlier ones, those of absorbed profiles),
      not only the current one, which the member itself carries; an address that joins later while
      the person is unsubscribed is unsubscribed too.
    - An email change retires the old address at every target that holds it (``sent``: the target
      was sent this profile's member), the way each ESP allows.
    """
    former_after = addresses(after) - {after.email}
    former_before = addresses(before) - {before.email} if before is not None else set()
    unsubscribe = sorted(former_after - (former_before if before is not None and unsubscribed(before) else set())) \
        if unsubscribed(after) else []
    replaced = before.email if before is not None and before.email and before.email != after.email else None
    work: dict[str, dict[str, list[str]]] = {}
    for esp, was_sent in sent.items():
        lists = {**({"unsubscribe": unsubscribe} if unsubscribe else {}), **({"retire": [replaced]} if replaced and was_sent else {})}
        if lists:
            work[esp] = lists
    return work


def over_limits(profile: Profile, limits: dict[str, int], default: int) -> list[str]:
    """Identifier kinds holding more values than allowed: a merge that produces these is refused."""
    return sorted(kind for kind, values in profile.identifiers.items() if len(values) > limits.get(kind, default))


def new_profile(keys: list[str], hasher: IdentityHasher) -> Profile:
    """A fresh profile, its id derived from the strongest key so concurrent creators collide, not duplicate."""
    return Profile(id=hasher.profile_id(keys[0]))


def merge_all(profile: Profile, events: Iterable[Event], tiers: dict[str, float], rules: MergeRules = DEFAULT_RULES) -> Profile:
    for event in events:
        profile = apply_event(profile, event, rules)
    return enrich(profile, tiers)
