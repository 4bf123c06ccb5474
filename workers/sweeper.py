"""The background ESP sync: finds profiles still pending and sends them to ``sync_profile``.

The merge actor enqueues a sync as soon as a profile changes; the sweeper is
the safety net for everything that slipped through (a crash between the write
and the enqueue, a dead-lettered sync that was purged, a mapping change).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from adapters.store import ProfileStore

MAX_CLAIM = 2_500

log = logging.getLogger(__name__)


async def sweep_once(store: ProfileStore, targets: dict[str, int], grace: timedelta, lease: timedelta, batch_min: int = 20) -> int:
    """Re-enqueue pending profiles of every ESP target (target -> its batch limit): one by one when
    few, in bulk batches when a backlog built up."""
    from workers.actors import sync_batch, sync_profile

    total = 0
    for esp, batch_limit in targets.items():
        pending = await store.claim_pending(esp, grace, lease, limit=min(MAX_CLAIM, 5 * batch_limit))
        if len(pending) >= batch_min:
            for start in range(0, len(pending), batch_limit):
                await asyncio.to_thread(sync_batch.send, pending[start:start + batch_limit], esp)
        else:
            for profile_id in pending:
                await asyncio.to_thread(sync_profile.send, profile_id, esp)
        if pending:
            log.info("sweeper re-enqueued %d pending profile(s) for %s", len(pending), esp)
        total += len(pending)
    return total


async def run(store: ProfileStore, targets: dict[str, int], interval: float, grace: timedelta, lease: timedelta,
              stop: asyncio.Event) -> None:
    """Sweep every ``interval`` seconds until ``stop`` is set; survives MongoDB and broker outages.

    Parameters:
      grace: how long a change may wait for the merge's own enqueue before the sweeper steps in.
      lease: how long before the same profile may be re-enqueued by a sweep.
    """
    try:
        await _loop(store, targets, interval, grace, lease, stop)
    finally:
        await store.close()


async def _loop(store: ProfileStore, targets: dict[str, int], interval: float, grace: timedelta, lease: timedelta,
                stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await sweep_once(store, targets, grace, lease)
        except Exception:  # the loop must outlive any single failure; Sentry and the log see it
            log.exception("sweep failed; retrying in %.1fs", interval)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
