"""From a delivery to the events it carries: validated, mapped by its sender, attributable to a person. Pure."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from adapters.sources.registry import EventMapping
from schemas.delivery import Delivery
from schemas.errors import EventInvalid, MergetagError, UnsupportedEvent
from schemas.events import Event, Identity
from schemas.profile import DEFAULT_BLOCKED


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


@dataclass
class RedrivePlan:
    """What redriving quarantined deliveries would do under today's mappings: which pass validation now
    (they will merge), which would come back to quarantine and why."""

    deliveries: int = 0
    passing: list[str] = field(default_factory=list)
    failing: dict[str, int] = field(default_factory=dict)
    """Reasons they would fail again, with counts."""
    events: int = 0
    """Events the passing deliveries carry."""


def redrive_plan(quarantined: Iterable[tuple[str, Mapping[str, object]]], mappings: dict[str, EventMapping],
                 blocked: frozenset[str] = DEFAULT_BLOCKED) -> RedrivePlan:
    """Validate each ``(key, delivery)`` as the merge would, without merging anything. Pure."""
    plan = RedrivePlan()
    for key, delivery in quarantined:
        plan.deliveries += 1
        try:
            events = attributable(events_for(parse_delivery(delivery), mappings), blocked)
        except EventInvalid as exc:
            for reason in sorted({f"{e.get('event')}:{e.get('loc')}:{e.get('type')}" for e in exc.errors}):
                plan.failing[reason] = plan.failing.get(reason, 0) + 1
            continue
        except UnsupportedEvent:
            plan.failing["unsupported_event"] = plan.failing.get("unsupported_event", 0) + 1
            continue
        plan.passing.append(key)
        plan.events += len(events)
    return plan
