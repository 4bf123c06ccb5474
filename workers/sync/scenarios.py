"""Edge cases tried before a campaign: a template rendered for synthetic profiles that cover what breaks
personalization, and, per merge tag, what went wrong. Pure.

The profiles: everything filled in; no first name; very long values; non-Latin scripts and emoji; no
order yet; an abandoned cart; a time zone far from the shop's (UTC+14, where the local date of an
evening order is already the next day, while date fields are UTC dates). Each is built the way the
sync builds members (the target's own mapping, experiments included) and checked tag by tag:

- ``fell_back``: the trait had no value and the mapping's default was sent, or the template's
  ``*|IF:TAG|*`` took its other branch;
- ``truncated``: the mapping cut the value (``max_length``);
- ``overflow``: the value is longer than the ESP keeps in that field (it would be refused or cut there);
- ``empty``: it rendered as nothing, with no fallback;
- ``unmapped``: the target's mapping sends no such tag (mergetag never fills it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from adapters.esps.base import EspDescriptor
from adapters.esps.fields import normalize, profile_values
from adapters.esps.targets import EspTarget
from adapters.esps.templates import TOKEN, render
from schemas.profile import AbandonedCart, Computed, Profile, Trait

AT = datetime(2026, 3, 1, 18, 0, tzinfo=timezone.utc)
LONG = "Maximiliana-Bartholomäa " * 14  # 336 characters


def _traits(**values: Any) -> dict[str, Trait]:
    return {name: Trait(value=value, source="scenario", event_time=AT, event_id=f"scenario-{name}") for name, value in values.items()}


def _profile(name: str, email: str | None = None, computed: Computed | None = None, **traits: Any) -> Profile:
    email = email or f"{name}@scenario.example"
    return Profile(id=f"p_scenario_{name}", email=email, identifiers={"email": (email,)}, traits=_traits(**traits),
                   computed=computed or Computed())


def _ordered(n: int, total: str) -> Computed:
    value = Decimal(total)
    return Computed(lifetime_value=value, order_count=n, last_order_date=AT, average_order_value=value / n, loyalty_tier="silver")


SCENARIOS: dict[str, tuple[str, Profile]] = {
    "complete": ("every trait filled in", _profile("complete", first_name="Ada", last_name="Lovelace", city="London",
                                                 computed=_ordered(3, "420.00"))),
    "missing_first_name": ("no first name", _profile("missing_first_name", last_name="Hopper", computed=_ordered(1, "35.00"))),
    "very_long_values": ("names and city of 336 characters", _profile("very_long_values", first_name=LONG, last_name=LONG, city=LONG,
                                                                     computed=_ordered(2, "99.90"))),
    "non_latin_and_emoji": ("non-Latin scripts and emoji", _profile("non_latin_and_emoji", first_name="李小龍 👩🏽‍💻", last_name="Ἀλέξανδρος-Ōtsuka",
                                                                   city="Москва", computed=_ordered(1, "12.00"))),
    "zero_orders": ("no order yet", _profile("zero_orders", first_name="Grace")),
    "abandoned_cart": ("a cart left open", _profile("abandoned_cart", first_name="Linus", computed=Computed(
        abandoned_cart=AbandonedCart(checkout_id="scenario-cart", url="https://shop.example/cart/c0ffee", value=Decimal("89.50"),
                                     item_count=2, at=AT)))),
    "far_time_zone": ("UTC+14 (Kiritimati): an order at 08:00 local on 2 March is 1 March in UTC", _profile(
        "far_time_zone", first_name="Tane", timezone="Pacific/Kiritimati", computed=_ordered(1, "20.00").model_copy(
            update={"preferred_send_hour": 7}))),
}


@dataclass
class Outcome:
    scenario: str
    description: str
    rendered: str
    tags: dict[str, list[str]] = field(default_factory=dict)
    """Tag -> what went wrong with it (fell_back, truncated, overflow, empty, unmapped); only tags with a problem."""


def tags_in(template: str) -> tuple[list[str], set[str]]:
    """The merge tags a template prints, and those it tests in ``*|IF:…|*`` / ``*|IFNOT:…|*``, in order."""
    printed, tested = [], set()
    for keyword, condition, tag in TOKEN.findall(template):
        if tag and not keyword and tag not in printed:
            printed.append(tag)
        elif keyword in ("IF", "IFNOT") and condition:
            tested.add(condition)
    return printed, tested


def run(template: str, target: EspTarget, descriptor: EspDescriptor, client: Any, scenarios: dict[str, tuple[str, Profile]] = SCENARIOS) -> list[Outcome]:
    """Render ``template`` for each scenario's profile as the target's ``client`` would send it. Pure."""
    by_tag = {spec.tag: (trait, spec) for trait, spec in normalize(target.fields).items()}
    printed, tested = tags_in(template)
    outcomes = []
    for name, (description, profile) in scenarios.items():
        member = client.member(profile)
        fields = client.fields(member) if member else {}
        outcome = Outcome(name, description, render(template, fields))
        values = profile_values(profile)
        for tag in dict.fromkeys([*printed, *sorted(tested)]):
            found: list[str] = [] if tag in by_tag else ["unmapped"]
            trait, spec = by_tag.get(tag, (None, None))
            value = fields.get(tag)
            raw = values.get(trait) if trait is not None and (spec is None or spec.experiment is None) else None
            if spec is not None and raw is None and spec.default is not None and value == spec.default:
                found.append("fell_back")
            elif tag in tested and value in (None, "", 0, False):
                found.append("fell_back")
            if spec is not None and spec.max_length and isinstance(raw, str) and len(raw) > spec.max_length:
                found.append("truncated")
            limit = descriptor.limit(tag)
            if limit is not None and isinstance(value, str) and len(value) > limit:
                found.append("overflow")
            if tag in printed and value in (None, "") and "fell_back" not in found:
                found.append("empty")
            if found:
                outcome.tags[tag] = found
        outcomes.append(outcome)
    return outcomes


def report(template: str, targets: dict[str, EspTarget], esp: str) -> dict[str, Any]:
    """:func:`run` for the configured target ``esp`` as JSON-ready data, with the tags that went wrong
    anywhere first. Raises ValueError for a target not configured, TemplateError for a broken template."""
    from adapters.esps.registry import build_esp, descriptor

    if esp not in targets:
        raise ValueError(f"unknown ESP target {esp!r} (configured: {', '.join(targets)})")
    target = targets[esp]
    outcomes = run(template, target, descriptor(target.kind), build_esp(esp, target, offline=True))
    problems: dict[str, dict[str, list[str]]] = {}
    for o in outcomes:
        for tag, found in o.tags.items():
            for kind in found:
                problems.setdefault(tag, {}).setdefault(kind, []).append(o.scenario)
    return {"esp": esp, "problems": problems,
            "scenarios": [{"scenario": o.scenario, "description": o.description, "rendered": o.rendered, "tags": o.tags} for o in outcomes]}
