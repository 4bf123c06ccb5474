"""Lua scripts sent as EVALSHA in one pipeline, without redis-py's SCRIPT EXISTS round trip.

redis-py's registered scripts, used in a pipeline, first ask Redis whether it knows them: a second
round trip for every pipeline. Here each script is loaded once per client and again only when Redis
answers NOSCRIPT (after a restart or SCRIPT FLUSH), and the whole pipeline is then sent again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError

Call = tuple[str, Sequence[str], Sequence[Any]]
"""(script source, keys, arguments)."""


Segment = tuple[Sequence[Call], Callable[[Any], None] | None]
"""One party's share of a pipeline: its script calls, then whatever its function adds to the pipeline."""


class Scripts:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._shas: dict[str, str] = {}

    async def run(self, calls: Sequence[Call], also: Callable[[Any], None] | None = None) -> list[Any]:
        """Every call in one pipeline (then whatever ``also`` adds to it); results in order, errors in
        place. Raises RedisError when Redis cannot be reached."""
        return (await self.run_segments([(calls, also)]))[0]

    async def run_segments(self, segments: Sequence[Segment]) -> list[list[Any]]:
        """Every segment in one pipeline; each segment's results, in order, errors in place. Raises
        RedisError when Redis cannot be reached."""
        for attempt in range(2):
            for script in {script for calls, _ in segments for script, _, _ in calls} - self._shas.keys():
                self._shas[script] = await self._redis.script_load(script)
            ends: list[int] = []
            async with self._redis.pipeline(transaction=False) as pipe:
                for calls, also in segments:
                    for script, keys, args in calls:
                        pipe.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)
                    if also is not None:
                        also(pipe)
                    ends.append(len(pipe))
                results = await pipe.execute(raise_on_error=False) if len(pipe) else []
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                self._shas.clear()
                continue
            break
        return [results[start:end] for start, end in zip([0, *ends], ends, strict=False)]
