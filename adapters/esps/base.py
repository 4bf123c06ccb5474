"""What every ESP adapter provides. A new ESP is one folder (descriptor, client, member builder), one registry line and its sandbox (README.md).

The sync only ever talks to this Protocol: it builds members (pure), sends them one by
one or in bulk, erases and retires contacts, and reads back what the ESP holds for
reconciliation. Every method that calls the ESP raises EspUnavailable (retry later) or
EspRejected (this member is refused: record it and dead-letter it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.events import Scalar
from schemas.profile import Profile

OnJob = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Held:
    """What the ESP holds for a contact, in the adapter's own field names (for reconciliation)."""

    fields: dict[str, Scalar]
    unsubscribed: bool


class Esp(Protocol):
    name: str
    """The target's name: the key of its sync state, its coalescing and its guard."""
    kind: str
    """Its registered kind (``registry.DESCRIPTORS``)."""
    batch_limit: int
    """Most members per bulk request."""
    prefers_bulk: bool
    """Every write is a bulk job anyway (SendGrid): a sync takes other due profiles along."""

    def member(self, profile: Profile) -> dict[str, Any] | None:
        """What the ESP should hold for ``profile`` (pure); None when it cannot be synced (no email)."""

    def key(self, member: dict[str, Any]) -> str:
        """The member's identity at the ESP (its lowercased email): how bulk errors name their item."""

    def fields(self, member: dict[str, Any]) -> dict[str, Scalar]:
        """The mapped fields the member carries, by tag (preview, templates, reconciliation)."""

    def unsubscribed(self, member: dict[str, Any]) -> bool:
        """Whether the member pushes an unsubscribe."""

    async def upsert(self, member: dict[str, Any], on_job: OnJob | None = None) -> None:
        """Create or update one member (and push its unsubscribe, if any)."""

    async def upsert_batch(self, members: list[dict[str, Any]], on_job: OnJob | None = None) -> dict[str, str]:
        """Create or update up to ``batch_limit`` members in one bulk request, waiting for an
        asynchronous job to finish; returns the refused members by :meth:`key`, with a reason
        free of personal data. A failure of the whole request raises.

        ``on_job`` is awaited with each job's id as soon as the ESP accepted it: the job may run on
        after its send gave up waiting, and an erasure must know to wait for it.
        """

    async def job_done(self, job_id: str) -> bool:
        """Whether a bulk job this adapter started can no longer change anything at the ESP."""

    async def erase(self, email: str) -> None:
        """Erase the contact for good (a privacy request); an unknown contact is already gone."""

    async def unsubscribe(self, email: str) -> None:
        """Unsubscribe another address of the person (consent reaches every address they had)."""

    async def retire(self, email: str) -> None:
        """Take a contact the person no longer uses (an earlier address, an absorbed duplicate) out of
        the mailings, the way the ESP allows; never leave it subscribed."""

    async def held(self, email: str) -> Held | None:
        """What the ESP holds for ``email``; None when it holds nothing."""

    async def field_problems(self) -> list[str]:
        """What in the field mapping does not fit the ESP's own field definitions."""

    async def close(self) -> None: ...


def member_hash(member: dict[str, Any]) -> str:
    """A member's fingerprint: equal members are never sent twice."""
    return hashlib.sha256(json.dumps(member, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class EspDescriptor:
    """Everything the rest of mergetag knows of one kind of ESP: registered once in ``registry``.

    The sync, the sweeper, the CLI and the settings read limits and rules from here, so a new ESP
    is its own folder plus one registry line, never a change to them.
    """

    kind: str
    client: Callable[..., Esp]
    """``client(target, name=..., guard=..., offline=...)``: the target's client."""
    env: type[Any]
    """The :class:`~adapters.esps.targets.TargetEnv` read when targets come from ``MERGETAG_ESPS``."""
    default_fields: dict[str, str]
    batch_limit: int
    """Most members per bulk request."""
    prefers_bulk: bool = False
    """Every write is a bulk job anyway: a sync takes other due profiles along."""
    rates: dict[str, list[tuple[int, float]]] | None = None
    """The ESP's published rate windows per bucket; None: only the connection limit applies."""
    single_sends_wait_for_jobs: bool = False
    """Even a single upsert waits for a job, so its send lease must cover the job timeout."""
    text_limit: int | None = None
    """Most characters the ESP keeps in a text field (None: no documented limit)."""
    text_limits: dict[str, int] = field(default_factory=dict)
    """Per field (tag), where the ESP's own fields have limits of their own."""

    def limit(self, tag: str) -> int | None:
        """Most characters the ESP keeps in field ``tag``."""
        return self.text_limits.get(tag, self.text_limit)

    def lease(self, timeout_s: float, job_timeout_s: float, bulk: bool) -> float:
        """How long a send may hold a profile's lease (seconds): every request it makes and, where the
        ESP answers with a job, the job it waits for."""
        waits = bulk or self.single_sends_wait_for_jobs
        return 2 * timeout_s + 5 + (job_timeout_s if waits else 0)
