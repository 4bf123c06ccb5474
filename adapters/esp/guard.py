"""Guards around every call to an ESP account, shared by every sync process through Redis.

- A concurrency limit (Mailchimp allows 10 simultaneous connections per key): a
  distributed semaphore of leased slots, so a crashed process cannot leak one.
  It adapts: a 429 halves the usable slots, each success gives one back, up to the
  configured limit (additive increase, multiplicative decrease).
- A circuit breaker: after ``failures`` consecutive transient failures the account
  is "open" for ``open_s`` seconds and calls fail fast (retried later, so other
  accounts and ESPs are not slowed by this one); then one trial call decides.

The state is visible: :meth:`EspGuard.state`, ``mergetag esp status``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as redis

from schemas.errors import EspUnavailable, MergetagError

ACQUIRE = """
local slots, key, now, lease, token, max = KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
local limit = tonumber(redis.call('HGET', key, 'limit') or max)
if redis.call('ZCARD', slots) < limit then
  redis.call('ZADD', slots, now + lease, token)
  return 1
end
return 0
"""


def account_id(esp: str, api_key: str) -> str:
    """Names an ESP account without spelling out its key."""
    return f"{esp}:{hashlib.sha256(api_key.encode()).hexdigest()[:12]}"


class EspGuard:
    """Parameters:
      url: Redis URL.
      account: from :func:`account_id`.
      limit: most simultaneous calls across all processes.
      failures: consecutive transient failures that open the circuit.
      open_s: how long an open circuit fails fast.
      wait_s: how long a call waits for a free slot before it is retried later instead.
      lease_ms: a slot's lease (longer than any call).
    """

    def __init__(self, url: str, account: str, limit: int = 10, failures: int = 5, open_s: float = 30.0,
                 wait_s: float = 10.0, lease_ms: int = 60_000, prefix: str = "mergetag") -> None:
        self._redis = redis.Redis.from_url(url)
        self._slots = f"{prefix}:esp:{account}:slots"
        self._key = f"{prefix}:esp:{account}:state"
        self.account, self.limit, self.failures, self.open_s = account, limit, failures, open_s
        self._wait, self._lease = wait_s, lease_ms
        self._acquire = self._redis.register_script(ACQUIRE)

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Wrap one ESP request: fail fast when open, wait for a slot, record the outcome."""
        opened_until = float(await self._redis.hget(self._key, "opened_until") or 0)
        now = time.time()
        if opened_until > now:
            raise EspUnavailable(f"{self.account} circuit open", code="circuit_open", retry_after=opened_until - now)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self._wait
        delay = 0.01
        while not await self._acquire(keys=[self._slots, self._key], args=[int(time.time() * 1000), self._lease, token, self.limit]):
            if time.monotonic() > deadline:
                raise EspUnavailable(f"{self.account} has no free connection", code="esp_busy", retry_after=1.0)
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 2)
        try:
            yield
        except MergetagError as exc:
            if exc.retryable:
                await self._failed(exc)
            raise
        else:
            await self._succeeded()
        finally:
            await self._redis.zrem(self._slots, token)

    async def _succeeded(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key, mapping={"consecutive_failures": 0, "opened_until": 0})
            pipe.hincrby(self._key, "limit", 1)
            results = await pipe.execute()
        if int(results[-1]) > self.limit:
            await self._redis.hset(self._key, "limit", self.limit)

    async def _failed(self, exc: MergetagError) -> None:
        failures = await self._redis.hincrby(self._key, "consecutive_failures", 1)
        if "429" in exc.detail:
            # Slow down by itself: halve the usable connections (never below one).
            current = int(await self._redis.hget(self._key, "limit") or self.limit)
            await self._redis.hset(self._key, "limit", max(1, min(current, self.limit) // 2))
        if failures >= self.failures:
            await self._redis.hset(self._key, "opened_until", time.time() + self.open_s)

    async def state(self) -> dict[str, Any]:
        raw = {k.decode(): v.decode() for k, v in (await self._redis.hgetall(self._key)).items()}
        opened_until = float(raw.get("opened_until", 0) or 0)
        failures = int(raw.get("consecutive_failures", 0) or 0)
        now = time.time()
        circuit = "open" if opened_until > now else ("half-open" if failures >= self.failures else "closed")
        return {
            "account": self.account,
            "circuit": circuit,
            "consecutive_failures": failures,
            "open_for_s": round(max(0.0, opened_until - now), 1),
            "connection_limit": min(int(raw.get("limit", self.limit) or self.limit), self.limit),
            "connections_in_use": await self._redis.zcount(self._slots, int(now * 1000), "+inf"),
        }

    async def close(self) -> None:
        await self._redis.aclose()
