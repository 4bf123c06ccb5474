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


class Scripts:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._shas: dict[str, str] = {}

    async def run(self, calls: Sequence[Call], also: Callable[[Any], None] | None = None) -> list[Any]:
        """Every call in one pipeline (then whatever ``also`` adds to it); results in order, errors in
        place. Raises RedisError when Redis cannot be reached."""
        for attempt in range(2):
            for script in {script for script, _, _ in calls} - self._shas.keys():
                self._shas[script] = await self._redis.script_load(script)
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    pipe.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)
                if also is not None:
                    also(pipe)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                self._shas.clear()
                continue
            return results
        return results
