"""What every event source provides. Adding a sender is one module implementing
:class:`Source`, plus its tests; the receiver and the workers do not change."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Inbound:
    """One HTTP request, reduced to what a source needs to verify and read it."""

    method: str
    url: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime
    query: Mapping[str, str] = field(default_factory=dict)


class Source(Protocol):
    name: str

    def accept(self, inbound: Inbound) -> list[Delivery]:
        """Verify and read a request into deliveries; raise :class:`Rejected` (4xx) otherwise. Pure."""

    def to_events(self, delivery: Delivery) -> list[Event]:
        """Map a delivery to canonical events. Raises EventInvalid or UnsupportedEvent. Pure."""

    def reply(self, message_ids: list[str], duplicates: int) -> tuple[int, dict[str, Any]]:
        """The success answer the sender expects; ``message_ids`` are the queued messages."""


class WebhookSource:
    """Defaults for JSON webhooks: a JSON object body, ``202`` with counts."""

    name: str

    status = 202

    def reply(self, message_ids: list[str], duplicates: int) -> tuple[int, dict[str, Any]]:
        return self.status, {"status": "accepted", "message_ids": message_ids, "duplicates": duplicates}


def json_object(body: bytes) -> dict[str, Any]:
    return _json(body, dict, "the body must be a JSON object")


def json_value(body: bytes) -> Any:
    return _json(body, object, "")


def _json(body: bytes, kind: type, message: str) -> Any:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(400, "malformed_json") from None
    if not isinstance(value, kind):
        raise Rejected(400, "invalid_payload", message)
    return value


def header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value else None


def validate_events(raw: list[dict[str, Any]]) -> list[Event]:
    """Validate mapped events, turning pydantic errors into a PII-free EventInvalid."""
    events: list[Event] = []
    problems: list[dict[str, str]] = []
    for item in raw:
        try:
            events.append(EventAdapter.validate_python(item))
        except ValidationError as exc:
            for err in exc.errors(include_input=False, include_url=False, include_context=False):
                problems.append({"event": str(item.get("type", "?")), "loc": ".".join(str(part) for part in err["loc"]),
                                 "type": err["type"], "msg": err["msg"]})
    if problems:
        raise EventInvalid("; ".join(f"{p['event']}: {p['loc']}: {p['type']}" for p in problems), errors=problems)
    return events


def content_id(payload: Any) -> str:
    """A stable id for an item that came without one."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def path_get(document: Any, path: str) -> Any:
    """``a.b.0.c`` into nested dicts and lists; None where the path does not exist."""
    value = document
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value
