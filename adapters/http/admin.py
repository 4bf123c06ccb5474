"""The admin API: what operators and marketers ask of profiles, over HTTP.

``GET /admin/profiles/{ref}`` (a profile with its lineage), ``GET|POST /admin/preview/{ref}``
(exactly what the sync would send to the ESP, and a template rendered with it), ``POST
/admin/preview-scenarios?esp=…`` (a template, the body, rendered for edge-case profiles), ``POST
/admin/erasures`` (erase a person) and ``GET /admin/erasures/{id}`` (its receipt). ``ref`` is a
profile id or an email. Every request needs ``Authorization: Bearer <token>``: one of the named
tokens of ``MERGETAG_ADMIN_TOKENS`` (or ``MERGETAG_ADMIN_TOKEN``, which may do everything), with
the scope the route needs — ``read`` to look, ``erase`` to erase. Without a token configured the
API refuses everything. ``GET /metrics`` (Prometheus) needs no token: it names queues, reasons and
targets, never a person.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import Counter
from typing import Any

from aiohttp import web

from adapters.esps.registry import build_guard, clients
from adapters.esps.templates import TemplateError
from adapters.http.console import setup_console
from adapters.metrics import CONTENT_TYPE, Metrics
from adapters.settings import Settings
from adapters.sources import operator
from adapters.sources.operator import request_erasure
from adapters.store.erasures import ErasureReceipts, shown
from adapters.store.profiles import ProfileStore
from adapters.store.quarantine import Quarantine
from broker import admin as broker_admin
from broker import topology
from broker.dead_letters import DeadLetters
from broker.publisher import Publisher
from schemas.errors import BrokerUnavailable, EventInvalid
from schemas.events import normalize_email
from schemas.profile import Profile, identity_key
from schemas.sync import Stored
from workers.sync import scenarios
from workers.sync.preview import preview

DEAD_LETTER_SCAN_LIMIT = 1_000
"""Dead letters are counted by reason only while there are at most this many (reading a reason means
fetching the message); past it, by queue alone, under reason ``unscanned``."""
STORE = web.AppKey("store", ProfileStore)
PUBLISHER = web.AppKey("publisher", Publisher)
CALLER = web.RequestKey("caller", str)
# The scope each route needs (method, route name).
NEEDS = {"erasure_request": "erase"}


async def find(store: ProfileStore, ref: str) -> tuple[Profile, Stored] | None:
    if ref.startswith("p_"):
        return await store.load(ref)
    return await store.find_by_keys([identity_key("email", normalize_email(ref) or "")])


def read_broker(settings: Settings) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Queue depths, and dead letters per (canonical queue, reason): blocking, for a thread."""
    depths = broker_admin.queue_depths(settings.amqp_url, settings.queue_prefix)
    dead = {queue: depths.get(topology.xq_name(queue), 0) for queue in topology.all_queues(settings.queue_prefix)}
    if sum(dead.values()) > DEAD_LETTER_SCAN_LIMIT:
        return depths, {(queue, "unscanned"): n for queue, n in dead.items() if n}
    return depths, dict(Counter((letter.queue, letter.code) for letter in DeadLetters(settings.amqp_url, settings.queue_prefix).list()))


def create_admin_app(settings: Settings, store: ProfileStore | None = None, metrics: Metrics | None = None) -> web.Application:
    """The admin API; ``/metrics`` (no token: it names no person) reads the broker, the store and every
    target's guard when scraped."""
    tokens = [(name, t.token.get_secret_value().encode(), frozenset(t.scopes)) for name, t in settings.operator_tokens().items()]
    targets = settings.esp_targets()
    metrics = metrics or Metrics()
    guards = {name: build_guard(target, settings) for name, target in targets.items()}

    async def scrape(request: web.Request) -> web.Response:
        depths, dead = await asyncio.to_thread(read_broker, settings)
        Metrics.replace(metrics.queue_depth, {(queue,): n for queue, n in depths.items()})
        Metrics.replace(metrics.dead_letters, {key: n for key, n in dead.items()})
        quarantine = Quarantine(request.app[STORE].client, settings.mongodb_database)
        Metrics.replace(metrics.quarantined, {(reason,): n for reason, n in (await quarantine.counts_by_reason()).items()})
        metrics.guard_states({name: await guard.state() for name, guard in guards.items()})
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    @web.middleware
    async def auth(request: web.Request, handler):  # noqa: ANN001, ANN202
        if request.path == "/metrics" or request.path.startswith("/console"):
            return await handler(request)  # the console logs in with a cookie of its own
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Every token is compared, in constant time each, whichever matches.
        matches = [(name, scopes) for name, token, scopes in tokens if hmac.compare_digest(given.encode(), token)]
        if scheme.lower() != "bearer" or not matches:
            return web.json_response({"error": "unauthorized"}, status=401)
        name, scopes = matches[0]
        needed = NEEDS.get(request.match_info.route.name or "", "read")
        if needed not in scopes:
            return web.json_response({"error": "forbidden", "detail": f"this token lacks the {needed} scope"}, status=403)
        request[CALLER] = name
        return await handler(request)

    async def profile(request: web.Request) -> web.Response:
        found = await find(request.app[STORE], request.match_info["ref"])
        if found is None:
            return web.json_response({"error": "not_found"}, status=404)
        p, meta = found
        return web.json_response({**p.model_dump(mode="json"), "version": meta.version})

    async def show_preview(request: web.Request) -> web.Response:
        found = await find(request.app[STORE], request.match_info["ref"])
        if found is None:
            return web.json_response({"error": "not_found"}, status=404)
        template = (await request.text()) if request.method == "POST" else request.query.get("template")
        try:
            body = preview(*found, targets, request.query.get("esp", "mailchimp"), template)
        except TemplateError as exc:
            return web.json_response({"error": "invalid_template", "detail": str(exc)}, status=400)
        except ValueError as exc:
            return web.json_response({"error": "unknown_esp", "detail": str(exc)}, status=400)
        return web.json_response(body, dumps=_dumps)

    async def preview_scenarios(request: web.Request) -> web.Response:
        """The template (body) rendered for the edge-case profiles of ``workers/sync/scenarios.py``."""
        try:
            body = scenarios.report(await request.text(), targets, request.query.get("esp", "mailchimp"))
        except TemplateError as exc:
            return web.json_response({"error": "invalid_template", "detail": str(exc)}, status=400)
        except ValueError as exc:
            return web.json_response({"error": "unknown_esp", "detail": str(exc)}, status=400)
        return web.json_response(body, dumps=_dumps)

    async def request_erase(request: web.Request) -> web.Response:
        """``{"emails": [...], "phones": [...], "ids": ["shopify:123"]}``: 202 with the receipt id once queued."""
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "malformed_json"}, status=400)
        lists = {name: body.get(name) or [] for name in ("emails", "phones", "ids")} if isinstance(body, dict) else {}
        if not lists or not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists.values()):
            return web.json_response({"error": "invalid_payload", "detail": "emails, phones and ids are lists of strings"}, status=400)
        if not any(lists.values()):
            return web.json_response({"error": "selection_required", "detail": "name the person: emails, phones or ids"}, status=400)
        try:
            keys = operator.request_keys(lists["emails"], lists["phones"], lists["ids"])
        except EventInvalid as exc:
            return web.json_response({"error": "invalid_identifiers", "errors": exc.errors}, status=400)
        try:
            receipt_id = await request_erasure(ErasureReceipts(request.app[STORE].client, settings.mongodb_database),
                                               request.app[PUBLISHER], topology.events_queue(settings.queue_prefix),
                                               settings.hasher(), keys, f"admin:{request[CALLER]}")
        except BrokerUnavailable as exc:
            return web.json_response({"error": exc.code}, status=503, headers={"Retry-After": str(settings.retry_after_s)})
        return web.json_response({"id": receipt_id, "status": "requested", "receipt": f"/admin/erasures/{receipt_id}"}, status=202)

    async def show_erasure(request: web.Request) -> web.Response:
        receipt = await ErasureReceipts(request.app[STORE].client, settings.mongodb_database).get(request.match_info["id"])
        if receipt is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(shown(receipt))

    async def lifecycle(app: web.Application):  # noqa: ANN202
        yield
        await app[PUBLISHER].close()
        await app[STORE].close()
        for guard in guards.values():
            await guard.close()

    app = web.Application(middlewares=[auth])
    app[STORE] = store or ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, settings.hasher())
    app[PUBLISHER] = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/admin/profiles/{ref}", profile)
    app.router.add_post("/admin/preview-scenarios", preview_scenarios)
    app.router.add_get("/admin/preview/{ref}", show_preview)
    app.router.add_post("/admin/preview/{ref}", show_preview)
    app.router.add_post("/admin/erasures", request_erase, name="erasure_request")
    app.router.add_get("/admin/erasures/{id}", show_erasure)
    app.router.add_get("/metrics", scrape)
    setup_console(app, settings, STORE, PUBLISHER, guards, read_broker, lambda: clients(settings), find)
    return app


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)
