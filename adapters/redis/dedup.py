"""De-duplication of deliveries in Redis, within a window.

A key is remembered only after its delivery was confirmed by RabbitMQ, so a
delivery refused with 503 is never mistaken for a duplicate on its retry. When
Redis is unreachable nothing is filtered: the merge's own idempotency (event ids
derived from content) is the fallback, so a duplicate then costs work, not
correctness.

Group commit: the lookups of every request in flight and the keys confirmed since the last round
trip share one pipeline of two commands (one MGET, one script), so the receiver makes at most one
Redis round trip per request, fewer under load. Remembering is not waited for: a key lost with the
process costs a duplicate's work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from adapters.redis.scripts import Scripts

log = logging.getLogger(__name__)


REMEMBER = """
for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'EX', ARGV[1]) end
"""
"""Every key confirmed since the last round, remembered for the window, in one command."""


def _mget(keys: list[str], pipe: Any) -> None:
    pipe.mget(keys)


class Dedup:
    """Parameters:
      url: Redis URL.
      window_s: how long a key is remembered (cover the senders' retry horizon).
      prefix: key namespace (tests and deployments sharing a Redis use their own).
    """

    def __init__(self, url: str, window_s: int, prefix: str = "mergetag") -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._window = window_s
        self._prefix = f"{prefix}:dedup:"
        self._lookups: list[tuple[list[str], asyncio.Future[set[str]]]] = []
        self._confirmed: list[str] = []
        self._flushing: asyncio.Task[None] | None = None
        self._round_trips = 0
        self._scripts = Scripts(self._redis)

    @property
    def round_trips(self) -> int:
        """Redis round trips made so far (the benchmark divides them by requests)."""
        return self._round_trips

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """The keys already remembered; empty when Redis is unavailable (nothing is filtered then)."""
        if not keys:
            return set()
        found: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._lookups.append((list(keys), found))
        self._schedule()
        return await found

    def remember(self, keys: Sequence[str]) -> None:
        """Remember confirmed keys with the next round trip (without waiting for it)."""
        if keys:
            self._confirmed.extend(keys)
            self._schedule()

    def _schedule(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """One pipeline per round: every lookup and every confirmed key gathered while the last one ran."""
        while self._lookups or self._confirmed:
            await asyncio.sleep(0)  # let the requests of this loop iteration join the round
            lookups, self._lookups = self._lookups, []
            confirmed, self._confirmed = self._confirmed, []
            asked = [self._prefix + k for keys, _ in lookups for k in keys]
            try:
                remember = [(REMEMBER, [self._prefix + k for k in confirmed], [self._window])] if confirmed else []
                results = await self._scripts.run(remember, functools.partial(_mget, asked) if asked else None)
                self._round_trips += 1
            except (RedisError, OSError) as exc:
                log.warning("dedup round trip skipped, Redis unavailable: %s", type(exc).__name__)
                results = []
            values = results[-1] if asked and results and isinstance(results[-1], list) else [None] * len(asked)
            at = 0
            for keys, found in lookups:
                if not found.done():
                    found.set_result({k for k, v in zip(keys, values[at:at + len(keys)], strict=True) if v is not None})
                at += len(keys)

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._redis.aclose()
