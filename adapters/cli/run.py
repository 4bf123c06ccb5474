"""The long-running processes: receiver, workers, sync, pollers and the admin API."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import threading
from typing import Any

from adapters.settings import Settings, get_settings

DELAY_POLL_MS = 20
"""How late a delayed message (a coalesced sync) may run: how often the delay queues' consumers wake."""


GC_THRESHOLDS = (50_000, 20, 100)
"""The collector's thresholds in the HTTP processes: a request allocates hundreds of short-lived
objects, and at the default (700) the receiver ran a collection every 30 requests and a full one
every few thousand (16 µs a request, and the p99 went from 16 to 40 ms)."""


def _settle_heap() -> None:
    """What startup built (modules, models, the app) is frozen out of every collection; the rest is
    collected rarely: nearly all of it is freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve_http(component: str, create: Any, host: str, port: int) -> int:
    """Run the aiohttp app ``create(settings)`` of ``component`` (Sentry first) until stopped, on uvloop:
    its transports cost the receiver's many small socket reads and writes (HTTP, AMQP, Redis) less CPU."""
    import uvloop
    from aiohttp import web

    from adapters.sentry import init_sentry

    settings = get_settings()
    init_sentry(settings, component)
    app = create(settings)
    _settle_heap()
    web.run_app(app, host=host, port=port, access_log=None, loop=uvloop.new_event_loop(),
                print=lambda *_: logging.getLogger("mergetag").info("%s on %s:%s", component, host, port))
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from adapters.http.receiver import create_app

    settings = get_settings()
    return _serve_http("receiver", create_app, args.host or settings.receiver_host, args.port or settings.receiver_port)


def _serve(queues: list[str], sweep: bool, component: str, threads: int, metrics_port: int) -> int:
    """Consume ``queues`` with a Dramatiq worker of ``threads`` threads until SIGTERM/SIGINT; optionally
    run the sweeper. Prometheus scrapes ``metrics_port`` (0: not served)."""
    from adapters.metrics import Metrics
    from broker.setup import Worker
    from workers import app

    settings = get_settings()
    metrics = Metrics()
    workers = app.build(settings, component=component, metrics=metrics)
    server = metrics.serve(metrics_port) if metrics_port else None
    # A short poll of the delay queues: delayed messages (coalesced syncs, abandonment checks) run close to their time.
    worker = Worker(workers.broker, queues=set(queues), worker_threads=threads, worker_timeout=100, delay_poll_ms=DELAY_POLL_MS)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    logging.getLogger("mergetag").info("consuming %s", ", ".join(queues))

    loop = asyncio.new_event_loop()
    sweep_stop = asyncio.Event()
    if sweep:
        async def background() -> None:
            await asyncio.gather(workers.sweeper(sweep_stop), workers.alerts(sweep_stop))

        threading.Thread(target=loop.run_until_complete, args=(background(),), daemon=True, name="sweeper").start()
    stop.wait()
    if sweep:
        loop.call_soon_threadsafe(sweep_stop.set)
    worker.stop(timeout=10_000)
    workers.broker.close()
    if server is not None:
        server.shutdown()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from broker import topology

    settings = get_settings()
    prefix = settings.queue_prefix
    queues = {"events": [topology.events_queue(prefix)], "sync": topology.sync_queues(prefix), "all": topology.all_queues(prefix)}
    # The merge's threads mostly wait for their round's write: many in flight make big rounds.
    threads = settings.events_worker_threads if args.queues == "events" else settings.worker_threads
    return _serve(queues[args.queues], sweep=False, component="worker", threads=threads, metrics_port=settings.worker_metrics_port)


async def check_fields() -> dict[str, list[str]]:
    """Each ESP target's field mapping against the ESP's own field definitions."""
    from adapters.esps.registry import clients

    found = {}
    for name, esp in clients(get_settings()).items():
        try:
            found[name] = await esp.field_problems()
        finally:
            await esp.close()
    return found


def cmd_sync(args: argparse.Namespace) -> int:
    from broker import topology
    from schemas.errors import MergetagError

    log = logging.getLogger("mergetag")
    try:
        for esp, problems in asyncio.run(check_fields()).items():
            for problem in problems:
                # Loud, not fatal: members without the field still sync; those with it are refused and dead-lettered.
                log.error("field mapping does not fit ESP target %s: %s", esp, problem)
    except MergetagError as exc:
        log.error("could not check the field mappings against the ESPs: %s", exc.code)
    settings = get_settings()
    return _serve(topology.sync_queues(settings.queue_prefix), sweep=True, component="sync", threads=settings.worker_threads,
                  metrics_port=settings.sync_metrics_port)


def shopify_puller(settings: Settings, publisher: Any) -> tuple[Any, Any]:
    """The Shopify puller publishing through ``publisher`` (the receiver's confirm path), and the store
    its checkpoints live in (the caller closes it)."""
    from adapters.sources.shopify.pull import ShopifyPuller
    from adapters.store.checkpoints import Checkpoints
    from adapters.store.profiles import ProfileStore
    from broker import topology
    from broker.publisher import publish_delivery

    if not settings.shopify_admin_url or settings.shopify_admin_token is None:
        raise SystemExit("set MERGETAG_SHOPIFY_ADMIN_URL and MERGETAG_SHOPIFY_ADMIN_TOKEN")
    queue = topology.events_queue(settings.queue_prefix)
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    puller = ShopifyPuller(settings.shopify_admin_url, settings.shopify_admin_token.get_secret_value(),
                           publish=lambda d: publish_delivery(publisher, queue, d),
                           checkpoints=Checkpoints(store.client, settings.mongodb_database), page_size=settings.shopify_pull_page_size)
    return puller, store


async def _poll(resources: list[str], every: float) -> None:
    """Pull on a schedule, each run from the stored checkpoint; one JSON line per resource and run."""
    from broker import topology
    from broker.publisher import Publisher

    settings = get_settings()
    publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    puller, store = shopify_puller(settings, publisher)
    try:
        while True:
            for resource in resources:
                try:
                    result = await puller.pull(resource)
                    print(json.dumps({"resource": result.resource, "pages": result.pages, "records": result.records,
                                      "checkpoint": result.since}), flush=True)
                except Exception:  # a scheduled poller outlives one failed pull; the next run resumes from the checkpoint
                    logging.getLogger("mergetag").exception("pull of %s failed", resource)
            await asyncio.sleep(every)
    finally:
        await publisher.close()
        await store.close()


def cmd_poller(args: argparse.Namespace) -> int:
    asyncio.run(_poll(["customers", "orders"], get_settings().shopify_pull_interval_s))
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    from aiohttp import web

    from adapters.http.admin import create_admin_app

    settings = get_settings()
    web.run_app(create_admin_app(settings), host=settings.admin_host, port=args.port or settings.admin_port,
                access_log=None, print=lambda *_: None)
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    from adapters.http.feed import create_feed_app

    settings = get_settings()
    return _serve_http("feed", create_feed_app, args.host or settings.feed_host, args.port or settings.feed_port)
