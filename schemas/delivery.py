"""A delivery: one verified request from a sender, exactly as queued by the receiver.

The payload is kept verbatim so that a mapping fix can re-drive it later.
"""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

DELIVERY_SCHEMA_VERSION = "1.1"


class Delivery(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = DELIVERY_SCHEMA_VERSION
    source: str
    topic: str
    delivery_id: str = Field(description="The sender's id for this delivery attempt.")
    dedup_key: str | None = Field(None, description="Names the happening across retries and senders (since 1.1).")
    received_at: AwareDatetime
    triggered_at: AwareDatetime | None = None
    meta: dict[str, str] = Field(default_factory=dict, description="Non-secret sender headers worth keeping.")
    payload: dict[str, Any]
