"""The sync state: per profile and ESP target, what the ESP should hold and how far getting it there is.

Stored under ``profile.esp.<target>`` and written only through the outbox (``adapters/store/outbox``);
the sync reads it as this model. The state machine, per target:

- ``member``/``member_hash``: what the ESP should hold (written with the profile).
- ``sent_hash``: what it was last sent; ``failed_hash``/``failed_code``: a member it refused as it is.
- ``pending``: the ESP does not hold ``member`` yet, or addresses wait for work; ``urgent``: a consent
  change or an erasure, first out of the queue.
- the send lease (``sending_until``, ``sending_token``): one send at a time, every later write fenced by the token.
- ``jobs``: bulk jobs carrying the profile that may still run (an erasure waits for them);
  ``fence_until``: a send of a profile merged into this one (or erased with it) may still be in
  flight until then; its jobs are carried over into ``jobs``. Address work waits for both.
- address lists: ``erase`` (then ``verify``, read back ``verify_checks`` times), ``unsubscribe``, ``retire``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SYNC_STATE_SCHEMA_VERSION = "1.0"

ADDRESS_LISTS = ("erase", "verify", "unsubscribe", "retire")
"""Addresses that wait for work other than the member itself: erasures (then their read-back),
unsubscribes of the person's other addresses, retirements of replaced or absorbed contacts."""


class SyncState(BaseModel):
    """One target's sync state of one profile, as stored (unknown stored keys are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    member: dict[str, Any] | None = None
    member_hash: str | None = None
    sent_hash: str | None = None
    sent_at: datetime | None = None
    failed_hash: str | None = None
    failed_code: str | None = None
    pending: bool = False
    urgent: bool = False
    dirty_at: datetime | None = None
    swept_at: datetime | None = None
    sending_until: datetime | None = None
    sending_token: str | None = None
    jobs: list[str] = Field(default_factory=list)
    fence_until: datetime | None = None
    erase: list[str] = Field(default_factory=list)
    verify: list[str] = Field(default_factory=list)
    unsubscribe: list[str] = Field(default_factory=list)
    retire: list[str] = Field(default_factory=list)
    verify_checks: int = 0

    @property
    def has_address_work(self) -> bool:
        return any(getattr(self, name) for name in ADDRESS_LISTS)

    @property
    def held(self) -> bool:
        """The ESP holds exactly the member (or there is none to hold)."""
        return self.member is None or self.sent_hash == self.member_hash

    @property
    def refused(self) -> bool:
        """The ESP refused this very member: only a replayed dead letter asks again."""
        return self.failed_hash is not None and self.failed_hash == self.member_hash

    @property
    def sendable(self) -> bool:
        """Pending work a sync can do: not a member the ESP refused exactly as it is, or address work."""
        return self.pending and (not self.refused or self.has_address_work)

    def may_hold_contact(self, now: datetime) -> bool:
        """The target may hold this profile's contact (so has one to retire): it was sent the member,
        or a send of it is in flight right now."""
        return bool(self.sent_hash) or (self.sending_until is not None and self.sending_until > now)


@dataclass
class Claimed:
    """The send leases a sync round took under one token: the claimed pairs' states (by target and
    profile) and the pairs whose lease another send holds. Pairs of missing or merged profiles are in neither."""

    token: str
    states: dict[tuple[str, str], SyncState] = field(default_factory=dict)
    busy: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Settlement:
    """What sends under one token did, at any targets, to record in one round trip; each part names its
    target, the members it ``sent`` (profile, member hash), ``failed`` (profile, member hash, code) and
    ``released`` (nothing sent), and the bulk ``jobs`` of the part, all confirmed finished."""

    token: str
    parts: list[tuple[str, list[tuple[str, str]], list[tuple[str, str, str]], list[str], list[str]]] = field(default_factory=list)
    noted: list[tuple[str, str, list[str]]] = field(default_factory=list)
    """Bulk jobs an ESP accepted (target, job id, profiles), written before the parts: their leases stay held."""

    def add(self, esp: str, *, sent: Iterable[tuple[str, str]] = (), failed: Iterable[tuple[str, str, str]] = (),
            released: Iterable[str] = (), jobs: Iterable[str] = ()) -> None:
        self.parts.append((esp, list(sent), list(failed), list(released), list(jobs)))


@dataclass(frozen=True)
class Expected:
    """What a merge wrote for one target of a profile, handed to its sync: the member, its hash, and when
    (the change's ``dirty_at``, near enough for freshness). Only a hint: the sync's lease is taken on it only
    where the stored state is exactly this (see ``Outbox.claim_expected``), else the sync reads."""

    member: dict[str, Any]
    member_hash: str
    at: datetime

    def to_message(self) -> list[Any]:
        """As a sync message carries it (JSON): ``[member, member_hash, ISO time]``."""
        return [self.member, self.member_hash, self.at.isoformat()]

    @classmethod
    def from_message(cls, carried: list[Any]) -> Expected:
        member, member_hash, at = carried
        return cls(member, member_hash, datetime.fromisoformat(at))

    def state(self, token: str, until: datetime) -> SyncState:
        """The sync state a read taking the lease would have found."""
        return SyncState(member=self.member, member_hash=self.member_hash, pending=True, dirty_at=self.at,
                         sending_until=until, sending_token=token)


class InFlight(BaseModel):
    """What other profiles' sends may still do at one target: their bulk jobs, and until when a send
    not yet accepted as a job may still land. Carried into the profile that takes them over."""

    model_config = ConfigDict(frozen=True)

    jobs: tuple[str, ...] = ()
    until: datetime | None = None


def in_flight(stored: Iterable[Stored], targets: Iterable[str]) -> dict[str, InFlight]:
    """Per target, the in-flight sends of ``stored`` profiles (those that had any)."""
    states = list(stored)
    found = {}
    for esp in targets:
        jobs = sorted({job for s in states for job in s.state(esp).jobs})
        leases = [t for s in states for t in (s.state(esp).sending_until, s.state(esp).fence_until) if t is not None]
        if jobs or leases:
            found[esp] = InFlight(jobs=tuple(jobs), until=max(leases) if leases else None)
    return found


class Stored(BaseModel):
    """What the store keeps beside a profile: its write version and its sync state per target."""

    model_config = ConfigDict(frozen=True)

    version: int | None = None
    esp: dict[str, SyncState] = Field(default_factory=dict)

    def state(self, target: str) -> SyncState:
        return self.esp.get(target) or SyncState()


NEW = Stored()
"""A profile not stored yet."""
