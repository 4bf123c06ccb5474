"""The merge's profile cache: found only by keys it fully knows, bounded, never two owners for one key."""

from __future__ import annotations

from schemas.profile import Profile
from schemas.sync import Stored
from workers.profiles.cache import ProfileCache


def owner(pid: str, version: int = 1) -> tuple[Profile, Stored]:
    return Profile(id=pid), Stored(version=version)


def test_a_merge_is_served_only_when_every_one_of_its_keys_is_known():
    cache = ProfileCache(10)
    cache.put(owner("p1"), ["email:a", "shopify:1"])
    assert cache.owners(["email:a", "shopify:1"]) == {"email:a": owner("p1"), "shopify:1": owner("p1")}
    assert cache.owners(["email:a", "phone:+47"]) is None  # a key it does not know may belong to someone else


def test_the_least_recently_used_profile_makes_room():
    cache = ProfileCache(2)
    cache.put(owner("p1"), ["email:a"])
    cache.put(owner("p2"), ["email:b"])
    assert cache.owners(["email:a"]) is not None  # p1 used: p2 is now the oldest
    cache.put(owner("p3"), ["email:c"])
    assert len(cache) == 2
    assert cache.owners(["email:b"]) is None
    assert cache.owners(["email:a"]) is not None and cache.owners(["email:c"]) is not None


def test_a_key_that_moved_drops_its_former_owner_entirely():
    cache = ProfileCache(10)
    cache.put(owner("p1"), ["email:a", "shopify:1"])
    cache.put(owner("p2", 4), ["email:a"])
    assert cache.owners(["email:a"]) == {"email:a": owner("p2", 4)}
    assert cache.owners(["shopify:1"]) is None


def test_a_newer_read_replaces_the_older_and_forget_drops_by_any_key():
    cache = ProfileCache(10)
    cache.put(owner("p1", 1), ["email:a", "shopify:1"])
    cache.put(owner("p1", 2), ["email:a"])
    assert cache.owners(["email:a"]) == {"email:a": owner("p1", 2)}
    assert cache.owners(["shopify:1"]) is None
    cache.forget(["email:a"])
    assert len(cache) == 0 and cache.owners(["email:a"]) is None


def test_size_zero_keeps_nothing():
    cache = ProfileCache(0)
    cache.put(owner("p1"), ["email:a"])
    assert len(cache) == 0 and cache.owners(["email:a"]) is None
