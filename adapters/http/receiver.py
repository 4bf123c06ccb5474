"""The receiver: verify, de-duplicate, publish with a broker confirm, then answer.

``POST /webhooks/{source}`` and the tracking API ``POST /v1/{call}`` answer 2xx
only after RabbitMQ confirmed every new delivery of the request into a durable
queue, 503 with ``Retry-After`` when it cannot, and a JSON body with a
machine-readable ``error`` code for every refusal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timezone

from aiohttp import web

from adapters.http.openapi import document
from adapters.metrics import CONTENT_TYPE, Metrics
from adapters.redis.dedup import Dedup
from adapters.redis.rounds import Rounds
from adapters.redis.trail import Trail, delivery_subject
from adapters.settings import Settings
from adapters.sources.base import Inbound, Rejected, Source, check_names
from adapters.sources.registry import build_sources
from adapters.sources.tracking import NAME as TRACKING
from broker import topology
from broker.publisher import Publisher, publish_delivery
from schemas.delivery import Delivery
from schemas.errors import BrokerUnavailable

log = logging.getLogger(__name__)

PUBLISHER = web.AppKey("publisher", Publisher)
DEDUP = web.AppKey("dedup", Dedup)
METRICS = web.AppKey("metrics", Metrics)


def error(status: int, code: str, detail: str = "", headers: Mapping[str, str] | None = None) -> web.Response:
    # ``code`` and ``message`` too: what Segment-compatible SDKs read from an error body.
    body = {"error": code, "code": code, "message": detail or code, **({"detail": detail} if detail else {})}
    return web.json_response(body, status=status, headers=headers)


def create_app(
    settings: Settings,
    sources: Mapping[str, Source] | None = None,
    publisher: Publisher | None = None,
    dedup: Dedup | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """Build the receiver.

    Parameters:
      sources: source name -> Source; defaults to the configured ones.
      publisher: defaults to one on ``settings.amqp_url``.
      dedup: defaults to Redis at ``settings.redis_url``, namespaced by the queue prefix.
      metrics: the process's metrics, served at ``/metrics``.
    """
    sources = dict(sources) if sources is not None else build_sources(settings)
    publisher = publisher or Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    rounds = Rounds(settings.redis_url)  # the de-duplication and the trail share each round trip
    dedup = dedup or Dedup(rounds, settings.dedup_window_s, settings.queue_prefix)
    queue = topology.events_queue(settings.queue_prefix)
    retry_after = {"Retry-After": str(settings.retry_after_s)}
    metrics = metrics or Metrics()
    deliveries = metrics.deliveries
    trail = Trail(rounds, settings.queue_prefix, settings.trail_cap, settings.trail_ttl_s)

    def count(source: str, outcome: str, reason: str = "", n: int = 1) -> None:
        if n:
            deliveries.labels(source, outcome, reason).inc(n)

    async def receive(request: web.Request, name: str) -> web.Response:
        source = sources.get(name)
        if source is None:
            count("unknown", "rejected", "unknown_source")
            return error(404, "unknown_source")
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            return reject(name, Rejected(413, "payload_too_large", f"limit is {settings.max_body_bytes} bytes"))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return reject(name, Rejected(413, "payload_too_large", f"limit is {settings.max_body_bytes} bytes"))
        inbound = Inbound(method=request.method, url=str(request.url), path=request.path, headers=request.headers,
                          body=body, received_at=datetime.now(timezone.utc), query=dict(request.query))
        try:
            deliveries = source.accept(inbound)
            check_names(deliveries)
        except Rejected as exc:
            return reject(name, exc)
        except (ValueError, UnicodeError, RecursionError, TypeError):
            # Undecodable headers, absurdly nested JSON...: the request is malformed, whoever sent it.
            return reject(name, Rejected(400, "malformed_request"))
        keys = [d.dedup_key for d in deliveries if d.dedup_key]
        seen = await request.app[DEDUP].seen(keys)
        fresh = [d for d in deliveries if d.dedup_key not in seen]
        pub = request.app[PUBLISHER]
        results = await _publish(pub, queue, fresh)
        confirmed = [(d, r) for d, r in zip(fresh, results, strict=True) if isinstance(r, str)]
        request.app[DEDUP].remember([d.dedup_key for d, _ in confirmed if d.dedup_key])
        for d, message_id in confirmed:
            trail.add([delivery_subject(d.source, d.delivery_id)], "queued", source=d.source, delivery=d.delivery_id,
                      message_id=message_id, received_at=d.received_at)
        if len(confirmed) < len(fresh):
            failure = next(r for r in results if not isinstance(r, str))
            if not isinstance(failure, BrokerUnavailable):
                raise failure
            count(name, "rejected", failure.code, len(fresh) - len(confirmed))
            log.warning("cannot accept %s deliveries: %s", name, failure.code)
            return error(503, failure.code, headers=retry_after)
        count(name, "accepted", n=len(confirmed))
        if confirmed:
            trail.tally(name, len(confirmed))
        count(name, "duplicate", n=len(deliveries) - len(fresh))
        if not deliveries:
            count(name, "ignored")
        status, reply = source.reply([message_id for _, message_id in confirmed], len(deliveries) - len(fresh))
        return web.json_response(reply, status=status)

    def reject(name: str, exc: Rejected) -> web.Response:
        count(name, "rejected", exc.code)
        log.info("rejected %s delivery: %s", name, exc.code)
        return error(exc.status, exc.code, exc.detail)

    async def webhook(request: web.Request) -> web.Response:
        return await receive(request, request.match_info["source"])

    async def tracking(request: web.Request) -> web.Response:
        return await receive(request, TRACKING)

    async def webhook_check(request: web.Request) -> web.Response:
        """Senders (Mailchimp, Mandrill) probe the URL with GET or HEAD before they use it."""
        if request.match_info["source"] not in sources:
            return error(404, "unknown_source")
        return web.json_response({"status": "ok"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        pub = request.app[PUBLISHER]
        if not pub.ready:
            try:
                await pub.connect()
            except BrokerUnavailable as exc:
                return error(503, exc.code, headers=retry_after)
        return web.json_response({"status": "ready"})

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document(sorted(sources)))

    async def lifecycle(app: web.Application):  # noqa: ANN202
        try:
            await app[PUBLISHER].connect()
        except BrokerUnavailable:
            log.warning("RabbitMQ not reachable at start; will retry on demand")
        yield
        await app[PUBLISHER].close()
        await app[DEDUP].close()
        await trail.close()
        await rounds.close()

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_json_errors])
    app[PUBLISHER] = publisher
    app[DEDUP] = dedup
    app[METRICS] = metrics
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/webhooks/{source}", webhook)
    app.router.add_get("/webhooks/{source}", webhook_check)
    app.router.add_post("/v1/{call}", tracking)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/openapi.json", openapi)
    return app


async def _publish(publisher: Publisher, queue: str, deliveries: list[Delivery]) -> list[str | BaseException]:
    """Each delivery's message id once confirmed, or its failure; a lone delivery (the usual request)
    without a task of its own."""
    if len(deliveries) == 1:
        try:
            return [await publish_delivery(publisher, queue, deliveries[0])]
        except Exception as exc:  # the caller tells BrokerUnavailable from a bug, as for several
            return [exc]
    return await asyncio.gather(*(publish_delivery(publisher, queue, d) for d in deliveries), return_exceptions=True)


@web.middleware
async def _json_errors(request: web.Request, handler):  # noqa: ANN001, ANN202
    """aiohttp's own refusals (404, 405, 413) become JSON with a code, like ours; so does a bug (500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
            return error(exc.status, code, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error(500, "internal_error")
