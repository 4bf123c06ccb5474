"""Alerts beyond exceptions, raised through Sentry by the sync processes: dead letters past a
threshold, a target's circuit not closed for longer than allowed, a target's freshness p99 over its
bound. One alert per episode: an episode opens when its condition starts to hold and closes when it
stops; across sync processes, a Redis key per open episode makes only the first one send it.

The conditions are pure (:func:`firing`); :func:`watch` only reads the world and sends. An alert
carries names and numbers only: the alert, the target, a count, seconds — never a person.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
import sentry_sdk

from adapters.metrics import Metrics
from broker import admin, topology

log = logging.getLogger(__name__)

FRESHNESS_TTL_S = 600


@dataclass(frozen=True)
class Bounds:
    """Parameters:
      dead_letters: dead letters, over every queue, from which on an episode is open.
      circuit_s: how long a target's circuit may stay open (or half-open) before it is an episode.
      freshness_p99_s: the freshness bound: a target whose p99 since the last check is over it.
    """

    dead_letters: int = 100
    circuit_s: float = 300.0
    freshness_p99_s: float = 60.0


@dataclass(frozen=True)
class Readings:
    """What one check saw. ``freshness_p99_s``: per target, None when nothing was sent since the last
    check (then that episode stays as it was). ``not_closed_since``: per target whose circuit is not
    closed, since when (monotonic seconds)."""

    now: float
    dead_letters: int
    not_closed_since: Mapping[str, float] = field(default_factory=dict)
    freshness_p99_s: Mapping[str, float | None] = field(default_factory=dict)


def firing(readings: Readings, bounds: Bounds, open_now: frozenset[str]) -> dict[str, dict[str, Any]]:
    """Every alert whose condition holds, with what it says (names and numbers). An alert whose
    condition cannot be told this time (freshness with nothing sent) holds if it was open. Pure."""
    alerts: dict[str, dict[str, Any]] = {}
    if readings.dead_letters >= bounds.dead_letters:
        alerts["dead_letters"] = {"dead_letters": readings.dead_letters, "threshold": bounds.dead_letters}
    for target, since in readings.not_closed_since.items():
        if readings.now - since >= bounds.circuit_s:
            alerts[f"circuit_open:{target}"] = {"target": target, "open_for_s": round(readings.now - since), "bound_s": bounds.circuit_s}
    for target, p99 in readings.freshness_p99_s.items():
        name = f"freshness:{target}"
        if p99 is None:
            if name in open_now:
                alerts[name] = {"target": target, "bound_s": bounds.freshness_p99_s}
        elif p99 > bounds.freshness_p99_s:
            alerts[name] = {"target": target, "p99_s": p99, "bound_s": bounds.freshness_p99_s}
    return alerts


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of observations counted per histogram bucket (``counts[i]``: observations
    at most ``bounds[i]``, not cumulative, the last bucket unbounded), as its bucket's upper bound;
    None without observations. Pure."""
    total = sum(counts)
    if total <= 0:
        return None
    seen = 0.0
    for bound, n in zip([*bounds, math.inf], counts, strict=True):
        seen += n
        if seen >= q * total:
            return bound
    return math.inf


def p99(bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    return quantile(bounds, counts, 0.99)


class FreshnessWindow:
    """Freshness observations of this process since the last reading, per target, from its histogram."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._last: dict[str, list[float]] = {}
        self.p50s: dict[str, float | None] = {}
        """The median of the last reading's window, per target."""

    def p99s(self, targets: Sequence[str]) -> dict[str, float | None]:
        found: dict[str, float | None] = {}
        buckets = _buckets(self._metrics)
        for target in targets:
            bounds, cumulative = buckets.get(target, ([], []))
            previous = self._last.get(target) or [0.0] * len(cumulative)
            delta = [now - before for now, before in zip(cumulative, previous, strict=True)]
            self._last[target] = cumulative
            per_bucket = [d - (delta[i - 1] if i else 0.0) for i, d in enumerate(delta)]
            found[target] = p99(bounds[:-1], per_bucket) if per_bucket else None
            self.p50s[target] = quantile(bounds[:-1], per_bucket, 0.5) if per_bucket else None
        return found


def _buckets(metrics: Metrics) -> dict[str, tuple[list[float], list[float]]]:
    """Per target, the freshness histogram's bucket bounds and cumulative counts (``+Inf`` last)."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    for family in metrics.freshness.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds, counts = found.setdefault(sample.labels["target"], ([], []))
                bounds.append(float(sample.labels["le"]))
                counts.append(sample.value)
    return found


class Episodes:
    """Open episodes, shared by every sync process of the prefix through Redis."""

    def __init__(self, url: str, prefix: str, ttl_s: int = 3600) -> None:
        self._redis = redis.Redis.from_url(url)
        self._key = f"{prefix}:alerts:"
        self._prefix = prefix
        self._ttl = ttl_s

    async def open_now(self) -> frozenset[str]:
        return frozenset({k.decode()[len(self._key):] async for k in self._redis.scan_iter(f"{self._key}*")})

    async def start(self, name: str) -> bool:
        """Open episode ``name``; True only for the process that opened it (the one that alerts)."""
        return bool(await self._redis.set(self._key + name, b"1", nx=True, ex=self._ttl))

    async def keep(self, name: str) -> None:
        await self._redis.expire(self._key + name, self._ttl)

    async def end(self, name: str) -> None:
        await self._redis.delete(self._key + name)

    async def publish_freshness(self, target: str, p50: float, p99_s: float) -> None:
        """This process's latest freshness window for ``target``, for the console's overview."""
        await self._redis.set(f"{self._prefix}:freshness:{target}", json.dumps({"p50_s": p50, "p99_s": p99_s, "at": time.time()}),
                              ex=FRESHNESS_TTL_S)

    async def close(self) -> None:
        await self._redis.aclose()


async def read_freshness(url: str, prefix: str, targets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per target, the freshness a sync process last published (none after :data:`FRESHNESS_TTL_S`
    without sends)."""
    client = redis.Redis.from_url(url)
    try:
        values = await client.mget([f"{prefix}:freshness:{t}" for t in targets]) if targets else []
    finally:
        await client.aclose()
    return {t: json.loads(v) for t, v in zip(targets, values, strict=True) if v}


def send_alert(name: str, facts: Mapping[str, Any]) -> None:
    """One Sentry event for one episode, grouped by the alert's name."""
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("alert", name.split(":")[0])
        if "target" in facts:
            scope.set_tag("target", facts["target"])
        scope.set_context("alert", dict(facts))
        scope.fingerprint = ["mergetag-alert", name]
        sentry_sdk.capture_message(f"mergetag alert: {name}", level="warning")


async def check(episodes: Episodes, readings: Readings, bounds: Bounds) -> list[str]:
    """Open, keep and close episodes for ``readings``; returns the alerts this process sent."""
    open_now = await episodes.open_now()
    alerts = firing(readings, bounds, open_now)
    sent = []
    for name, facts in alerts.items():
        if name in open_now:
            await episodes.keep(name)
        elif await episodes.start(name):
            send_alert(name, facts)
            log.warning("alert %s: %s", name, facts)
            sent.append(name)
    for name in open_now - set(alerts):
        await episodes.end(name)
        log.info("alert %s over", name)
    return sent


async def watch(stop: asyncio.Event, *, amqp_url: str, prefix: str, episodes: Episodes, metrics: Metrics, guards: Mapping[str, Any],
                bounds: Bounds, interval: float) -> None:
    """Check every ``interval`` seconds until ``stop`` is set; survives any one failed check."""
    window = FreshnessWindow(metrics)
    not_closed: dict[str, float] = {}
    try:
        while not stop.is_set():
            try:
                depths = await asyncio.to_thread(admin.queue_depths, amqp_url, prefix)
                now = time.monotonic()
                for target, guard in guards.items():
                    if (await guard.state())["circuit"] == "closed":
                        not_closed.pop(target, None)
                    else:
                        not_closed.setdefault(target, now)
                readings = Readings(now=now, dead_letters=sum(depths.get(topology.xq_name(q), 0) for q in topology.all_queues(prefix)),
                                    not_closed_since=dict(not_closed), freshness_p99_s=window.p99s(list(guards)))
                for target, p99_s in readings.freshness_p99_s.items():
                    if p99_s is not None and (p50 := window.p50s.get(target)) is not None:
                        await episodes.publish_freshness(target, p50, p99_s)
                await check(episodes, readings, bounds)
            except Exception:  # the watch outlives one failed check; the log (and Sentry) see it
                log.exception("alert check failed; next in %.1fs", interval)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
    finally:
        await episodes.close()
        for guard in guards.values():
            await guard.close()
