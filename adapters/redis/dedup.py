"""De-duplication of deliveries in Redis, within a window.

A key is remembered only after its delivery was confirmed by RabbitMQ, so a
delivery refused with 503 is never mistaken for a duplicate on its retry. When
Redis is unreachable nothing is filtered: the merge's own idempotency (event ids
derived from content) is the fallback, so a duplicate then costs work, not
correctness.

Group commit: the lookups of every request in flight and the keys confirmed since the last round
trip share two commands (one MGET, one script) of one pipeline, with the trail's entries beside them
(:class:`~adapters.redis.rounds.Rounds`), so the receiver makes at most one Redis round trip per
request, fewer under load. Remembering is not waited for: a key lost with the
process costs a duplicate's work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any

from adapters.redis.rounds import Done, Rounds
from adapters.redis.scripts import Segment

log = logging.getLogger(__name__)


REMEMBER = """
for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'EX', ARGV[1]) end
"""
"""Every key confirmed since the last round, remembered for the window, in one command."""


def _mget(keys: list[str], pipe: Any) -> None:
    pipe.mget(keys)


class Dedup:
    """Parameters:
      redis: a Redis URL, or the :class:`Rounds` this shares with the process's other parts.
      window_s: how long a key is remembered (cover the senders' retry horizon).
      prefix: key namespace (tests and deployments sharing a Redis use their own).
    """

    def __init__(self, redis: str | Rounds, window_s: int, prefix: str = "mergetag") -> None:
        self._own = not isinstance(redis, Rounds)
        self._rounds = Rounds(redis) if isinstance(redis, str) else redis
        self._rounds.join(self)
        self._window = window_s
        self._prefix = f"{prefix}:dedup:"
        self._lookups: list[tuple[list[str], asyncio.Future[set[str]]]] = []
        self._confirmed: list[str] = []

    @property
    def round_trips(self) -> int:
        """Redis round trips made so far (the benchmark divides them by requests)."""
        return self._rounds.round_trips

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """The keys already remembered; empty when Redis is unavailable (nothing is filtered then)."""
        if not keys:
            return set()
        found: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._lookups.append((list(keys), found))
        self._rounds.wake()
        return await found

    def remember(self, keys: Sequence[str]) -> None:
        """Remember confirmed keys with the next round trip (without waiting for it)."""
        if keys:
            self._confirmed.extend(keys)
            self._rounds.wake()

    def take(self) -> tuple[Segment, Done] | None:
        """Every lookup and every confirmed key gathered since the last round: one MGET, one script."""
        if not self._lookups and not self._confirmed:
            return None
        lookups, self._lookups = self._lookups, []
        confirmed, self._confirmed = self._confirmed, []
        asked = [self._prefix + k for keys, _ in lookups for k in keys]
        remember = [(REMEMBER, [self._prefix + k for k in confirmed], [self._window])] if confirmed else []
        return (remember, functools.partial(_mget, asked) if asked else None), functools.partial(self._answer, lookups, bool(asked))

    def _answer(self, lookups: list[tuple[list[str], asyncio.Future[set[str]]]], asked: bool, results: list[Any] | Exception) -> None:
        if isinstance(results, Exception):
            log.warning("dedup round trip skipped, Redis unavailable: %s", type(results).__name__)
        values = results[-1] if asked and isinstance(results, list) and results and isinstance(results[-1], list) else None
        at = 0
        for keys, found in lookups:
            if not found.done():
                found.set_result(set() if values is None else
                                 {k for k, v in zip(keys, values[at:at + len(keys)], strict=True) if v is not None})
            at += len(keys)

    async def close(self) -> None:
        if self._own:
            await self._rounds.close()
