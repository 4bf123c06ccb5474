"""Consent wins: what a change of a profile asks of the person's addresses at every ESP target. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

from schemas.profile import Profile
from schemas.sync import Stored
from workers.profiles.identity import addresses


def unsubscribed(profile: Profile) -> bool:
    consent = profile.consent.get("email")
    return consent is not None and consent.state == "unsubscribed"


def address_work(before: Profile | None, after: Profile, sent: Mapping[str, bool]) -> dict[str, dict[str, list[str]]]:
    """Per ESP target, what the person's other addresses need now that ``before`` became ``after``. Pure.

    - An unsubscribe reaches every address the person had (earlier ones, those of absorbed profiles),
      not only the current one, which the member itself carries; an address that joins later while
      the person is unsubscribed is unsubscribed too.
    - An email change retires the old address at every target that holds it (``sent``: the target
      was sent this profile's member), the way each ESP allows.
    """
    former_after = addresses(after) - {after.email}
    former_before = addresses(before) - {before.email} if before is not None else set()
    unsubscribe = sorted(former_after - (former_before if before is not None and unsubscribed(before) else set())) \
        if unsubscribed(after) else []
    replaced = before.email if before is not None and before.email and before.email != after.email else None
    work: dict[str, dict[str, list[str]]] = {}
    for esp, was_sent in sent.items():
        lists = {**({"unsubscribe": unsubscribe} if unsubscribe else {}), **({"retire": [replaced]} if replaced and was_sent else {})}
        if lists:
            work[esp] = lists
    return work


def consent_changed(before: Profile, after: Profile) -> bool:
    """An existing consent that changed, or a first unsubscribe: what must reach the ESP before anything else."""
    old = before.consent.get("email")
    new = after.consent.get("email")
    if new is None or (old is not None and old.state == new.state):
        return False
    return old is not None or new.state == "unsubscribed"


def contacts_held(stored: Stored, targets: Iterable[str]) -> dict[str, bool]:
    """Per ESP target, whether it may hold this profile's contact (so has one to retire)."""
    now = datetime.now(timezone.utc)
    return {esp: stored.state(esp).may_hold_contact(now) for esp in targets}
