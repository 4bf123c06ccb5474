"""What every event source provides: verification, delivery extraction and mapping."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import Event, EventAdapter


class Rejected(Exception):
    """The receiver refuses a request: an HTTP status and a machine-readable code."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.detail = detail


class Source(Protocol):
    """A sender of events. Adding one is a module implementing this, plus its tests."""

    name: str

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`Rejected` (401) unless ``body`` is signed by a current secret."""

    def delivery(self, headers: Mapping[str, str], payload: dict[str, Any], received_at: datetime) -> Delivery:
        """Wrap a verified payload; raise :class:`Rejected` (4xx) when headers are unusable."""

    def to_events(self, delivery: Delivery) -> list[Event]:
        """Map to canonical events. Raises EventInvalid or UnsupportedEvent; pure."""


def validate_events(raw: list[dict[str, Any]]) -> list[Event]:
    """Validate mapped events, turning pydantic errors into a PII-free EventInvalid."""
    events: list[Event] = []
    problems: list[str] = []
    for item in raw:
        try:
            events.append(EventAdapter.validate_python(item))
        except ValidationError as exc:
            for err in exc.errors(include_input=False, include_url=False, include_context=False):
                loc = ".".join(str(part) for part in err["loc"])
                problems.append(f"{item.get('type', '?')}: {loc}: {err['type']}")
    if problems:
        raise EventInvalid("; ".join(problems))
    return events
