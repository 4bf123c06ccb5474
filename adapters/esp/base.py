"""What every ESP adapter provides. A new ESP is one module implementing this, plus its sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from adapters.esp.fields import MappingEntry
from schemas.profile import Profile


class Esp(Protocol):
    name: str

    def member(self, profile: Profile, merge_fields: Mapping[str, MappingEntry]) -> dict[str, Any] | None:
        """What the ESP should hold for ``profile`` (pure); None when it cannot be synced (no email)."""

    async def upsert(self, member: dict[str, Any]) -> None:
        """Create or update the member. Raises EspUnavailable (retry) or EspRejected (dead-letter)."""

    async def close(self) -> None: ...
