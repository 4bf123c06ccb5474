"""Guards around every call to an ESP account, shared by every sync process through Redis.

- A concurrency limit (Mailchimp allows 10 simultaneous connections per key): a
  distributed semaphore of leased slots, so a crashed process cannot leak one.
  It adapts: a 429 halves the usable slots, each success gives one back, up to the
  configured limit (additive increase, multiplicative decrease).
- Rate windows (e.g. a 1 s burst and a 60 s steady window per endpoint): sliding-window
  logs per bucket, checked and counted atomically for every window at once, so no stretch
  of a window's length holds more than its limit, whatever the ESP's own alignment. A 429
  halves the usable rate as well; successes win it back.
- A shared pause: a ``Retry-After`` pauses every process's calls to the account until it passes;
  rate-limit headers saying a budget is spent (``X-RateLimit-Remaining: 0``, ``RateLimit-Remaining``:
  both per endpoint) pause that bucket's calls until the reset.
- A circuit breaker: after ``failures`` consecutive transient failures the account
  is "open" for ``open_s`` seconds and calls fail fast (retried later, so other
  accounts and ESPs are not slowed by this one); then one trial call decides, while
  the others keep failing fast. Fast failures, and a trial that finds the ESP still
  down, raise ``circuit_open``: the retry middleware does not count them as attempts.

The state is visible: :meth:`EspGuard.state`, ``mergetag esp status``. Every request that was
admitted is counted per kind (the HTTP method) in the same Redis round trip that frees its slot,
so ``mergetag pull --wait`` can set the requests the sync made against the minimum
(:meth:`EspGuard.requests`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any

import redis.asyncio as redis

from schemas.errors import CircuitOpen, EspBusy, MergetagError, RateSpent

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

# Sliding windows, so no stretch of ``window`` seconds, however it is aligned, holds more than ``limit``
# requests. KEYS: one log (sorted set) per window; ARGV: now_ms, token, then (limit, window_ms) per window.
# Returns 0 when every window had room (the request is logged in each), else the ms until the fullest has.
RATE = """
local now, token = tonumber(ARGV[1]), ARGV[2]
local wait = 0
for i, key in ipairs(KEYS) do
  local limit, window = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, -limit, -limit, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now + 1)
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, token)
  redis.call('PEXPIRE', key, tonumber(ARGV[2 * i + 2]))
end
return 0
"""

Rates = dict[str, list[tuple[int, float]]]
Observe = Callable[[str, "int | str", float], None]
"""(method, HTTP status or ``timeout``/``unreachable``, seconds) of one request."""
WINDOW_MARGIN = 1.1

_rate_patience: ContextVar[float | None] = ContextVar("rate_patience", default=None)


@contextmanager
def rate_patience(seconds: float) -> Iterator[None]:
    """Calls made within wait at most ``seconds`` for their bucket's rate (not ``wait_s``), then raise
    RateSpent: for a caller with another way to send, a bucket of its own, that is quicker than waiting."""
    reset = _rate_patience.set(seconds)
    try:
        yield
    finally:
        _rate_patience.reset(reset)


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
      rates: bucket -> [(requests, window seconds), ...]; a bucket not listed has no rate limit.
      observe: told of each request's outcome (method, HTTP status or failure, seconds): metrics.
    """

    def __init__(self, url: str, account: str, *, limit: int = 10, failures: int = 5, open_s: float = 30.0,
                 wait_s: float = 10.0, lease_ms: int = 60_000, prefix: str = "mergetag", rates: Rates | None = None,
                 observe: Observe | None = None) -> None:
        self._redis = redis.Redis.from_url(url)
        self._base = f"{prefix}:esp:{account}"
        self._slots = f"{self._base}:slots"
        self._key = f"{self._base}:state"
        self._trial = f"{self._base}:trial"
        self._requests = f"{self._base}:requests"
        self.account, self.limit, self.failures, self.open_s = account, limit, failures, open_s
        self.rates = rates or {}
        self.observe = observe
        self._wait, self._lease = wait_s, lease_ms
        self._acquire = self._redis.register_script(ACQUIRE)
        self._rate = self._redis.register_script(RATE)

    @asynccontextmanager
    async def call(self, bucket: str = "default", kind: str = "request") -> AsyncIterator[None]:
        """Wrap one ESP request: fail fast when open, wait out a pause, take a rate slot and a
        connection slot, record the outcome.

        ``kind``: what the request is counted as once admitted (whether it then succeeds or not:
        it was sent, or tried).
        Raises EspUnavailable (``circuit_open``, or ``esp_busy`` when no room comes within ``wait_s``).
        """
        state = await self._redis.hmget(self._key, ["opened_until", "paused_until", "consecutive_failures", f"paused_until:{bucket}"])
        opened_until, paused_until, failures, bucket_paused_until = (float(v or 0) for v in state)
        now = time.time()
        if opened_until > now:
            raise CircuitOpen(f"{self.account} circuit open", retry_after=opened_until - now)
        trial = failures >= self.failures
        if trial and not await self._redis.set(self._trial, b"1", nx=True, px=self._lease):
            # Half-open: one trial call finds out whether the ESP is back; everyone else waits for its verdict.
            raise CircuitOpen(f"{self.account} circuit half-open", retry_after=min(1.0, self.open_s))
        token = uuid.uuid4().hex
        admitted = False
        try:
            await self._admit(bucket, paused_until - now, bucket_paused_until - now, token)
            admitted = True
            try:
                yield
            except MergetagError as exc:
                if exc.retryable:
                    await self._failed(exc)
                    if trial and not exc.may_still_land:
                        # The trial confirmed the outage: for the caller this is the open circuit, not a failed
                        # attempt. (A timeout stays a timeout: that request may still land.)
                        raise CircuitOpen(f"{self.account} still failing: {exc.code}",
                                             retry_after=self.open_s) from None
                raise
            else:
                await self._succeeded()
        finally:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(self._slots, token)
                if admitted:
                    pipe.hincrby(self._requests, kind, 1)
                await pipe.execute()
            if trial:
                await self._redis.delete(self._trial)

    async def _admit(self, bucket: str, paused_s: float, bucket_paused_s: float, token: str) -> None:
        """Wait out a pause (the account's, then the bucket's), then take a rate slot and a connection
        slot; all within ``wait_s`` (a bucket's pause and rate within the caller's patience).

        Raises EspUnavailable(``esp_busy``) rather than wait longer: the message comes back later
        without holding a worker meanwhile.
        """
        deadline = time.monotonic() + self._wait
        if paused_s > 0:
            if paused_s > self._wait:
                raise EspBusy(f"{self.account} is paused by its rate limit", retry_after=paused_s)
            await asyncio.sleep(paused_s)
        patience = _rate_patience.get()
        rate_deadline = deadline if patience is None else min(deadline, time.monotonic() + patience)
        if bucket_paused_s > 0:
            if time.monotonic() + bucket_paused_s > rate_deadline:
                raise RateSpent(f"{self.account} {bucket} is paused by its rate limit", retry_after=bucket_paused_s)
            await asyncio.sleep(bucket_paused_s)
        await self._take_rate(bucket, rate_deadline)
        delay = 0.01
        while not await self._acquire(keys=[self._slots, self._key], args=[int(time.time() * 1000), self._lease, token, self.limit]):
            if time.monotonic() > deadline:
                raise EspBusy(f"{self.account} has no free connection", retry_after=1.0)
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 2)

    async def _take_rate(self, bucket: str, deadline: float) -> None:
        windows = self.rates.get(bucket)
        if not windows:
            return
        while True:
            now_ms = int(time.time() * 1000)
            scale = float(await self._redis.hget(self._key, "rate_scale") or 1.0)
            keys, args = [], [now_ms, uuid.uuid4().hex]
            for limit, window_s in windows:
                # A tenth longer than the ESP's own window: the ESP counts arrivals on its clock, after a
                # network delay that varies, so a window exactly as long would now and then cross its limit.
                window_ms = int(window_s * 1000 * WINDOW_MARGIN)
                keys.append(f"{self._base}:rate:{bucket}:{window_ms}")
                args += [max(1, int(limit * scale)), window_ms]
            wait_ms = int(await self._rate(keys=keys, args=args))
            if not wait_ms:
                return
            if time.monotonic() + wait_ms / 1000 > deadline:
                raise RateSpent(f"{self.account} {bucket} rate spent", retry_after=wait_ms / 1000)
            await asyncio.sleep(wait_ms / 1000)

    async def rate_seen(self, remaining: int | None, reset_in_s: float | None, bucket: str = "default") -> None:
        """Rate-limit headers of a response to a call of ``bucket``: when the ESP says that budget is
        spent, every process's calls of the bucket wait for its reset instead of provoking 429s."""
        if remaining is not None and remaining <= 0 and reset_in_s is not None and reset_in_s > 0:
            await self._pause(reset_in_s, f"paused_until:{bucket}")

    async def _pause(self, seconds: float, field: str = "paused_until") -> None:
        until = time.time() + seconds
        current = float(await self._redis.hget(self._key, field) or 0)
        if until > current:
            await self._redis.hset(self._key, field, until)

    async def _succeeded(self) -> None:
        """Close the circuit; win back one connection and a twentieth of the rate (additive increase)."""
        raw = await self._redis.hmget(self._key, ["limit", "rate_scale"])
        mapping: dict[str, float] = {"consecutive_failures": 0, "opened_until": 0}
        if raw[0] is not None and int(raw[0]) < self.limit:
            mapping["limit"] = int(raw[0]) + 1
        if raw[1] is not None and float(raw[1]) < 1.0:
            mapping["rate_scale"] = min(1.0, float(raw[1]) + 0.05)
        await self._redis.hset(self._key, mapping=mapping)

    async def _failed(self, exc: MergetagError) -> None:
        failures = await self._redis.hincrby(self._key, "consecutive_failures", 1)
        if "429" in exc.detail:
            # Slow down by itself: halve the usable connections and rate (never below one request),
            # and let every process wait out the ESP's Retry-After.
            raw = await self._redis.hmget(self._key, ["limit", "rate_scale"])
            current, scale = int(raw[0] or self.limit), float(raw[1] or 1.0)
            await self._redis.hset(self._key, mapping={"limit": max(1, min(current, self.limit) // 2),
                                                       "rate_scale": max(0.05, min(scale, 1.0) / 2)})
            if getattr(exc, "retry_after", None):
                await self._pause(float(exc.retry_after))
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
            "rate_scale": round(min(float(raw.get("rate_scale", 1.0) or 1.0), 1.0), 2),
            "paused_for_s": round(max([0.0, *(float(v or 0) - now for k, v in raw.items() if k.startswith("paused_until"))]), 1),
        }

    async def requests(self) -> dict[str, int]:
        """Requests admitted so far by every process of the prefix, per kind (they only ever grow:
        a caller compares two readings)."""
        return {k.decode(): int(v) for k, v in (await self._redis.hgetall(self._requests)).items()}

    async def close(self) -> None:
        await self._redis.aclose()
