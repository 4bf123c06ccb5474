"""The send-time feed's cache: each profile's merge fields per ESP target, in Redis, kept by the merge.

One hash per profile (``<prefix>:feed:p:<id>``): its version, whether it is erased, one flag per index
key it holds, and per target the mapped fields (JSON) and the member's hash; a pointer per index key
(``<prefix>:feed:k:<key>``) finds the profile by email or phone.

The order of a profile write and its invalidation (so no read sees stale data once the store holds
the new version):
1. Before the store write, :meth:`FeedCache.invalidate` deletes the entry and sets a fence, the
   version being written (expiring after :data:`FENCE_MS`, longer than any store operation may run).
   It fails the merge when Redis is down, before anything is written: the merge is retried.
2. The store write.
3. :meth:`FeedCache.put` writes the new entry, only if its version is not older than the entry's or
   the fence's, and lifts the fence.
Between 1 and 3 reads miss and go to the store (which holds the old version until 2 commits, the
new one after). A read that missed fills the cache through the same guarded :meth:`put`, so a read
of the old version that finishes late cannot overwrite the new one; a writer that dies between 2 and
3 leaves no entry, only a fence that expires. Pointers are hints: a read checks that the profile it
points at still holds the key, else it goes to the store.

Reads are one round trip (a Lua script that also counts the token's rate), group-committed: the reads
of one event-loop turn share one pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from adapters.redis.scripts import Scripts
from schemas.errors import CacheUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0
"""How soon a merge that found Redis down tries again."""
FENCE_MS = 60_000
"""How long a fence outlives its writer: twice the store's operation timeout (30 s, enforced by the server too)."""

INVALIDATE = """
redis.call('DEL', KEYS[1])
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > fence then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return 1
"""

PUT = """
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
local fence = tonumber(redis.call('GET', KEYS[2]) or '-1')
if version < current or version < fence then return 0 end
redis.call('DEL', KEYS[1])
local n = tonumber(ARGV[4])
local fields = {'v', ARGV[1], 'gone', ARGV[3]}
for i = 1, n * 2 do fields[#fields + 1] = ARGV[4 + i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if fence >= 0 then redis.call('DEL', KEYS[2]) end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[5 + n * 2], 'EX', ARGV[2]) end
return 1
"""

READ = """
local limit = tonumber(ARGV[4])
if limit > 0 then
  local used = redis.call('INCR', KEYS[2])
  if used == 1 then redis.call('EXPIRE', KEYS[2], 2) end
  if used > limit then return {-1} end
end
local id = ARGV[1]
if id == '' and KEYS[1] == '' then return {0} end
if KEYS[1] ~= '' then
  id = redis.call('GET', KEYS[1])
  if not id then return {0} end
end
if redis.call('EXISTS', ARGV[5] .. 'w:' .. id) == 1 then return {0} end
local got = redis.call('HMGET', ARGV[5] .. 'p:' .. id, 'v', 'gone', 'b:' .. ARGV[2], 'h:' .. ARGV[2], 'k:' .. ARGV[3])
if not got[1] then return {0} end
if KEYS[1] ~= '' and not got[5] then return {0} end
if got[2] == '1' then return {2} end
if not got[3] then return {3} end
return {1, got[3], got[4]}
"""
"""A read: over the token's rate (-1), a miss (0), a hit (1, fields, hash), erased (2), no member for the target (3).

The profile's keys are computed in the script from the pointer (not cluster-safe; one Redis, or a
cluster with hash tags, is what mergetag supports)."""

OVER_RATE, MISS, HIT, ERASED, NO_MEMBER = -1, 0, 1, 2, 3


@dataclass(frozen=True)
class Entry:
    """What the cache holds for one profile version: per target the mapped fields (JSON) and the member's hash."""

    profile_id: str
    version: int
    keys: Sequence[str] = ()
    """The profile's index keys (keyed hashes): every pointer that finds it."""
    bodies: Mapping[str, tuple[bytes, str]] = field(default_factory=dict)
    gone: bool = False
    """Erased, or absorbed into another profile."""


@dataclass(frozen=True)
class Found:
    status: int
    fields: bytes | None = None
    hash: str | None = None


def fields_json(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


def entry(esps: Mapping[str, Any], profile_id: str, version: int, keys: Sequence[str], members: Mapping[str, tuple[Any, Any]],
          gone: bool = False) -> Entry:
    """The cache entry of one profile version: each target's member (``members``: target -> (member,
    hash)) rendered as its fields by the target's client in ``esps``. Pure."""
    bodies = {t: (fields_json(esps[t].fields(member)), digest) for t, (member, digest) in members.items()
              if member is not None and t in esps and not gone}
    return Entry(profile_id, version, tuple(keys), bodies, gone)


class FeedCache:
    """Parameters:
      url: Redis URL.
      prefix: key namespace (the deployment's queue prefix).
      ttl_s: how long an entry and its pointers live without a write.
    """

    def __init__(self, url: str, prefix: str, ttl_s: int = 86400) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._key = f"{prefix}:feed:"
        self._ttl = ttl_s
        self._scripts = Scripts(self._redis)
        self._reads: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._reading: asyncio.Task[None] | None = None

    def _entry(self, profile_id: str) -> str:
        return f"{self._key}p:{profile_id}"

    def _fence(self, profile_id: str) -> str:
        return f"{self._key}w:{profile_id}"

    def _pointer(self, key: str) -> str:
        return f"{self._key}k:{key}"

    async def invalidate(self, versions: Mapping[str, int]) -> None:
        """Before a store write: drop each profile's entry and fence it at the version being written.
        Raises CacheUnavailable (retryable) when Redis does not answer: then nothing may be written."""
        if not versions:
            return
        calls = [(INVALIDATE, [self._entry(pid), self._fence(pid)], [version, FENCE_MS]) for pid, version in versions.items()]
        try:
            failed = next((r for r in await self._scripts.run(calls) if isinstance(r, Exception)), None)
        except RedisError as exc:
            failed = exc
        if failed is not None:
            raise CacheUnavailable(f"feed cache: {type(failed).__name__}", retry_after=RETRY_AFTER_S)

    async def put(self, entries: Sequence[Entry]) -> list[bool]:
        """Write each entry unless the cache holds or fences a newer version; returns which were written.
        A failure is logged, not raised: the entries stay invalidated, and reads go to the store."""
        if not entries:
            return []
        calls = []
        for e in entries:
            pairs: list[Any] = [x for k in e.keys for x in (f"k:{k}", 1)]
            for target, (body, digest) in e.bodies.items():
                pairs += [f"b:{target}", body, f"h:{target}", digest]
            calls.append((PUT, [self._entry(e.profile_id), self._fence(e.profile_id), *(self._pointer(k) for k in e.keys)],
                          [e.version, self._ttl, int(e.gone), len(pairs) // 2, *pairs, e.profile_id]))
        try:
            results = await self._scripts.run(calls)
        except RedisError as exc:
            results = [exc] * len(entries)
        if any(isinstance(r, Exception) for r in results):
            log.warning("feed cache not filled (%d profiles)", sum(isinstance(r, Exception) for r in results))
        return [r == 1 for r in results]

    async def read(self, target: str, *, key: str | None = None, profile_id: str | None = None, rate: tuple[str, int] = ("", 0),
                   second: int = 0) -> Found:
        """One target's fields for the profile holding index ``key`` (or with ``profile_id``; neither: only
        count), counting one request of ``rate`` = (token name, limit per second; 0: unlimited) in
        ``second``. Raises RedisError."""
        keys = [self._pointer(key) if key else "", f"{self._key}r:{rate[0]}:{second}"]
        args = [profile_id or "", target, key or "", rate[1], self._key]
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._reads.append((keys, args, done))
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self._read_round())
        got = await done
        return Found(int(got[0]), got[1] if len(got) > 1 else None, got[2].decode() if len(got) > 2 and got[2] else None)

    async def _read_round(self) -> None:
        while self._reads:
            await asyncio.sleep(0)  # the reads of this loop turn share the round trip
            batch, self._reads = self._reads, []
            try:
                results = await self._scripts.run([(READ, keys, args) for keys, args, _ in batch])
            except RedisError as exc:
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, _, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def close(self) -> None:
        await self._redis.aclose()


class FeedWrites:
    """What the store tells the feed's cache around each profile write (see the module's ordering):
    the versions it is about to write, then what it wrote, rendered per target by its ESP client.

    Parameters:
      cache: the feed cache.
      esps: the targets' clients (offline is enough: they only render fields).
    """

    def __init__(self, cache: FeedCache, esps: Mapping[str, Any]) -> None:
        self.cache = cache
        self._esps = esps

    def entry(self, profile_id: str, version: int, keys: Sequence[str], members: Mapping[str, tuple[Any, Any]], gone: bool = False) -> Entry:
        return entry(self._esps, profile_id, version, keys, members, gone)

    async def writing(self, versions: Mapping[str, int]) -> None:
        await self.cache.invalidate(versions)

    async def written(self, entries: Sequence[Entry]) -> None:
        await self.cache.put(entries)
