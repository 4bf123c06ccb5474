"""Field mapping: trait -> ESP field (merge tag, property or custom field), with type
conversion, a length limit and a default. The same for every ESP; what a tag may be is
the ESP's business (each adapter checks the mapping against the ESP's own definitions).

Configured per ESP target: ``{"first_name": "FNAME"}`` or, in full,
``{"first_name": {"tag": "FNAME", "max_length": 50, "default": "there"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Scalar
from schemas.experiments import Experiment
from schemas.profile import Profile

FieldType = Literal["text", "number", "date"]


class FieldMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: str = Field(min_length=1, max_length=100)
    type: FieldType | None = Field(None, description="Convert to this type; default: the value's own.")
    max_length: int | None = Field(None, gt=0, description="Cut text to this many characters.")
    default: Scalar = Field(None, description="Sent when the profile has no value.")
    experiment: Experiment | None = Field(None, description="The trait is this experiment's bucket (MERGETAG_EXPERIMENTS names the trait).")


MappingEntry = Union[str, FieldMapping]


def normalize(mapping: Mapping[str, MappingEntry | dict]) -> dict[str, FieldMapping]:
    """Every entry as a :class:`FieldMapping` (a bare tag, or its fields as a dict, are accepted)."""
    return {trait: entry if isinstance(entry, FieldMapping) else
            FieldMapping(tag=entry) if isinstance(entry, str) else FieldMapping.model_validate(entry)
            for trait, entry in mapping.items()}


def utc_date(value: datetime) -> date:
    """The calendar date of an instant, taken in UTC (a naive time counts as UTC): the same date whether the
    datetime came from an event in the shop's offset or back from MongoDB, which keeps UTC."""
    return value.astimezone(timezone.utc).date() if value.tzinfo is not None else value.date()


def _date_text(text: str) -> str | None:
    """An ISO date, or the UTC date of an ISO datetime (``2026-03-01T22:30:00-05:00`` is ``2026-03-02``)."""
    try:
        return utc_date(datetime.fromisoformat(text)).isoformat()
    except ValueError:
        pass
    try:
        return date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        return None


def convert(value: Scalar | Decimal | datetime | date, spec: FieldMapping) -> Scalar:
    """The value as the ESP field wants it; None when it cannot be converted (left out, never garbage).
    Dates are taken in UTC."""
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, datetime):
        value = utc_date(value)
    if isinstance(value, date):
        value = value.isoformat()
    if spec.type == "number":
        if isinstance(value, bool):
            return None
        try:
            return float(Decimal(str(value))) if not isinstance(value, int) else value
        except (InvalidOperation, ValueError):
            return None
    if spec.type == "date":
        return _date_text(str(value))
    if spec.type == "text" or (spec.max_length and isinstance(value, str)):
        text = str(value)
        return text[: spec.max_length] if spec.max_length else text
    return value


def profile_values(profile: Profile, today: date | None = None) -> dict[str, Scalar]:
    """Every trait a merge field can name: the profile's own traits, then the computed ones.

    Dates are UTC dates. ``days_since_last_order`` and ``days_since_last_open`` are counted to ``today``
    (UTC): they are as fresh as the member's last sync, so map them only where a daily refresh runs.
    """
    today = today or datetime.now(timezone.utc).date()
    values: dict[str, Scalar] = {name: trait.value for name, trait in profile.traits.items()}
    values["profile_id"] = profile.id  # a reference an ESP can hold for feed calls, with nothing of the person in it
    c = profile.computed
    values.update(
        lifetime_value=float(c.lifetime_value),
        order_count=c.order_count,
        last_order_date=utc_date(c.last_order_date).isoformat() if c.last_order_date else None,
        loyalty_tier=c.loyalty_tier,
        categories_viewed=", ".join(c.categories_viewed) or None,
        average_order_value=float(c.average_order_value),
        top_categories=", ".join(c.top_categories) or None,
        preferred_send_hour=c.preferred_send_hour,
        last_email_open=utc_date(c.last_email_open).isoformat() if c.last_email_open else None,
        abandoned_cart_url=c.abandoned_cart.url if c.abandoned_cart else None,
        abandoned_cart_value=float(c.abandoned_cart.value) if c.abandoned_cart else None,
        days_since_last_order=(today - utc_date(c.last_order_date)).days if c.last_order_date else None,
        days_since_last_open=(today - utc_date(c.last_email_open)).days if c.last_email_open else None,
    )
    return values


# Derived by mergetag alone: when one has no value, the ESP's copy is blanked rather than left stale
# (an abandoned cart must disappear from the next email once the order arrives).
COMPUTED = frozenset({
    "lifetime_value", "order_count", "last_order_date", "loyalty_tier", "categories_viewed", "average_order_value",
    "top_categories", "preferred_send_hour", "last_email_open", "abandoned_cart_url", "abandoned_cart_value",
    "days_since_last_order", "days_since_last_open",
})


def _merge_value(value: Scalar) -> Scalar:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return utc_date(value).isoformat()
    return value


def mapped(profile: Profile, mapping: Mapping[str, MappingEntry], today: date | None = None) -> dict[str, Scalar]:
    """Tag -> value for ``profile`` under ``mapping``. Pure.

    A trait without a value is sent as its default, else left out, so a missing value never
    erases one set elsewhere. A computed trait without a value maps to None: the ESP's copy is
    blanked (each adapter spells "blank" its own way).
    """
    values = profile_values(profile, today)
    fields: dict[str, Scalar] = {}
    for trait, spec in sorted(normalize(mapping).items()):
        value = spec.experiment.bucket(profile.id) if spec.experiment is not None else values.get(trait)
        converted = convert(_merge_value(value), spec) if value is not None else None
        if converted is None:
            converted = spec.default
        if converted is not None or trait in COMPUTED:
            fields[spec.tag] = converted
    return fields


def with_experiments(mapping: Mapping[str, MappingEntry | dict], experiments: Mapping[str, Experiment]) -> dict[str, FieldMapping]:
    """``mapping`` with each trait an experiment names bound to it, so the trait maps to the profile's bucket."""
    return {trait: spec.model_copy(update={"experiment": experiments[trait]}) if trait in experiments else spec
            for trait, spec in normalize(mapping).items()}


def defaults(mapping: Mapping[str, MappingEntry | dict]) -> dict[str, Scalar]:
    """Tag -> the default a template falls back to (the mapping's defaults; None where it has none)."""
    return {spec.tag: spec.default for _, spec in sorted(normalize(mapping).items())}


def problems(mapping: Mapping[str, FieldMapping], esp_fields: Mapping[str, str]) -> list[str]:
    """What in ``mapping`` does not fit the ESP's field definitions (tag -> type); empty when all is well."""
    found = []
    for trait, spec in sorted(mapping.items()):
        defined = esp_fields.get(spec.tag)
        if defined is None:
            found.append(f"{trait}: merge field {spec.tag} is not defined on the audience")
        elif spec.type is not None and defined in ("text", "number", "date") and defined != spec.type:
            found.append(f"{trait}: {spec.tag} is a {defined} field, the mapping converts to {spec.type}")
    return found
