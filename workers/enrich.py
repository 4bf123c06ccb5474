"""Enrichment: traits derived from the merged facts. Pure, recomputed after every merge."""

from __future__ import annotations

from decimal import Decimal

from schemas.profile import Computed, Profile


def loyalty_tier(lifetime_value: Decimal, thresholds: dict[str, float]) -> str | None:
    """The highest tier whose threshold the lifetime value reaches."""
    reached = [(Decimal(str(limit)), name) for name, limit in thresholds.items() if lifetime_value >= Decimal(str(limit))]
    return max(reached)[1] if reached else None


def enrich(profile: Profile, tiers: dict[str, float]) -> Profile:
    """Recompute the derived traits from the profile's own facts.

    Because the inputs are de-duplicated sets of facts (orders keyed by id), a
    re-delivered order can never be counted twice.
    """
    orders = profile.orders.values()
    ltv = sum((o.total for o in orders), Decimal("0"))
    categories = set(profile.categories_viewed)
    computed = Computed(
        lifetime_value=ltv,
        order_count=len(profile.orders),
        last_order_date=max((o.event_time for o in orders), default=None),
        loyalty_tier=loyalty_tier(ltv, tiers),
        categories_viewed=tuple(sorted(categories)),
    )
    return profile.model_copy(update={"computed": computed})
