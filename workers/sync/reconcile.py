"""Reconciliation: does each ESP hold what mergetag last sent? Report drift, repair on request.

Drift is a difference between what an ESP holds and the member mergetag sent last: a
field it manages, a missing contact, or an unsubscribe it pushed that did not stick.
Repair marks the profile pending again, so the ordinary sync re-sends it, inside the
same limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.esps.base import Esp, Held
from adapters.store.profiles import ProfileStore
from schemas.events import Scalar


@dataclass
class Drift:
    profile_id: str
    missing: bool = False
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    unsubscribe_lost: bool = False

    def summary(self) -> dict[str, Any]:
        return {"profile_id": self.profile_id, "missing": self.missing, "fields": sorted(self.fields),
                **({"unsubscribe_lost": True} if self.unsubscribe_lost else {})}


def compare(profile_id: str, sent: dict[str, Scalar], unsubscribed: bool, held: Held | None) -> Drift | None:
    """Drift between the fields (and unsubscribe) last sent and what the ESP holds; None when they agree. Pure.

    A field sent blank matches a field the ESP holds blank or not at all.
    """
    if held is None:
        return Drift(profile_id, missing=True)
    drift = Drift(profile_id)
    for tag, value in sent.items():
        have = held.fields.get(tag)
        if have != value and not (value in (None, "") and have in (None, "")):
            drift.fields[tag] = (value, have)
    drift.unsubscribe_lost = unsubscribed and not held.unsubscribed
    return drift if (drift.fields or drift.unsubscribe_lost) else None


async def reconcile(store: ProfileStore, esp: Esp, sample: int, repair: bool) -> dict[str, Any]:
    """Check ``sample`` synced profiles (0: all) against ``esp``; with ``repair``, re-send the drifted ones."""
    docs = await store.outbox.synced_sample(esp.name, sample)
    drifted = []
    for doc in docs:
        member = doc["member"]
        drift = compare(doc["_id"], esp.fields(member), esp.unsubscribed(member), await esp.held(esp.key(member)))
        if drift:
            drifted.append(drift)
    if repair and drifted:
        await store.outbox.resend(esp.name, [d.profile_id for d in drifted])
    return {"checked": len(docs), "drifted": len(drifted), "repaired": len(drifted) if repair else 0,
            "drift": [d.summary() for d in drifted]}
