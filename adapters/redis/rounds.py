"""Group commit to Redis shared by several parts of one process: one pipeline per round.

The receiver's de-duplication (look up, remember) and its event trail each gathered their own
commands into a pipeline; two round trips, two socket writes and two wake-ups of Redis per round.
Here each part hands over what it gathered when a round begins (:meth:`Part.take`), the round sends
it all in one pipeline, and each part gets its own results back, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as redis
from redis.exceptions import RedisError

from adapters.redis.scripts import Scripts, Segment

log = logging.getLogger(__name__)

Done = Callable[[list[Any] | Exception], None]
"""Receives a part's results (errors in place), or the failure that kept the round from Redis."""


_PLAIN = frozenset({str, bytes, int})


class PackedConnection(redis.Connection):
    """Commands packed by hiredis, in C, rather than by redis-py's Python: a round of the receiver
    carries hundreds of arguments (keys, trail entries), a few microseconds a request. The bytes are
    the same; a command named in two words (``SCRIPT LOAD``), or an argument of another type, is
    packed by redis-py as before."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " not in args[0] and all(type(a) in _PLAIN for a in args):
            return [hiredis.pack_command(args)]
        return super().pack_command(*args)


class Part(Protocol):
    def take(self) -> tuple[Segment, Done] | None:
        """What this part gathered since the last round, and where its results go; None: nothing."""


class Rounds:
    """Parameters:
      url: Redis URL; or ``client``: a Redis client of the caller's.
    """

    def __init__(self, url: str = "", client: redis.Redis | None = None) -> None:
        self.redis = client or redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, connection_class=PackedConnection)
        self._scripts = Scripts(self.redis)
        self._parts: list[Part] = []
        self._flushing: asyncio.Task[None] | None = None
        self.round_trips = 0

    def join(self, part: Part) -> None:
        self._parts.append(part)

    def wake(self) -> None:
        """A part has something: a round begins at the end of this loop turn, or after the one running."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(0)  # what the rest of this loop turn gathers joins the round
            taken = [t for t in (part.take() for part in self._parts) if t is not None]
            if not taken:
                return
            outcome: list[list[Any]] | Exception
            try:
                outcome = await self._scripts.run_segments([segment for segment, _ in taken])
                self.round_trips += 1
            except (RedisError, OSError) as exc:
                outcome = exc
            for n, (_, done) in enumerate(taken):
                done(outcome if isinstance(outcome, Exception) else outcome[n])

    async def flushed(self) -> None:
        """Wait for every round begun so far (tests, shutdown)."""
        while self._flushing is not None and not self._flushing.done():
            await self._flushing

    async def close(self) -> None:
        await self.flushed()
        await self.redis.aclose()


def first_error(results: Sequence[Any]) -> Exception | None:
    return next((r for r in results if isinstance(r, Exception)), None)
