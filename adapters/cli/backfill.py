"""``mergetag pull``: pull a REST source now, through the webhooks' path, with progress and a summary.

With ``--wait`` the command then follows the pipeline until what it published is merged and
synced, and reports what that cost. Done: no message ready in the events queue or its delay
queue (over AMQP) and no profile pending for any configured ESP target (the outbox) — a merge
marks its profile pending in the same write, so nothing merged is left unsent; sync messages
still queued then find their profile sent and do nothing. The cost: the store server's
``serverStatus`` request counter and the ESP guards' request counts (Redis). It reads MongoDB
only once the events queue is empty, so its own requests barely touch the count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from dramatiq.common import xq_name
from pika.exceptions import AMQPError
from pymongo import AsyncMongoClient, monitoring
from pymongo.errors import OperationFailure, PyMongoError
from redis.exceptions import RedisError

from adapters.cli.summary import Quiet, Tally, esp_requests, per_second, pull_summary, render, still_merging, store_requests
from adapters.settings import Settings, get_settings

if TYPE_CHECKING:
    from adapters.cli.progress import Progress

POLL_S = 1.0


class _Counted(monitoring.CommandListener):
    """Counts the commands of the command's own client, to take them out of the server's count."""

    def __init__(self) -> None:
        self.commands = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass
class Follower:
    """Readings of the pipeline of one queue prefix: a baseline before the pull, then until done."""

    settings: Settings
    client: AsyncMongoClient
    counted: _Counted
    guards: dict[str, Any]
    accounts: dict[str, str]
    batch_limits: dict[str, int]
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    requests_before: int | None = None
    esp_before: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_before: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def start(cls, settings: Settings) -> Follower:
        from adapters.esps.guard import account_id
        from adapters.esps.registry import build_guard, descriptor

        counted = _Counted()
        client = AsyncMongoClient(settings.mongodb_uri, tz_aware=True, event_listeners=[counted])
        targets = settings.esp_targets()
        guards = {account_id(t.kind, t.key()): build_guard(t, settings) for t in targets.values()}
        follower = cls(settings, client, counted, guards, {name: account_id(t.kind, t.key()) for name, t in targets.items()},
                       {name: descriptor(t.kind).batch_limit for name, t in targets.items()})
        follower.requests_before = await follower._server_requests()
        follower.esp_before = await follower._esp_requests()
        follower.dead_before = await follower._dead_letters(await follower._depths())
        return follower

    async def follow(self, progress: Progress, events: int, started: float, deadline_s: float, settle_s: float) -> dict[str, Any]:
        """Poll until no event is queued and no profile pending for ``settle_s`` in a row, or ``deadline_s`` passed."""
        from adapters.store.outbox import Outbox
        from broker import topology

        outbox, quiet = Outbox(self.client, self.settings.mongodb_database), Quiet(settle_s)
        events_queue = topology.events_queue(self.settings.queue_prefix)
        deadline = time.monotonic() + deadline_s
        depths: dict[str, int] = {}
        queued: dict[str, int] = {}
        pending: dict[str, int | None] = {name: None for name in self.accounts}
        while True:
            try:
                depths = await self._depths()
                queued = {name: n for name, n in depths.items() if n and not name.endswith(".XQ")}
                merging = still_merging(queued, events_queue)
                pending = {name: None if merging else await outbox.count_pending(name, cap=10_000_000) for name in self.accounts}
                # Sync messages may be left once nothing is pending: they find their profile sent and do nothing.
                idle = not merging and not any(pending.values())
                if idle and quiet.since is None:
                    # The counts as the work looked done: the idle processes' own polling while it settles is not the backfill's.
                    counts = await self._counts()
                progress.status(", ".join([f"{n:,} queued in {q}" for q, n in queued.items()]
                                          + [f"{n:,} pending for {t}" for t, n in pending.items() if n]) or "settling")
            except (AMQPError, PyMongoError, RedisError, OSError) as exc:  # a reading that failed proves nothing: read again
                idle = False
                progress.status(f"could not read the pipeline ({type(exc).__name__}), reading again")
            if quiet.observe(idle, time.monotonic()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        drained = quiet.since is not None and time.monotonic() - quiet.since >= settle_s
        done = quiet.since if drained else time.monotonic()
        if not drained:
            counts = await self._counts()
        after, own, esp_after = counts
        synced = {name: await outbox.count_sent_since(name, self.started_at) for name in self.accounts}
        return {
            "drained": drained, "settle_s": settle_s, "elapsed_s": round(done - started, 2), "events_per_s": per_second(events, done - started),
            "queued": queued, "pending": pending,
            "dead_letters": {q: n - self.dead_before.get(q, 0) for q, n in (await self._dead_letters(depths)).items()},
            "store": store_requests(self.requests_before, after, own, events),
            "esp": esp_requests(self.accounts, self.batch_limits, synced, self.esp_before, esp_after),
        }

    async def _depths(self) -> dict[str, int]:
        from broker import admin

        return await asyncio.to_thread(admin.queue_depths, self.settings.amqp_url, self.settings.queue_prefix)

    async def _dead_letters(self, depths: dict[str, int]) -> dict[str, int]:
        from broker import topology

        return {q: depths.get(xq_name(q), 0) for q in topology.all_queues(self.settings.queue_prefix)}

    async def _counts(self) -> tuple[int | None, int, dict[str, dict[str, int]]]:
        """The server's request count, how many of them were this command's own since the baseline
        (which that reading already held), and the ESP accounts' request counts."""
        requests = await self._server_requests()
        return requests, self.counted.commands - 1, await self._esp_requests()

    async def _server_requests(self) -> int | None:
        try:
            return int((await self.client.admin.command("serverStatus"))["network"]["numRequests"])
        except (OperationFailure, KeyError):  # no serverStatus right, or a server that does not count
            return None

    async def _esp_requests(self) -> dict[str, dict[str, int]]:
        return {account: await guard.requests() for account, guard in self.guards.items()}

    async def close(self) -> None:
        for guard in self.guards.values():
            await guard.close()
        await self.client.close()


async def backfill(resources: list[str], since: str | None, progress: Progress, *, wait: bool = False,
                   deadline_s: float = 3600.0, settle_s: float = 5.0) -> dict[str, Any]:
    """Pull ``resources`` once, publishing every record through the receiver's confirm path; the summary."""
    from adapters.cli.run import shopify_puller
    from broker import topology
    from broker.publisher import Publisher

    settings = get_settings()
    publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    puller, store = shopify_puller(settings, publisher)
    follower = None
    try:
        follower = await Follower.start(settings) if wait else None
        progress.tally.started = time.monotonic()  # after the baseline: the summary times the pull and the pipeline only
        checkpoints = {}
        with progress:
            for resource in resources:
                progress.begin(resource)
                checkpoints[resource] = (await puller.pull(resource, since, on_page=progress.page)).since
                progress.end(resource)
            summary = {"source": "shopify", "since": since, **pull_summary(progress.tally, time.monotonic(), checkpoints)}
            if follower is not None:
                summary["wait"] = await follower.follow(progress, progress.tally.total, progress.tally.started, deadline_s, settle_s)
        return summary
    finally:
        if follower is not None:
            await follower.close()
        await publisher.close()
        await store.close()


def cmd_pull(args: argparse.Namespace) -> int:
    from adapters.cli.progress import Progress

    resources = ["customers", "orders"] if args.resource == "all" else [args.resource]
    progress = Progress(Tally(time.monotonic()), every=args.progress_every)
    summary = asyncio.run(backfill(resources, args.since, progress, wait=args.wait, deadline_s=args.deadline, settle_s=args.settle))
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print("\n".join(render(summary)), flush=True)
    return 1 if args.wait and not summary["wait"]["drained"] else 0
