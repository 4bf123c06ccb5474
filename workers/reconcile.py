"""Reconciliation: does the ESP hold what mergetag last sent? Report drift, repair on request.

Drift is a difference between the member the ESP holds and the member mergetag
sent last (merge fields it manages, or a consent mergetag pushed). Repair marks the
profile pending again, so the ordinary sync re-sends it, inside the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Drift:
    profile_id: str
    missing: bool = False
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    status: tuple[str, str] | None = None

    def summary(self) -> dict[str, Any]:
        return {"profile_id": self.profile_id, "missing": self.missing, "fields": sorted(self.fields),
                **({"status": list(self.status)} if self.status else {})}


def compare(profile_id: str, sent: dict[str, Any], held: dict[str, Any] | None) -> Drift | None:
    """Drift between the member last sent and the member the ESP holds (None when they agree). Pure."""
    if held is None:
        return Drift(profile_id, missing=True)
    drift = Drift(profile_id)
    held_fields = held.get("merge_fields", {})
    for tag, value in sent.get("merge_fields", {}).items():
        if held_fields.get(tag) != value:
            drift.fields[tag] = (value, held_fields.get(tag))
    if sent.get("status") == "unsubscribed" and held.get("status") not in ("unsubscribed", "archived", "cleaned"):
        drift.status = ("unsubscribed", str(held.get("status")))
    return drift if (drift.fields or drift.status) else None
