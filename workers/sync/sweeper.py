"""The background ESP sync: finds profiles still pending and sends them to ``sync_profile``.

The merge actor enqueues a sync as soon as a profile changes; the sweeper is
the safety net for everything that slipped through (a crash between the write
and the enqueue, a dead-lettered sync that was purged, a mapping change).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from adapters.esps.guard import EspGuard
from adapters.metrics import Metrics
from adapters.store.profiles import ProfileStore
from workers.sync import policy
from workers.sync.actors import SyncActors

log = logging.getLogger(__name__)

Counted = Callable[[str, int], None]
"""Told each target's backlog as a sweep counted it."""


@dataclass(frozen=True)
class Target:
    """An ESP target as the sweeper sees it: its bulk size and its account's guard."""

    batch_limit: int
    guard: EspGuard | None = None


async def sweep_once(store: ProfileStore, actors: SyncActors, targets: dict[str, Target], *, grace: timedelta, lease: timedelta,
                     bulk_backlog: int = 200, metrics: Metrics | None = None, counted: Counted | None = None) -> int:
    """Re-enqueue pending profiles of every ESP target: consent changes and erasures first, each on
    its own and at high priority; then the rest, one by one when few, in bulk batches when a backlog
    built up. A target whose circuit is open is left alone until it half-opens: its backlog waits
    in MongoDB rather than cycling through the queue, and the first sweep after is the trial.

    Parameters:
      grace: how long a change may wait for its own sync before the sweeper steps in.
      bulk_backlog: from this many pending profiles on, the sync leaves them to the sweeper, which
        sends them in bulk at once (no grace): efficient when heavy, fresh when light.
      metrics: gets each target's backlog and guard state.
      counted: gets each target's backlog (the process's syncs route by it instead of counting again).
    """
    total = 0
    for esp, target in targets.items():
        state = await target.guard.state() if target.guard is not None else None
        if metrics is not None and state is not None:
            metrics.guard_states({esp: state})
        if state is not None and state["circuit"] == "open":
            continue
        limit = policy.sweep_limit(target.batch_limit)
        # Counted first: with nothing pending (an idle system) both claims would find nothing, so a
        # sweep costs one read a target instead of three.
        backlog = await store.outbox.count_pending(esp, bulk_backlog)
        if metrics is not None:
            metrics.sweeper_backlog.labels(esp).set(backlog)
        if counted is not None:
            counted(esp, backlog)
        if not backlog:
            continue
        urgent = await store.outbox.claim_pending(esp, timedelta(0), lease, limit=limit, urgent=True)
        for profile_id in urgent:
            await asyncio.to_thread(actors.sync_urgent.send, profile_id, esp)
        pending = await store.outbox.claim_pending(esp, policy.sweep_grace(backlog, bulk_backlog, grace), lease, limit=limit)
        if policy.sweep_in_bulk(len(pending)):
            for batch in policy.batches(pending, target.batch_limit):
                await asyncio.to_thread(actors.sync_batch.send, batch, esp)
        else:
            await actors.alone(pending, esp)
        if urgent or pending:
            log.info("sweeper re-enqueued %d urgent and %d pending profile(s) for %s", len(urgent), len(pending), esp)
        total += len(urgent) + len(pending)
    return total


async def run(store: ProfileStore, actors: SyncActors, targets: dict[str, Target], *, interval: float, grace: timedelta,
              lease: timedelta, stop: asyncio.Event, bulk_backlog: int = 200, metrics: Metrics | None = None,
              counted: Counted | None = None) -> None:
    """Sweep every ``interval`` seconds until ``stop`` is set; survives MongoDB and broker outages.

    Parameters:
      grace: how long a change may wait for the merge's own enqueue before the sweeper steps in.
      lease: how long before the same profile may be re-enqueued by a sweep.
    """
    try:
        await _loop(store, actors, targets, interval=interval, grace=grace, lease=lease, stop=stop, bulk_backlog=bulk_backlog, metrics=metrics,
                    counted=counted)
    finally:
        await store.close()
        for target in targets.values():
            if target.guard is not None:
                await target.guard.close()


async def _loop(store: ProfileStore, actors: SyncActors, targets: dict[str, Target], *, interval: float, grace: timedelta,
                lease: timedelta, stop: asyncio.Event, bulk_backlog: int, metrics: Metrics | None, counted: Counted | None) -> None:
    while not stop.is_set():
        try:
            await sweep_once(store, actors, targets, grace=grace, lease=lease, bulk_backlog=bulk_backlog, metrics=metrics, counted=counted)
        except Exception:  # the loop must outlive any single failure; Sentry and the log see it
            log.exception("sweep failed; retrying in %.1fs", interval)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
