"""Merge-field mapping: trait -> ESP field, with type conversion, a length limit and a default.

Configured as ``MERGETAG_MERGE_FIELDS`` (JSON): ``{"first_name": "FNAME"}`` or, in full,
``{"first_name": {"tag": "FNAME", "max_length": 50, "default": "there"}}``. The mapping is
checked against the ESP's own field definitions when the sync starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Scalar

FieldType = Literal["text", "number", "date"]


class FieldMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: str = Field(pattern=r"^[A-Z0-9_]{1,10}$")
    type: FieldType | None = Field(None, description="Convert to this type; default: the value's own.")
    max_length: int | None = Field(None, gt=0, description="Cut text to this many characters.")
    default: Scalar = Field(None, description="Sent when the profile has no value.")


MappingEntry = Union[str, FieldMapping]


def normalize(mapping: Mapping[str, MappingEntry]) -> dict[str, FieldMapping]:
    return {trait: FieldMapping(tag=entry) if isinstance(entry, str) else entry for trait, entry in mapping.items()}


def convert(value: Scalar | Decimal | datetime | date, spec: FieldMapping) -> Scalar:
    """The value as the ESP field wants it; None when it cannot be converted (left out, never garbage)."""
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, datetime):
        value = value.date()
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
        try:
            return date.fromisoformat(str(value)[:10]).isoformat()
        except ValueError:
            return None
    if spec.type == "text" or (spec.max_length and isinstance(value, str)):
        text = str(value)
        return text[: spec.max_length] if spec.max_length else text
    return value


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
