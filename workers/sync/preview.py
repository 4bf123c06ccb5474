"""The preview: exactly what the sync would send to an ESP target for a profile now, and a merge-tag
template rendered with it. Pure: built offline, no key needed."""

from __future__ import annotations

from typing import Any

from adapters.esps.base import member_hash
from adapters.esps.registry import build_esp
from adapters.esps.targets import EspTarget
from adapters.esps.templates import render
from schemas.profile import Profile
from schemas.sync import Stored


def preview(profile: Profile, stored: Stored, targets: dict[str, EspTarget], esp: str, template: str | None = None) -> dict[str, Any]:
    """What the sync would send to the ESP target ``esp`` for ``profile`` now, whether it would send it,
    and ``template`` rendered with it. No I/O. Raises ValueError for a target not configured."""
    if esp not in targets:
        raise ValueError(f"unknown ESP target {esp!r} (configured: {', '.join(targets)})")
    client = build_esp(esp, targets[esp], offline=True)
    member = client.member(profile)
    state = stored.state(esp)
    digest = member_hash(member) if member else None
    result: dict[str, Any] = {
        "esp": esp,
        "profile_id": profile.id,
        "member": member,
        "would_send": member is not None and digest != state.sent_hash,
        "last_sent_at": state.sent_at,
    }
    if template is not None:
        result["rendered"] = render(template, client.fields(member) if member else {})
    return result
