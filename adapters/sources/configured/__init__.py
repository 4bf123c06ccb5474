"""Sources configured by name: Standard Webhooks, Stripe-style and plain HMAC signatures,
each with a declarative mapping of its event types."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from adapters.sources import signatures
from adapters.sources.base import Inbound, Rejected, WebhookSource, header, json_object, path_get, validate_events
from adapters.sources.mapped import PRESETS, EventSpec, map_event
from schemas.delivery import Delivery
from schemas.errors import UnsupportedEvent
from schemas.events import Event


class SourceConfig(BaseModel):
    """One configured sender.

    Secrets come inline, from an environment variable (comma-separated) or from a
    file (one per line); several are accepted at once, for rotation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["standard-webhooks", "stripe", "hmac"]
    secrets: list[SecretStr] = Field(default_factory=list)
    secrets_env: str | None = None
    secrets_file: str | None = None
    tolerance_s: float = 300
    type_path: str = "type"
    mapping: dict[str, EventSpec] = Field(default_factory=dict)
    preset: Literal["stripe"] | None = None
    # plain HMAC only
    signature_header: str = "X-Signature"
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    id_header: str | None = None
    id_path: str | None = "id"

    @model_validator(mode="after")
    def _has_secrets_and_mapping(self) -> SourceConfig:
        if not (self.secrets or self.secrets_env or self.secrets_file):
            raise ValueError("a source needs secrets, secrets_env or secrets_file")
        if not (self.mapping or self.preset):
            raise ValueError("a source needs a mapping or a preset")
        return self

    def resolve_secrets(self) -> list[str]:
        found = [s.get_secret_value() for s in self.secrets]
        if self.secrets_env:
            found += [s.strip() for s in os.environ.get(self.secrets_env, "").split(",") if s.strip()]
        if self.secrets_file:
            found += [line.strip() for line in Path(self.secrets_file).read_text().splitlines() if line.strip()]
        if not found:
            raise ValueError("no secret found for a configured source")
        return found

    def resolved_mapping(self) -> dict[str, EventSpec]:
        return {**(PRESETS[self.preset] if self.preset else {}), **self.mapping}


def configured_mapping(name: str, config: SourceConfig) -> Callable[[Delivery], list[Event]]:
    """The pure mapping of a configured source (what workers need; no secrets involved)."""
    mapping = config.resolved_mapping()

    def to_events(delivery: Delivery) -> list[Event]:
        spec = mapping.get(delivery.topic)
        if spec is None:
            raise UnsupportedEvent(f"{name} event type {delivery.topic!r} has no mapping")
        return validate_events([map_event(spec, delivery)])

    return to_events


class ConfiguredSource(WebhookSource):
    """``POST /webhooks/<name>`` for a sender described by a :class:`SourceConfig`."""

    def __init__(self, name: str, config: SourceConfig, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.config = config
        self._secrets = config.resolve_secrets()
        self._mapping = config.resolved_mapping()
        self.to_events = configured_mapping(name, config)
        self._clock = clock

    def accept(self, inbound: Inbound) -> list[Delivery]:
        c, h = self.config, inbound.headers
        if c.scheme == "standard-webhooks":
            signatures.standard_webhooks(header(h, "webhook-id"), header(h, "webhook-timestamp"), header(h, "webhook-signature"),
                                         inbound.body, self._secrets, self._clock(), c.tolerance_s)
        elif c.scheme == "stripe":
            signatures.stripe(header(h, "Stripe-Signature"), inbound.body, self._secrets, self._clock(), c.tolerance_s)
        else:
            signatures.plain_hmac(header(h, c.signature_header), inbound.body, self._secrets,
                                  algorithm=c.algorithm, encoding=c.encoding, prefix=c.prefix)
        payload = json_object(inbound.body)
        kind = path_get(payload, c.type_path)
        if not isinstance(kind, str) or not kind:
            raise Rejected(400, "missing_event_type", f"no event type at {c.type_path!r}")
        if kind not in self._mapping:
            return []
        delivery_id = self._delivery_id(h, payload)
        return [Delivery(source=self.name, topic=kind, delivery_id=delivery_id, dedup_key=f"{self.name}:{delivery_id}",
                         received_at=inbound.received_at, payload=payload)]

    def _delivery_id(self, headers: Any, payload: dict[str, Any]) -> str:
        c = self.config
        if c.scheme == "standard-webhooks":
            return header(headers, "webhook-id") or ""
        if c.id_header and header(headers, c.id_header):
            return header(headers, c.id_header) or ""
        value = path_get(payload, c.id_path or "id")
        if value is None:
            raise Rejected(400, "missing_delivery_id", f"no id at {c.id_path!r}")
        return str(value)
