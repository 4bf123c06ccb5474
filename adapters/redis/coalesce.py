"""Coalescing of ESP syncs: many changes to one profile within a window become one update.

The first change schedules one delayed sync (the window is its delay), one message for every ESP
target it changed; later changes find each target's marker and rely on it, since the sync reads
the profile's latest state when it runs. The marker stays until that sync starts, so however long
the sync queue is, it holds at most one coalesced message per profile and target (a marker whose message was lost expires after ``HOLD_MS``; the
sweeper covers the gap). The freshness bound is the window. Without Redis every change schedules
its own sync (correct, just not coalesced).
"""

from __future__ import annotations

import logging

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

HOLD_MS = 600_000
MAX_CONNECTIONS = 32


class Coalescer:
    """Parameters:
      url: Redis URL.
      window_ms: how long changes are gathered before the sync runs (the freshness bound).
      prefix: key namespace.
    """

    def __init__(self, url: str, window_ms: int, prefix: str = "mergetag") -> None:
        # A worker merges up to a hundred messages at once: past the pool's connections a call waits
        # for one (at most the socket timeout) instead of failing with MaxConnectionsError, which a
        # 40 events/s burst met (redis-py's async pool holds 100), and skipping the coalescing.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=0.5,
                                                     socket_timeout=0.5, socket_connect_timeout=0.5)
        self._redis = redis.Redis.from_pool(pool)
        self.window_ms = window_ms
        self._prefix = f"{prefix}:sync-scheduled:"

    async def first_in_window(self, targets: list[str], profile_id: str) -> list[str]:
        """The ESP targets of ``targets`` that have no sync of this profile scheduled yet: the caller
        schedules one for them (one message for them all). One round trip."""
        if self.window_ms <= 0:
            return list(targets)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for esp in targets:
                    pipe.set(f"{self._prefix}{esp}:{profile_id}", b"1", nx=True, px=max(self.window_ms, HOLD_MS))
                first = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("coalescing skipped, Redis unavailable: %s", type(exc).__name__)
            return list(targets)
        return [esp for esp, new in zip(targets, first, strict=True) if new]

    async def started(self, targets: list[str], profile_id: str) -> None:
        """The scheduled sync to ``targets`` runs now: the next change schedules another."""
        if self.window_ms <= 0 or not targets:
            return
        try:
            await self._redis.delete(*(f"{self._prefix}{esp}:{profile_id}" for esp in targets))
        except (RedisError, OSError) as exc:
            log.warning("coalescing marker not cleared, Redis unavailable: %s", type(exc).__name__)

    async def close(self) -> None:
        await self._redis.aclose()
