"""What every event source provides. Adding a sender is one module implementing
:class:`Source`, plus its tests; the receiver and the workers do not change."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import Event, EventAdapter, has_lone_surrogate


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


def json_object(body: bytes | str) -> dict[str, Any]:
    return _json(body, dict, "the body must be a JSON object")


def json_value(body: bytes | str) -> Any:
    return _json(body, object, "")


def parse_json(body: bytes | str) -> Any:
    """JSON as RFC 8259 defines it: valid Unicode text and finite numbers; raises :class:`Rejected` (400).

    ``json.loads`` alone accepts ``NaN``/``Infinity``, turns ``1e400`` into infinity and ``"\\ud800"``
    into a lone surrogate, none of which can be stored or encoded later. Cheap on the hot path: the
    parsed value is walked only when the text holds an escape that could be a lone surrogate.
    """
    if isinstance(body, bytes):
        try:
            text = body.decode(json.detect_encoding(body))
        except UnicodeDecodeError:
            raise Rejected(400, "invalid_unicode", "the body is not valid Unicode text (UTF-8)") from None
    else:
        text = body
    try:
        value = _DECODER.decode(text)
    except ValueError:
        raise Rejected(400, "malformed_json") from None
    if _LONE_SURROGATE_ESCAPE.search(text) or ("\\\\" in text and _SURROGATE_ESCAPE.search(text)):
        where = lone_surrogate_at(value)
        if where is not None:
            raise Rejected(400, "invalid_unicode", f"lone surrogate (\\uD800-\\uDFFF escape) at {where or 'the top level'}")
    return value


# A high-surrogate escape not followed by a low one, or a low one not preceded by a high one. Every branch
# starts with the literal ``\\uD`` so the search skips ahead fast (a leading lookbehind made it 50x slower).
_LONE_SURROGATE_ESCAPE = re.compile(
    r"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD])[c-fC-F][0-9a-fA-F]{2})"
)
# An escaped backslash can make a lone escape look paired (``\\\\ud83d\\udc00``): with one in the text,
# any surrogate escape at all means a walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate_at(value: Any) -> str | None:
    """The dotted path of the first string (or key) in ``value`` holding a lone surrogate; None if none does.

    Iterative, so any depth ``json.loads`` accepted is walked without recursion.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                name = printable(str(key))[:64]
                where = f"{path}.{name}" if path else name
                if isinstance(key, str) and has_lone_surrogate(key):
                    return where
                stack.append((where, child))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}.{i}" if path else str(i), child) for i, child in enumerate(item))
    return None


def check_names(deliveries: list[Delivery]) -> None:
    """Refuse deliveries named by text that is not valid Unicode: ids, topics and kept headers (aiohttp
    decodes header bytes that are not UTF-8 into lone surrogates), which Redis and MongoDB cannot take.
    Payloads are checked as they are parsed (:func:`parse_json`)."""
    for delivery in deliveries:
        names = [delivery.delivery_id, delivery.dedup_key or "", delivery.topic, *delivery.meta, *delivery.meta.values()]
        if any(has_lone_surrogate(name) for name in names):
            raise Rejected(400, "invalid_unicode", "a delivery id, topic or header is not valid Unicode text")


def printable(text: str) -> str:
    """``text`` as valid Unicode, for logs, error details and storage: lone surrogates become ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _no_constant(name: str) -> Any:
    raise Rejected(400, "invalid_number", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected(400, "invalid_number", "a number is too large to represent")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
"""One decoder for every request (``json.loads`` with hooks builds one per call)."""


def _json(body: bytes | str, kind: type, message: str) -> Any:
    value = parse_json(body)
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
                problems.append({"event": str(item.get("type", "?")), "loc": ".".join(printable(str(part)) for part in err["loc"]),
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
