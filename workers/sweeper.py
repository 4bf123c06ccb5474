"""The background ESP sync: finds profiles still pending and sends them to ``sync_profile``.

The merge actor enqueues a sync as soon as a profile changes; the sweeper is
the safety net for everything that slipped through (a crash between the write
and the enqueue, a dead-lettered sync that was purged, a mapping change).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from adapters.esp.mailchimp import BATCH_LIMIT
from adapters.esp.mailchimp import NAME as MAILCHIMP
from adapters.store import ProfileStore

log = logging.getLogger(__name__)


async def sweep_once(store: ProfileStore, grace: timedelta, lease: timedelta, batch_min: int = 20) -> int:
    """Re-enqueue pending profiles: one by one when few, in bulk batches (500 at most) when a backlog built up."""
    from workers.actors import sync_batch, sync_profile

    pending = await store.claim_pending(MAILCHIMP, grace, lease, limit=5 * BATCH_LIMIT)
    if len(pending) >= batch_min:
        for start in range(0, len(pending), BATCH_LIMIT):
            await asyncio.to_thread(sync_batch.send, pending[start:start + BATCH_LIMIT])
    else:
        for profile_id in pending:
            await asyncio.to_thread(sync_profile.send, profile_id)
    if pending:
        log.info("sweeper re-enqueued %d pending profile(s)", len(pending))
    return len(pending)


async def run(store: ProfileStore, interval: float, grace: timedelta, lease: timedelta, stop: asyncio.Event) -> None:
    """Sweep every ``interval`` seconds until ``stop`` is set; survives MongoDB and broker outages.

    Parameters:
      grace: how long a change may wait for the merge's own enqueue before the sweeper steps in.
      lease: how long before the same profile may be re-enqueued by a sweep.
    """
    try:
        await _loop(store, interval, grace, lease, stop)
    finally:
        await store.close()


async def _loop(store: ProfileStore, interval: float, grace: timedelta, lease: timedelta, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await sweep_once(store, grace, lease)
        except Exception:  # the loop must outlive any single failure; Sentry and the log see it
            log.exception("sweep failed; retrying in %.1fs", interval)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
