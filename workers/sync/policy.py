"""The sync policy: the one place that decides how a profile's change reaches an ESP target, and
that owns every threshold of that decision. Pure: no I/O, unit-tested without a broker.

A change is, per target:
- sent now (``SEND``), in a sync round with the other syncs in flight (``rounds.py``): the default;
  always for a consent change, an erasure, a replayed dead letter and anything the sweeper or a
  refused batch sends ``alone``;
- sent in one bulk request with other pending profiles taken along (``TAKE_ALONG``), when sync
  rounds are off: once at least ``TAKE_ALONG_MIN`` profiles wait, and always where every write is a
  job anyway (SendGrid); with rounds, the syncs in flight go together there instead;
- left pending for the sweeper (``LEAVE``): while the target's backlog has reached the bulk
  threshold (``MERGETAG_SYNC_BULK_BACKLOG``); the sweeper sends it with the backlog, in bulk.

The sweeper, the safety net, claims urgent profiles first, then the rest after a grace (none when
heavy), and sends what it claimed in bulk batches when many, one by one when few.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from schemas.sync import SyncState

TAKE_ALONG = 1_000
"""Most other pending profiles one sync takes along in its bulk request."""
TAKE_ALONG_MIN = 20
"""From this many pending profiles on, a sync takes the others along instead of sending alone."""
BATCH_MIN = 20
"""The sweeper sends this many claimed profiles or more in bulk batches, fewer one by one."""
MAX_CLAIM = 2_500
"""Most pending profiles the sweeper claims per target and sweep."""
CLAIMS_PER_BATCH = 5
"""…and at most this many bulk requests' worth."""
VERIFY_CHECKS = 5
"""Read-backs of an erased contact still found before it is deleted again."""
VERIFY_DELAY_S = 1.0
"""Delay before the next read-back, times the read-backs so far (deletions are asynchronous at some ESPs)."""
BACKLOG_TTL_S = 5.0
"""How long a process routes by a target's backlog count (the sweeper counts again at every pass, 2 s by
default): each count reads every pending profile, so syncs that counted for themselves kept the store busy."""


class Route(enum.Enum):
    SEND = "send"
    TAKE_ALONG = "take_along"
    LEAVE = "leave"


def route(*, urgent: bool, alone: bool, backlog: int, bulk_backlog: int, prefers_bulk: bool, gathered: bool = False) -> Route:
    """How one scheduled sync of a profile goes to its target (see the module docstring).

    ``gathered``: sync rounds gather the syncs in flight (one claim, one record; a job target's
    members in one job), so taking others along would only add a bulk job's wait to each change."""
    if urgent or alone:
        return Route.SEND
    if backlog >= bulk_backlog:
        return Route.LEAVE
    if gathered:
        return Route.SEND
    if prefers_bulk or backlog >= TAKE_ALONG_MIN:
        return Route.TAKE_ALONG
    return Route.SEND


def take_along_limit(batch_limit: int) -> int:
    """How many other pending profiles a sync takes along: its own member must fit in the request too."""
    return min(TAKE_ALONG, batch_limit - 1)


def sweep_limit(batch_limit: int) -> int:
    return min(MAX_CLAIM, CLAIMS_PER_BATCH * batch_limit)


def sweep_grace(backlog: int, bulk_backlog: int, grace: timedelta) -> timedelta:
    """How long a change may wait for its own sync before the sweeper takes it: ``grace`` when light;
    none once the backlog reached the bulk threshold (the syncs leave it to the sweeper then)."""
    return timedelta(0) if backlog >= bulk_backlog else grace


def sweep_in_bulk(claimed: int) -> bool:
    return claimed >= BATCH_MIN


def batches(profile_ids: list[str], batch_limit: int) -> list[list[str]]:
    return [profile_ids[start:start + batch_limit] for start in range(0, len(profile_ids), batch_limit)]


@dataclass(frozen=True)
class BatchPlan:
    """A claimed batch, sorted: address work goes ``alone`` (through the one path that handles it),
    members the target lacks are ``sent`` in the bulk request, the rest are ``idle`` (released)."""

    alone: list[str]
    sent: dict[str, SyncState]
    idle: list[str]


def plan_batch(claimed: dict[str, SyncState]) -> BatchPlan:
    alone = [pid for pid, state in claimed.items() if state.has_address_work]
    sent = {pid: state for pid, state in claimed.items() if pid not in alone and not state.held}
    return BatchPlan(alone=alone, sent=sent, idle=[pid for pid in claimed if pid not in alone and pid not in sent])


def needs_send(state: SyncState, retry_refused: bool) -> bool:
    """Whether a single send has a member to send: not held already, not refused exactly as it is
    (only a replayed dead letter, ``retry_refused``, asks again)."""
    return not state.held and (retry_refused or not state.refused)


def delete_again(checks: int) -> bool:
    """Still there after several read-backs: delete again rather than wait for ever."""
    return checks >= VERIFY_CHECKS


def verify_delay_ms(checks: int) -> int:
    return int(VERIFY_DELAY_S * checks * 1000)
