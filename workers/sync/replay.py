"""What replaying dead letters would do, before it is done: the plan an operator reads first.

How many letters, by actor and reason; which profiles; and for each ESP target the merge fields that
would change — what the sync would send now against what the target holds. The plan and the diff are
pure (:func:`plan`, :func:`changes`); :func:`field_changes` reads the profiles and the targets.
Values are masked unless the reader may see personal data (:func:`mask`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.esps.base import Esp, Held
from adapters.store.profiles import ProfileStore
from broker.dead_letters import DeadLetter
from schemas.events import Scalar

DIFF_LIMIT = 50
"""Profiles whose fields a plan compares with their target (one ESP read each); the rest are counted."""


@dataclass(frozen=True)
class Change:
    profile_id: str
    tag: str
    held: Scalar | None
    sent: Scalar | None


@dataclass
class Plan:
    letters: int
    by_actor_reason: list[tuple[str, str, int]]
    profiles: list[str]
    targets: dict[str, list[Change]] = field(default_factory=dict)
    not_compared: int = 0
    """Profiles past :data:`DIFF_LIMIT`, whose changes the plan does not show."""


def plan(letters: list[DeadLetter]) -> Plan:
    """Counts and profiles of a selection (changes are added by :func:`field_changes`). Pure."""
    counts = Counter((letter.actor, letter.code) for letter in letters)
    profiles = sorted({pid for letter in letters if (pid := letter.sync_target().get("profile_id"))})
    return Plan(len(letters), [(actor, reason, n) for (actor, reason), n in sorted(counts.items())], profiles)


def changes(profile_id: str, sending: Mapping[str, Scalar], held: Held | None) -> list[Change]:
    """The fields that differ between what the target holds (``held``; None: no contact yet) and what
    would be sent. A blank sent where the target has nothing is no change. Pure."""
    have = held.fields if held is not None else {}
    return [Change(profile_id, tag, have.get(tag), value) for tag, value in sorted(sending.items())
            if have.get(tag) != value and not (value in (None, "") and have.get(tag) in (None, ""))]


def mask(value: Scalar | None) -> str:
    """A value as an operator without the right to personal data sees it: its presence and kind only."""
    if value is None or value == "":
        return "—"
    return "•••" if isinstance(value, str) else "•••(number)" if isinstance(value, int | float) else "•••"


async def field_changes(found: Plan, letters: list[DeadLetter], store: ProfileStore, esps: Mapping[str, Esp]) -> Plan:
    """Add, per target, the merge fields each letter's profile would change there (up to :data:`DIFF_LIMIT`)."""
    pairs = sorted({(t["profile_id"], esp) for letter in letters if (t := letter.sync_target()) for esp in t["esp"].split(",")})
    for profile_id, target in pairs[:DIFF_LIMIT]:
        esp = esps.get(target)
        loaded = await store.load(profile_id)
        if esp is None or loaded is None:
            continue
        member = esp.member(loaded[0])
        if member is None:
            continue
        held = await esp.held(esp.key(member))
        found.targets.setdefault(target, []).extend(changes(profile_id, esp.fields(member), held))
    found.not_compared = max(0, len(pairs) - DIFF_LIMIT)
    return found


def summary(found: Plan, personal: bool) -> dict[str, Any]:
    """The plan as JSON, values masked unless ``personal``."""
    show = (lambda v: v) if personal else mask
    return {"letters": found.letters, "by_actor_reason": [{"actor": a, "reason": r, "count": n} for a, r, n in found.by_actor_reason],
            "profiles": found.profiles, "not_compared": found.not_compared,
            "targets": {t: [{"profile_id": c.profile_id, "field": c.tag, "held": show(c.held), "sent": show(c.sent)} for c in cs]
                        for t, cs in found.targets.items()}}
