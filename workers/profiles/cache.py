"""The profiles a worker process merged last, so that its next merge round need not read them again.

Safe because every write of a profile raises its version and every merge write is guarded by the
version it was read with: a cached profile that someone changed since (another worker process, an
erasure, a merge into another profile) costs one missed guard, and that merge is read afresh. What
the sync keeps beside a profile (what each target was sent, its leases) is not the merge's to know
and may be out of date here: a merge whose result needs address work, which depends on it, is read
afresh too (``batch.py``). Pure and bounded: the least recently used profiles make room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from schemas.profile import Profile
from schemas.sync import Stored

Owner = tuple[Profile, Stored]


class ProfileCache:
    """Parameters:
      size: most profiles held (0: none).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[Owner, tuple[str, ...]]] = OrderedDict()
        self._owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def owners(self, keys: Iterable[str]) -> dict[str, Owner] | None:
        """The profile owning each of identity keys ``keys``, or None unless every one is known here."""
        found: dict[str, Owner] = {}
        for key in keys:
            profile_id = self._owners.get(key)
            if profile_id is None:
                return None
            found[key] = self._entries[profile_id][0]
        for profile_id in {profile.id for profile, _ in found.values()}:
            self._entries.move_to_end(profile_id)
        return found

    def put(self, owner: Owner, keys: Iterable[str]) -> None:
        """``owner`` as read or written, found by ``keys``."""
        if self._size <= 0:
            return
        profile_id = owner[0].id
        self.drop(profile_id)
        held = tuple(sorted(set(keys)))
        for key in held:
            previous = self._owners.get(key)
            if previous is not None and previous != profile_id:
                self.drop(previous)  # the key moved: whatever held it here is out of date
            self._owners[key] = profile_id
        self._entries[profile_id] = (owner, held)
        while len(self._entries) > self._size:
            self.drop(next(iter(self._entries)))

    def drop(self, profile_id: str) -> None:
        entry = self._entries.pop(profile_id, None)
        if entry is None:
            return
        for key in entry[1]:
            if self._owners.get(key) == profile_id:
                del self._owners[key]

    def forget(self, keys: Iterable[str]) -> None:
        """Drop every profile owning one of ``keys``."""
        for key in keys:
            profile_id = self._owners.get(key)
            if profile_id is not None:
                self.drop(profile_id)
