"""What a merge writes to a profile document: pure, so the store only moves it.

A new profile is one insert. An existing one is a plain update guarded by the version it was read
with: only the fields that changed since, a member only when its hash changed, and the sync state
raised (``pending``) where the target does not hold it yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from adapters.store.outbox import Members, Work
from schemas.errors import StoredProfileInvalid
from schemas.profile import Profile
from schemas.sync import NEW, Stored


@dataclass(frozen=True)
class Save:
    """One profile write of a batch: see :meth:`ProfileStore.save`."""

    profile: Profile
    version: int | None
    members: Members
    urgent: bool = False
    work: Work = field(default_factory=dict)
    stored: Stored = NEW
    before: Profile | None = None
    """The profile as read with ``version``: only what changed since is written."""


def _changed(body: dict[str, Any], before: Profile | None) -> dict[str, Any]:
    """The top-level fields of ``body`` that differ from ``before`` (all without it); the index keys
    and the write token always (a rekey changes keys without a new version)."""
    if before is None:
        return dict(body)
    old = before.model_dump(mode="python", exclude={"id"})
    return {k: v for k, v in body.items() if k in ("keys", "written_by") or k not in old or old[k] != v}


def profile_write(save: Save, keys: list[str], token: str | None = None) -> tuple[dict[str, Any] | None, Any]:
    """The write of one :class:`Save` (``keys``: its index keys; ``token``: a batch's write token):
    ``(None, document)`` for a new profile, else the version guard and the update. Pure."""
    profile, version, members, urgent, work = save.profile, save.version, save.members, save.urgent, save.work
    now = datetime.now(timezone.utc)
    body = profile.model_dump(mode="python", exclude={"id"})
    body["keys"] = keys
    if token is not None:
        body["written_by"] = token
    if version is None:
        doc = {
            "_id": profile.id,
            **body,
            "version": 1,
            "esp": {esp: {"member": member, "member_hash": member_hash, "dirty_at": now,
                          "pending": member is not None or any(work.get(esp, {}).values()),
                          "urgent": urgent and (member is not None or any(work.get(esp, {}).values())),
                          **{name: sorted(emails) for name, emails in work.get(esp, {}).items() if emails}}
                    for esp, (member, member_hash) in members.items()},
        }
        return None, doc
    # A plain update, computed from the state read with ``version`` (which every write of the profile
    # raises): only the fields that changed since, and a member only when its hash changed. The member
    # hash only changes with the version, so it is exact; ``pending`` is only ever raised here (the
    # sync lowers it), so a send the sync records meanwhile can at worst leave a no-op pending behind.
    sets: dict[str, Any] = _changed(body, save.before)
    adds: dict[str, Any] = {}
    for esp, (member, member_hash) in members.items():
        prefix, before, lists = f"esp.{esp}", save.stored.state(esp), work.get(esp, {})
        if member_hash != before.member_hash or save.before is None:
            sets[f"{prefix}.member"], sets[f"{prefix}.member_hash"] = member, member_hash
        if member_hash != before.member_hash:
            sets[f"{prefix}.dirty_at"] = now
        adds.update({f"{prefix}.{name}": {"$each": sorted(emails)} for name, emails in lists.items() if emails})
        if (member is not None and member_hash != before.sent_hash) or any(lists.values()):
            sets[f"{prefix}.pending"] = True
            if urgent:
                sets[f"{prefix}.urgent"] = True
    update: dict[str, Any] = {"$set": sets, "$inc": {"version": 1}}
    if adds:
        update["$addToSet"] = adds
    return {"_id": profile.id, "version": version}, update


def split_doc(doc: dict[str, Any] | None) -> tuple[Profile, Stored] | None:
    """A stored profile document as the profile and its sync state (None: missing, or a pointer)."""
    if doc is None or "merged_into" in doc:
        return None
    meta = Stored(version=doc.pop("version"), esp=doc.pop("esp", None) or {})
    doc.pop("keys", None)
    doc.pop("written_by", None)
    doc["id"] = doc.pop("_id")
    try:
        return Profile.model_validate(doc), meta
    except ValidationError as exc:
        locs = sorted({".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)})
        raise StoredProfileInvalid(f"profile {doc['id']}: {', '.join(locs)}") from None
