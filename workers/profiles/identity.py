"""Which profile an identity names: its keys strongest first, what a fresh profile is, the limits a
profile's identifiers keep to. Pure."""

from __future__ import annotations

from schemas.events import Identity
from schemas.profile import ANONYMOUS, EMAIL, PHONE, IdentityHasher, Profile, identity_key


def lookup_keys(identity: Identity, source: str) -> list[str]:
    """The identity's keys, strongest first: email, phone, the source's customer id, anonymous id."""
    pairs = ((EMAIL, identity.email), (PHONE, identity.phone), (source, identity.customer_id), (ANONYMOUS, identity.anonymous_id))
    return [identity_key(kind, value) for kind, value in pairs if value is not None]


def addresses(profile: Profile) -> set[str]:
    """Every email address a live profile knows: the current one, earlier ones, those of absorbed profiles."""
    return {*profile.identifiers.get(EMAIL, ()), *([profile.email] if profile.email else [])}


def over_limits(profile: Profile, limits: dict[str, int], default: int) -> list[str]:
    """Identifier kinds holding more values than allowed: a merge that produces these is refused."""
    return sorted(kind for kind, values in profile.identifiers.items() if len(values) > limits.get(kind, default))


def new_profile(keys: list[str], hasher: IdentityHasher) -> Profile:
    """A fresh profile, its id derived from the strongest key so concurrent creators collide, not duplicate."""
    return Profile(id=hasher.profile_id(keys[0]))


def without(identity: Identity, source: str, foreign: set[str]) -> Identity:
    """``identity`` minus the identifiers another profile owns (used when a merge is refused)."""
    kinds = {"email": "email", "phone": "phone", "customer_id": source, "anonymous_id": ANONYMOUS}
    kept = {f: v for f, k in kinds.items() if (v := getattr(identity, f)) is not None and identity_key(k, v) not in foreign}
    return Identity(**kept) if kept else identity
