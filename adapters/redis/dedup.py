"""De-duplication of deliveries in Redis, within a window.

A key is remembered only after its delivery was confirmed by RabbitMQ, so a
delivery refused with 503 is never mistaken for a duplicate on its retry. When
Redis is unreachable nothing is filtered: the merge's own idempotency (event ids
derived from content) is the fallback, so a duplicate then costs work, not
correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


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

    async def seen(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        try:
            values = await self._redis.mget([self._prefix + k for k in keys])
        except (RedisError, OSError) as exc:
            log.warning("dedup lookup skipped, Redis unavailable: %s", type(exc).__name__)
            return set()
        return {k for k, v in zip(keys, values, strict=True) if v is not None}

    async def remember(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._prefix + key, b"1", ex=self._window)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("dedup keys not stored, Redis unavailable: %s", type(exc).__name__)

    async def close(self) -> None:
        await self._redis.aclose()
