"""The webhook receiver: verify, then publish with a broker confirm, then answer.

``POST /webhooks/{source}`` answers 202 only after RabbitMQ confirmed the
delivery into a durable queue, 503 with ``Retry-After`` when it cannot, and a
JSON body with a machine-readable ``error`` code for every refusal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone

from aiohttp import web

from adapters.sources.base import Rejected, Source
from adapters.sources.shopify import ShopifySource
from adapters.settings import Settings
from broker import topology
from broker.publisher import Publisher, encode_message
from schemas.errors import BrokerUnavailable

log = logging.getLogger(__name__)

PUBLISHER = web.AppKey("publisher", Publisher)


def error(status: int, code: str, detail: str = "", headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"error": code, **({"detail": detail} if detail else {})}
    return web.json_response(body, status=status, headers=headers)


def create_app(settings: Settings, sources: Mapping[str, Source] | None = None, publisher: Publisher | None = None) -> web.Application:
    """Build the receiver.

    Parameters:
      sources: source name -> Source; defaults to the configured ones.
      publisher: defaults to one on ``settings.amqp_url``.
    """
    sources = dict(sources) if sources is not None else {"shopify": ShopifySource(settings.shopify_secrets)}
    publisher = publisher or Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    queue = topology.events_queue(settings.queue_prefix)
    retry_after = {"Retry-After": str(settings.retry_after_s)}

    async def webhook(request: web.Request) -> web.Response:
        source = sources.get(request.match_info["source"])
        if source is None:
            return error(404, "unknown_source")
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            return error(413, "payload_too_large", f"limit is {settings.max_body_bytes} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, "payload_too_large", f"limit is {settings.max_body_bytes} bytes")
        try:
            source.verify(request.headers, body)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise Rejected(400, "malformed_json") from None
            if not isinstance(payload, dict):
                raise Rejected(400, "invalid_payload", "the body must be a JSON object")
            delivery = source.delivery(request.headers, payload, datetime.now(timezone.utc))
        except Rejected as exc:
            log.info("rejected %s delivery: %s", source.name, exc.code)
            return error(exc.status, exc.code, exc.detail)
        message_id, encoded = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery.model_dump(mode="json"),))
        try:
            await request.app[PUBLISHER].publish(queue, encoded, message_id)
        except BrokerUnavailable as exc:
            log.warning("cannot accept %s delivery: %s", source.name, exc.code)
            return error(503, exc.code, headers=retry_after)
        return web.json_response({"status": "accepted", "delivery_id": delivery.delivery_id, "message_id": message_id}, status=202)

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

    async def lifecycle(app: web.Application):  # noqa: ANN202
        try:
            await app[PUBLISHER].connect()
        except BrokerUnavailable:
            log.warning("RabbitMQ not reachable at start; will retry on demand")
        yield
        await app[PUBLISHER].close()

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_json_errors])
    app[PUBLISHER] = publisher
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/webhooks/{source}", webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@web.middleware
async def _json_errors(request: web.Request, handler):  # noqa: ANN001, ANN202
    """aiohttp's own refusals (404, 405) become JSON with a code, like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
            return error(exc.status, code, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
        raise
