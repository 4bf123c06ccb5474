"""The merge: a pure function from (profile, event) to profile.

Every field is a join-semilattice, so applying a set of events in any order,
any number of times, yields the same profile:

- traits, orders, checkouts and consent are last-writer-wins registers ordered
  by ``(event_time, source, event_id)``; a re-delivered event has an equal key
  and changes nothing, an older one loses;
- orders are keyed by order id, so counters derived from them never double count;
- categories viewed are a set union; first/last seen are min/max.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from schemas.events import (
    CheckoutChanged,
    ConsentChanged,
    CustomerErased,
    CustomerUpdated,
    EmailClicked,
    EmailOpened,
    Event,
    OrderCompleted,
    ProductViewed,
)
from schemas.profile import (
    ANONYMOUS,
    EMAIL,
    PHONE,
    CheckoutFact,
    Consent,
    OrderFact,
    Profile,
    Stamp,
    Trait,
)
from workers.profiles.enrich import enrich
from workers.profiles.quality import quality_flags

S = TypeVar("S", bound=Stamp)

_CONSENT_RANK = {"unsubscribed": 3, "not_subscribed": 2, "pending": 1, "subscribed": 0}


@dataclass(frozen=True)
class MergeRules:
    """Configurable merge policy.

    Parameters:
      trait_priority: trait -> sources, most trusted first. For these traits a
        listed source beats any unlisted one, and a higher-listed source beats a
        lower one, whatever the event times; recency decides among equals.
    """

    trait_priority: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def rank(self, trait: str, source: str) -> int:
        order = self.trait_priority.get(trait, ())
        return len(order) - order.index(source) if source in order else 0


DEFAULT_RULES = MergeRules()


def newer(current: S | None, candidate: S, rank: Callable[[Stamp], int] = lambda s: 0) -> S:
    """Last writer wins by (priority, event time); source, event id and finally content break ties.

    A total order on facts, so the winner never depends on arrival order.
    """
    if current is None:
        return candidate
    a, b = (rank(candidate), candidate.key), (rank(current), current.key)
    if a > b or (a == b and candidate.model_dump_json() > current.model_dump_json()):
        return candidate
    return current


KEPT_OPENS = 50
KEPT_FLAG_EVENTS = 20


def latest(stamps: set[Stamp], keep: int) -> tuple[Stamp, ...]:
    """The ``keep`` newest by key: a function of the set alone, so order-independent."""
    return tuple(sorted(stamps, key=lambda s: s.key, reverse=True)[:keep])


def _consent_key(consent: Consent) -> tuple[bool, datetime, int, str, str]:
    """At the same instant, the more restrictive state wins: consent is never assumed."""
    return (consent.timed, consent.event_time, _CONSENT_RANK[consent.state], consent.source, consent.event_id)


def _stamp(event: Event) -> dict[str, object]:
    return {"event_time": event.event_time, "source": event.source, "event_id": event.event_id, "timed": event.timed}


KEPT_ARRIVALS = 50


def arrived(profile: Profile, event: Event) -> tuple[Event, dict[str, datetime]]:
    """An event without a time of its own takes the time its delivery first arrived, as the profile
    remembers it: a sender's retry (same event id, later arrival) is then the very same fact and
    changes nothing, with or without the receiver's de-duplication. Timed events pass unchanged."""
    if event.timed:
        return event, profile.arrivals
    first = min(profile.arrivals.get(event.event_id, event.event_time), event.event_time)
    arrivals = _newest({**profile.arrivals, event.event_id: first})
    return (event if first == event.event_time else event.model_copy(update={"event_time": first})), arrivals


def _newest(arrivals: Mapping[str, datetime]) -> dict[str, datetime]:
    return dict(sorted(arrivals.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:KEPT_ARRIVALS])


def _min(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b < a else a


def _max(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def apply_event(profile: Profile, event: Event, rules: MergeRules = DEFAULT_RULES) -> Profile:
    """Return ``profile`` with ``event`` merged in. Pure; never mutates its inputs."""
    if profile.erased is not None:
        return profile  # erased stays erased, whatever arrives later
    if isinstance(event, CustomerErased):
        raise TypeError("an erasure is not merged: workers.profiles.erasure plans it")
    event, arrivals = arrived(profile, event)
    changes: dict[str, object] = {
        "first_seen": _min(profile.first_seen, event.event_time),
        "last_seen": _max(profile.last_seen, event.event_time),
        "arrivals": arrivals,
    }
    identity = event.identity
    if identity.email is not None:
        winner = newer(profile.email_stamp, Stamp(**_stamp(event)))
        if winner is not profile.email_stamp:
            changes.update(email=identity.email, email_stamp=winner)
    identifiers = dict(profile.identifiers)
    for kind, value in ((event.source, identity.customer_id), (ANONYMOUS, identity.anonymous_id),
                        (EMAIL, identity.email), (PHONE, identity.phone)):
        if value is not None:
            identifiers[kind] = tuple(sorted(set(identifiers.get(kind, ())) | {value}))
    changes["identifiers"] = identifiers

    raised = quality_flags(event)
    if raised:
        flags = dict(profile.flags)
        for flag in raised:
            flags[flag] = tuple(sorted(set(flags.get(flag, ())) | {event.event_id})[-KEPT_FLAG_EVENTS:])
        changes["flags"] = flags

    stamp = _stamp(event)
    match event:
        case CustomerUpdated():
            traits = dict(profile.traits)
            for name, value in event.traits.items():
                traits[name] = newer(traits.get(name), Trait(value=value, **stamp), lambda t, n=name: rules.rank(n, t.source))
            changes["traits"] = traits
        case OrderCompleted():
            fact = OrderFact(
                total=event.total,
                currency=event.currency,
                categories=tuple(sorted({i.category for i in event.items if i.category})),
                counts=not (event.cancelled or event.test),
                **stamp,
            )
            changes["orders"] = {**profile.orders, event.order_id: newer(profile.orders.get(event.order_id), fact)}
        case CheckoutChanged():
            fact = CheckoutFact(
                url=event.url,
                total=event.total,
                item_count=sum(i.quantity for i in event.items),
                completed=event.completed,
                **stamp,
            )
            current = profile.checkouts.get(event.checkout_id)
            changes["checkouts"] = {**profile.checkouts, event.checkout_id: newer(current, fact)}
        case ProductViewed():
            if event.category:
                changes["categories_viewed"] = tuple(sorted(set(profile.categories_viewed) | {event.category}))
        case ConsentChanged():
            fact = Consent(state=event.state, **stamp)
            current = profile.consent.get(event.channel)
            if current is None or _consent_key(fact) > _consent_key(current):
                changes["consent"] = {**profile.consent, event.channel: fact}
        case EmailOpened():
            opened = Stamp(**stamp)
            changes["last_email_open"] = newer(profile.last_email_open, opened)
            changes["email_opens"] = latest({*profile.email_opens, opened}, KEPT_OPENS)
        case EmailClicked():
            changes["last_email_click"] = newer(profile.last_email_click, Stamp(**stamp))
    return profile.model_copy(update=changes)


def _union_latest(a: Mapping[str, S], b: Mapping[str, S], rank: Callable[[str], Callable[[Stamp], int]] | None = None) -> dict[str, S]:
    merged = dict(a)
    for key, fact in b.items():
        merged[key] = newer(merged.get(key), fact, rank(key) if rank else (lambda s: 0))
    return merged


def merge_profiles(survivor: Profile, absorbed: Profile, rules: MergeRules = DEFAULT_RULES) -> Profile:
    """One person's two profiles as one, keeping ``survivor``'s id.

    The join of the two: every register takes the newer fact, sets union, min and
    max for first and last seen. So merging the profiles of two halves of a
    history gives the profile of the whole history (enrich afterwards).
    """
    if survivor.erased is not None or absorbed.erased is not None:
        return survivor if survivor.erased is not None else absorbed.model_copy(update={"id": survivor.id})
    email_stamp = newer(survivor.email_stamp, absorbed.email_stamp) if absorbed.email_stamp else survivor.email_stamp
    email = survivor.email if email_stamp is survivor.email_stamp else absorbed.email
    kinds = set(survivor.identifiers) | set(absorbed.identifiers)
    consent = dict(survivor.consent)
    for channel, fact in absorbed.consent.items():
        if channel not in consent or _consent_key(fact) > _consent_key(consent[channel]):
            consent[channel] = fact
    flags = {
        flag: tuple(sorted(set(survivor.flags.get(flag, ())) | set(absorbed.flags.get(flag, ())))[-KEPT_FLAG_EVENTS:])
        for flag in set(survivor.flags) | set(absorbed.flags)
    }
    seen = [t for t in (survivor.first_seen, absorbed.first_seen) if t]
    last = [t for t in (survivor.last_seen, absorbed.last_seen) if t]
    return survivor.model_copy(update={
        "email": email,
        "email_stamp": email_stamp,
        "identifiers": {k: tuple(sorted(set(survivor.identifiers.get(k, ())) | set(absorbed.identifiers.get(k, ())))) for k in kinds},
        "merged_from": tuple(sorted({*survivor.merged_from, absorbed.id, *absorbed.merged_from})),
        "traits": _union_latest(survivor.traits, absorbed.traits, lambda name: lambda t: rules.rank(name, t.source)),
        "orders": _union_latest(survivor.orders, absorbed.orders),
        "checkouts": _union_latest(survivor.checkouts, absorbed.checkouts),
        "categories_viewed": tuple(sorted(set(survivor.categories_viewed) | set(absorbed.categories_viewed))),
        "expired_checkouts": tuple(sorted(set(survivor.expired_checkouts) | set(absorbed.expired_checkouts))),
        "consent": consent,
        "last_email_open": newer(survivor.last_email_open, absorbed.last_email_open) if absorbed.last_email_open else survivor.last_email_open,
        "last_email_click": newer(survivor.last_email_click, absorbed.last_email_click) if absorbed.last_email_click else survivor.last_email_click,
        "email_opens": latest({*survivor.email_opens, *absorbed.email_opens}, KEPT_OPENS),
        "arrivals": _newest({k: min(t, survivor.arrivals.get(k, t)) for k, t in {**survivor.arrivals, **absorbed.arrivals}.items()}),
        "flags": flags,
        "first_seen": min(seen) if seen else None,
        "last_seen": max(last) if last else None,
    })


def merge_all(profile: Profile, events: Iterable[Event], tiers: dict[str, float], rules: MergeRules = DEFAULT_RULES) -> Profile:
    for event in events:
        profile = apply_event(profile, event, rules)
    return enrich(profile, tiers)


def changed_traits(before: Profile | None, after: Profile) -> list[str]:
    """The names of the traits a merge set, changed or removed (``before``: None for a new profile). Pure."""
    old = before.traits if before is not None else {}
    return sorted({name for name in {*old, *after.traits} if old.get(name) != after.traits.get(name)})
