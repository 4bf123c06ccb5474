"""The event trail: what happened to a delivery, an event and a profile, stage by stage — received,
queued, merged into profile version N (which traits changed), synced to each target, quarantined or
dead-lettered —
for operators to follow one event or one person through the system.

Beside it, the events accepted per source, in ten-second buckets, for the console's events per
second. Kept in Redis, bounded: per subject (``delivery:<source>:<id>``, ``event:<id>``, ``profile:<id>``) a
list of at most ``cap`` entries, newest first, expiring ``ttl_s`` after its last entry. Written as
group commit and not waited for: every entry added since the last round trip goes in one pipeline,
and a trail lost with Redis costs nothing but the trail. Entries name ids, stages, targets, trait
names and times — never a value of the person.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import redis as redis_sync
from redis.exceptions import RedisError

from adapters.redis.rounds import Done, Rounds, first_error
from adapters.redis.scripts import Segment

log = logging.getLogger(__name__)

ADD = """
local cap, ttl, k, i = tonumber(ARGV[1]), tonumber(ARGV[2]), 1, 3
while i < #ARGV do
  for _ = 1, tonumber(ARGV[i]) do
    redis.call('LPUSH', KEYS[k], ARGV[i + 1])
    redis.call('LTRIM', KEYS[k], 0, cap - 1)
    redis.call('EXPIRE', KEYS[k], ttl)
    k = k + 1
  end
  i = i + 2
end
"""
"""Entries into the trails of the subjects they name, as many as one round gathered, in one command:
ARGV = cap, ttl, then per entry how many subjects (KEYS, in order) and the entry."""
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode
RATE_BUCKET_S = 10
RATE_WINDOW_S = 60


class Trail:
    """Parameters:
      redis: a Redis URL, or the :class:`Rounds` this shares with the process's other parts.
      prefix: key namespace (the deployment's queue prefix).
      cap: most entries kept per subject.
      ttl_s: how long a subject's trail outlives its last entry.
    """

    def __init__(self, redis: str | Rounds, prefix: str, cap: int = 100, ttl_s: int = 7 * 86400) -> None:
        self._own = not isinstance(redis, Rounds)
        self._rounds = Rounds(redis) if isinstance(redis, str) else redis
        self._rounds.join(self)
        self._redis = self._rounds.redis
        self._key = f"{prefix}:trail:"
        self._rate = f"{prefix}:accepted:"
        self._cap, self._ttl = cap, ttl_s
        self._pending: list[tuple[Sequence[str], str]] = []
        self._tallies: dict[str, int] = {}
        self.round_trips = 0

    def add(self, subjects: Sequence[str], stage: str, **facts: Any) -> None:
        """Add one entry to the trail of each of ``subjects``, with the next round trip."""
        entry = _encode({"stage": stage, "at": datetime.now(timezone.utc).isoformat(), **facts})
        self._pending.append((subjects, entry))
        self._rounds.wake()

    def tally(self, source: str, n: int) -> None:
        """Count ``n`` events accepted from ``source`` (the console's events per second), with the next round trip."""
        self._tallies[source] = self._tallies.get(source, 0) + n
        self._rounds.wake()

    async def rates(self) -> dict[str, float]:
        """Events per second accepted by every receiver, per source, over about the last minute (the
        buckets of the last 50 seconds and the current one)."""
        clock = time.time()
        now = int(clock) // RATE_BUCKET_S
        first = now - RATE_WINDOW_S // RATE_BUCKET_S + 1
        keys = [f"{self._rate}{bucket}" for bucket in range(first, now + 1)]
        seconds = clock - first * RATE_BUCKET_S
        totals: dict[str, int] = {}
        for counts in await asyncio.gather(*(self._redis.hgetall(k) for k in keys)):
            for source, n in counts.items():
                totals[source.decode()] = totals.get(source.decode(), 0) + int(n)
        return {source: round(n / seconds, 2) for source, n in sorted(totals.items())}

    def take(self) -> tuple[Segment, Done] | None:
        """Every entry and tally added since the last round: one script, a few counters."""
        if not self._pending and not self._tallies:
            return None
        batch, self._pending = self._pending, []
        tallies, self._tallies = self._tallies, {}
        keys = [self._key + s for subjects, _ in batch for s in subjects]
        args = [self._cap, self._ttl, *(x for subjects, entry in batch for x in (len(subjects), entry))]
        segment = ([(ADD, keys, args)] if batch else [], functools.partial(self._count, tallies) if tallies else None)
        return segment, functools.partial(self._written, len(batch))

    def _written(self, entries: int, results: list[Any] | Exception) -> None:
        failure = results if isinstance(results, Exception) else first_error(results)
        if failure is None:
            self.round_trips += 1
        else:
            log.warning("event trail not written (%d entries): %s", entries, type(failure).__name__)

    def _count(self, tallies: dict[str, int], pipe: Any) -> None:
        bucket = f"{self._rate}{int(time.time()) // RATE_BUCKET_S}"
        for source, n in tallies.items():
            pipe.hincrby(bucket, source, n)
        pipe.expire(bucket, 2 * RATE_WINDOW_S)

    async def flushed(self) -> None:
        """Wait for what was added so far (tests, benchmarks, shutdown)."""
        await self._rounds.flushed()

    async def read(self, subject: str) -> list[dict[str, Any]]:
        """A subject's trail, oldest first."""
        return [json.loads(e) for e in reversed(await self._redis.lrange(self._key + subject, 0, -1))]

    async def close(self) -> None:
        await self.flushed()
        if self._own:
            await self._rounds.close()


def delivery_subject(source: Any, delivery_id: Any) -> str:
    return f"delivery:{source}:{delivery_id}"


class DeadLetterNotes:
    """The trail's "dead-lettered" entries, written by the broker's retry middleware (in a worker
    thread, so through a synchronous client of its own, connected on first use).

    Parameters as :class:`Trail`; ``subjects``: which trails a dead-lettered message belongs in (the
    composition root knows the actors' arguments)."""

    def __init__(self, url: str, prefix: str, cap: int, ttl_s: int, subjects: Callable[[str, tuple[Any, ...]], list[str]]) -> None:
        self._url, self._key, self._cap, self._ttl, self._subjects = url, f"{prefix}:trail:", cap, ttl_s, subjects
        self._script: Any = None

    def __call__(self, message: Any, reason: dict[str, Any]) -> None:
        subjects = self._subjects(message.actor_name, tuple(message.args))
        if not subjects:
            return
        if self._script is None:
            self._script = redis_sync.Redis.from_url(self._url, socket_timeout=0.5, socket_connect_timeout=0.5).register_script(ADD)
        entry = json.dumps({"stage": "dead-lettered", "at": datetime.now(timezone.utc).isoformat(), "actor": message.actor_name,
                            "reason": reason.get("code"), "retries": reason.get("retries"), "letter": message.message_id},
                           default=str, separators=(",", ":"))
        try:
            self._script(keys=[self._key + s for s in subjects], args=[self._cap, self._ttl, len(subjects), entry])
        except RedisError as exc:
            log.warning("dead letter %s not in the trail: %s", message.message_id, type(exc).__name__)
