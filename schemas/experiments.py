"""Experiment buckets: a stable split of profiles for A/B campaigns, the same in every ESP and the feed.

A profile's bucket is a pure function of its id and the experiment's name (HMAC-SHA256 keyed by the
name), so it never changes while the experiment does not, and renaming the experiment reshuffles.
Splits are weights in their order, e.g. ``{"a": 50, "b": 50}`` or ``{"control": 10, "a": 45, "b": 45}``.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, description="Renaming it reshuffles every profile.")
    splits: dict[str, float] = Field(description="bucket -> weight, in order; weights need not add up to 100.")

    @field_validator("splits")
    @classmethod
    def _weights(cls, splits: dict[str, float]) -> dict[str, float]:
        if not splits or any(w < 0 for w in splits.values()) or sum(splits.values()) <= 0:
            raise ValueError("splits: at least one bucket, weights not negative, some weight above 0")
        return splits

    def bucket(self, profile_id: str) -> str:
        """The profile's bucket: where its keyed hash, read as a point in [0, 1), falls among the splits."""
        digest = hmac.new(self.name.encode(), profile_id.encode(), hashlib.sha256).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * sum(self.splits.values())
        edge = 0.0
        for name, weight in self.splits.items():
            edge += weight
            if point < edge:
                return name
        return next(name for name, weight in reversed(self.splits.items()) if weight > 0)
