"""Enrichment: traits derived from the merged facts. Pure, recomputed after every merge."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.profile import AbandonedCart, Computed, OrderFact, Profile


def time_zone(name: object) -> ZoneInfo | None:
    if not isinstance(name, str) or not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def preferred_send_hour(opens: Iterable[datetime], tz: ZoneInfo | None) -> int | None:
    """The local hour with the most opens; the earliest such hour on a tie. UTC without a time zone."""
    hours = Counter((t.astimezone(tz) if tz else t).hour for t in opens)
    if not hours:
        return None
    best = max(hours.values())
    return min(h for h, n in hours.items() if n == best)


def loyalty_tier(lifetime_value: Decimal, thresholds: dict[str, float]) -> str | None:
    """The highest tier whose threshold the lifetime value reaches."""
    reached = [(Decimal(str(limit)), name) for name, limit in thresholds.items() if lifetime_value >= Decimal(str(limit))]
    return max(reached)[1] if reached else None


def top_categories(orders: Iterable[OrderFact], viewed: Iterable[str], keep: int = 3) -> tuple[str, ...]:
    """Categories ordered most often, then viewed; ties by name. Deterministic."""
    score: Counter[str] = Counter()
    for order in orders:
        for category in order.categories:
            score[category] += 10
    for category in viewed:
        score[category] += 1
    return tuple(name for name, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])


def abandoned_cart(profile: Profile, orders: Iterable[OrderFact]) -> AbandonedCart | None:
    """The latest checkout that expired open and was not followed by an order: cleared by the order itself."""
    last_order = max((o.event_time for o in orders), default=None)
    open_carts = [
        (checkout_id, fact) for checkout_id, fact in profile.checkouts.items()
        if checkout_id in profile.expired_checkouts and not fact.completed
        and (last_order is None or last_order < fact.event_time)
    ]
    if not open_carts:
        return None
    checkout_id, fact = max(open_carts, key=lambda pair: (pair[1].key, pair[0]))
    return AbandonedCart(checkout_id=checkout_id, url=fact.url, value=fact.total, item_count=fact.item_count, at=fact.event_time)


def expire_checkout(profile: Profile, checkout_id: str, at: datetime) -> Profile:
    """Record that ``checkout_id`` was still open, unchanged since ``at``, when its delay ran out (idempotent).

    A checkout updated after ``at`` has a newer check of its own scheduled: this one does nothing.
    """
    fact = profile.checkouts.get(checkout_id)
    if fact is None or fact.completed or fact.event_time != at or checkout_id in profile.expired_checkouts:
        return profile
    return profile.model_copy(update={"expired_checkouts": tuple(sorted({*profile.expired_checkouts, checkout_id}))})


def enrich(profile: Profile, tiers: dict[str, float]) -> Profile:
    """Recompute the derived traits from the profile's own facts.

    Because the inputs are de-duplicated sets of facts (orders keyed by id), a
    re-delivered order can never be counted twice.
    """
    if profile.erased is not None:
        return profile.model_copy(update={"computed": Computed()})
    orders = [o for o in profile.orders.values() if o.counts]
    ltv = sum((o.total for o in orders), Decimal("0"))
    categories = set(profile.categories_viewed)
    computed = Computed(
        lifetime_value=ltv,
        order_count=len(orders),
        last_order_date=max((o.event_time for o in orders), default=None),
        loyalty_tier=loyalty_tier(ltv, tiers),
        categories_viewed=tuple(sorted(categories)),
        average_order_value=(ltv / len(orders)).quantize(Decimal("0.01")) if orders else Decimal("0"),
        top_categories=top_categories(orders, profile.categories_viewed),
        abandoned_cart=abandoned_cart(profile, orders),
        last_email_open=profile.last_email_open.event_time if profile.last_email_open else None,
        preferred_send_hour=preferred_send_hour(
            (o.event_time for o in profile.email_opens),
            time_zone(_trait(profile, "timezone")) or time_zone(_trait(profile, "geo_timezone")),
        ),
    )
    return profile.model_copy(update={"computed": computed})


def _trait(profile: Profile, name: str) -> object:
    trait = profile.traits.get(name)
    return trait.value if trait else None
