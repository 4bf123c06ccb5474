"""The operator's console, served by the admin process under ``/console``: server-rendered pages
(Jinja2 through aiohttp-jinja2, no front-end build, no external files), behind a login with an
operator token.

Pages: the overview (queues, dead letters and quarantine by reason, each target's circuit, rate,
pause and freshness; it refreshes itself), dead letters with filters, the replay plan (what a replay
would change at each target, before it runs), replays at a chosen rate with progress and cancel,
purge with confirmation, quarantine (list, one delivery with every error, redrive), profiles
(search, traits with their lineage, per-target sync state, the preview and a rendered template),
erasures (request one, each request's receipts per target), the event trail of an event or a
profile, and the audit log. Scopes as in the
JSON API: ``read`` to look, ``operate`` to replay, purge and redrive, ``erase`` to erase; values of
personal data are shown only to tokens with ``erase`` (who may handle a person's data), masked for
everyone else.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from adapters.esps.base import Esp
from adapters.esps.guard import EspGuard
from adapters.esps.templates import TemplateError
from adapters.http.console.replays import Replays
from adapters.http.console.session import COOKIE, LOGIN_CSRF, TTL_S, Session, Sessions
from adapters.redis.trail import Trail
from adapters.settings import Settings
from adapters.sources import operator
from adapters.sources.operator import request_erasure
from adapters.sources.registry import build_mappings
from adapters.store.audit import AuditLog
from adapters.store.erasures import ErasureReceipts, shown
from adapters.store.quarantine import Quarantine
from broker import topology
from broker.dead_letters import DeadLetters, Selection, UnknownQueue, parse_age
from broker.publisher import encode_message
from schemas.errors import BrokerUnavailable, EventInvalid
from workers.profiles import deliveries
from workers.sync import replay
from workers.sync.alerts import read_freshness
from workers.sync.preview import preview

SESSION = web.RequestKey("console_session", Session)
REPLAYS = web.AppKey("console_replays", Replays)
TEMPLATES = Path(__file__).parent / "templates"
FILTERS = ("queue", "actor", "reason", "profile", "target", "older_than", "newer_than")


def selection(query: Mapping[str, str]) -> Selection:
    """The dead letters a page's filters name (``ids``: a comma-separated list)."""
    ids = frozenset(i for i in query.get("ids", "").split(",") if i) or None
    age = {name: parse_age(query[name]) if query.get(name) else None for name in ("older_than", "newer_than")}
    return Selection(ids=ids, queue=query.get("queue") or None, actor=query.get("actor") or None, reason=query.get("reason") or None,
                     older_than_s=age["older_than"], newer_than_s=age["newer_than"], profile=query.get("profile") or None,
                     target=query.get("target") or None)


def setup_console(app: web.Application, settings: Settings, store_key: web.AppKey, publisher_key: web.AppKey,
                  guards: Mapping[str, EspGuard], read_broker: Any, clients: Callable[[], dict[str, Esp]],
                  find_profile: Callable[..., Any]) -> None:
    """Add the console's routes and templates to the admin ``app``; ``clients`` builds the targets'
    clients (unguarded) when a plan first compares fields."""
    esps: dict[str, Esp] = {}
    tokens = {name: (t.token.get_secret_value().encode(), frozenset(t.scopes)) for name, t in settings.operator_tokens().items()}
    sessions = Sessions(tokens)
    tools = DeadLetters(settings.amqp_url, settings.queue_prefix)
    trail = Trail(settings.redis_url, settings.queue_prefix, settings.trail_cap, settings.trail_ttl_s)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, app_key=aiohttp_jinja2.APP_KEY)
    env.globals["mask"] = replay.mask
    mappings = build_mappings(settings)

    def audit(request: web.Request) -> AuditLog:
        return AuditLog(request.app[store_key].client, settings.mongodb_database)

    def page(request: web.Request, page_template: str, **context: Any) -> web.Response:
        session = request.get(SESSION)
        return aiohttp_jinja2.render_template(page_template, request, {
            **context, "session": session, "csrf": sessions.csrf(session) if session else None,
            "can_operate": session is not None and "operate" in session.scopes,
            "personal": session is not None and "erase" in session.scopes})

    @web.middleware
    async def login_required(request: web.Request, handler):  # noqa: ANN001, ANN202
        if not request.path.startswith("/console") or request.path == "/console/login":
            return await handler(request)
        session = sessions.check(request.cookies.get(COOKIE))
        if session is None or "read" not in session.scopes:
            raise web.HTTPSeeOther("/console/login")
        request[SESSION] = session
        if request.method == "POST":
            form = await request.post()
            if not sessions.csrf_ok(session, form.get("csrf")):
                return web.json_response({"error": "csrf"}, status=403)
            route = request.match_info.route.name
            needed = "operate" if route in OPERATE else "erase" if route in ERASE else None
            if needed is not None and needed not in session.scopes:
                return web.json_response({"error": "forbidden", "detail": f"this token lacks the {needed} scope"}, status=403)
        return await handler(request)

    async def login_form(request: web.Request) -> web.Response:
        token = secrets.token_hex(16)
        response = page(request, "login.html", login_csrf=token, failed=request.query.get("failed") == "1")
        response.set_cookie(LOGIN_CSRF, token, httponly=True, secure=True, samesite="Strict", path="/console/login")
        return response

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        expected = request.cookies.get(LOGIN_CSRF)
        if not expected or not secrets.compare_digest(str(form.get("csrf", "")), expected):
            return web.json_response({"error": "csrf"}, status=403)
        cookie = sessions.login(str(form.get("token", "")))
        if cookie is None:
            raise web.HTTPSeeOther("/console/login?failed=1")
        response = web.HTTPSeeOther("/console")
        response.set_cookie(COOKIE, cookie, httponly=True, secure=True, samesite="Strict", max_age=TTL_S, path="/console")
        response.del_cookie(LOGIN_CSRF, path="/console/login")
        await audit(request).record(cookie.split("|")[0], "console.login", {}, {}, "ok")
        raise response

    async def logout(request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/console")
        raise response

    async def overview(request: web.Request) -> web.Response:
        depths, dead = await asyncio.to_thread(read_broker, settings)
        quarantine = await Quarantine(request.app[store_key].client, settings.mongodb_database).counts_by_reason()
        targets = {name: await guard.state() for name, guard in guards.items()}
        freshness = await read_freshness(settings.redis_url, settings.queue_prefix, list(guards))
        return page(request, "overview.html", depths=sorted(depths.items()), dead=sorted(dead.items()), quarantine=sorted(quarantine.items()),
                    targets=targets, freshness=freshness, rates=await trail.rates())

    def chosen(request: web.Request) -> tuple[Selection, list[Any]]:
        where = selection(request.query)
        return where, tools.list(where=where)

    async def dead_letters(request: web.Request) -> web.Response:
        try:
            where, letters = await asyncio.to_thread(chosen, request)
        except (UnknownQueue, ValueError) as exc:
            return web.json_response({"error": "invalid_filter", "detail": str(exc)}, status=400)
        return page(request, "dead_letters.html", letters=[d.summary() for d in letters], filters={f: request.query.get(f, "") for f in FILTERS},
                    query=request.query_string)

    async def plan(request: web.Request) -> web.Response:
        try:
            where, letters = await asyncio.to_thread(chosen, request)
        except (UnknownQueue, ValueError) as exc:
            return web.json_response({"error": "invalid_filter", "detail": str(exc)}, status=400)
        if not esps:
            esps.update(clients())
        found = await replay.field_changes(replay.plan(letters), letters, request.app[store_key], esps)
        return page(request, "plan.html", plan=found, ids=",".join(d.message_id for d in letters),
                    filters={f: request.query.get(f, "") for f in FILTERS if request.query.get(f)})

    async def start_replay(request: web.Request) -> web.Response:
        form = await request.post()
        ids = [i for i in str(form.get("ids", "")).split(",") if i]
        rate = _rate(form)

        async def step(chunk: list[str]) -> int:
            return len(await asyncio.to_thread(tools.replay, message_ids=set(chunk)))

        job = await request.app[REPLAYS].start("dead_letters", ids, rate, request[SESSION].token, {"ids": len(ids), **_filters(form)}, step)
        raise web.HTTPSeeOther(f"/console/replays/{job.id}")

    async def show_replay(request: web.Request) -> web.Response:
        job = request.app[REPLAYS].jobs.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound()
        return page(request, "replay.html", job=job)

    async def cancel_replay(request: web.Request) -> web.Response:
        job = request.app[REPLAYS].jobs.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound()
        job.cancel.set()
        raise web.HTTPSeeOther(f"/console/replays/{job.id}")

    async def purge(request: web.Request) -> web.Response:
        form = await request.post()
        ids = {i for i in str(form.get("ids", "")).split(",") if i}
        if not ids or form.get("confirm") != f"purge {len(ids)}":
            return page(request, "purge.html", ids=",".join(sorted(ids)), count=len(ids), filters=_filters(form))
        done = await asyncio.to_thread(tools.purge, message_ids=ids)
        await audit(request).record(request[SESSION].token, "dead_letters.purge", {"ids": len(ids), **_filters(form)},
                                    {"selected": len(ids), "purged": len(done)}, "finished")
        raise web.HTTPSeeOther("/console/dead-letters")

    async def dead_letter(request: web.Request) -> web.Response:
        found = await asyncio.to_thread(tools.show, request.match_info["id"])
        if found is None:
            raise web.HTTPNotFound()
        args = json.dumps({"args": found.message.args, "kwargs": found.message.kwargs}, indent=2, default=str)
        return page(request, "dead_letter.html", letter=found.summary(), options=sorted(found.message.options), payload=args)

    def quarantine_of(request: web.Request) -> Quarantine:
        return Quarantine(request.app[store_key].client, settings.mongodb_database)

    async def quarantined(request: web.Request) -> web.Response:
        store = quarantine_of(request)
        reason = request.query.get("reason") or None
        return page(request, "quarantine.html", reason=reason or "", counts=sorted((await store.counts_by_reason()).items()),
                    deliveries=await store.list(reason=reason, limit=200))

    async def quarantined_one(request: web.Request) -> web.Response:
        doc = await quarantine_of(request).get(request.match_info["key"])
        if doc is None:
            raise web.HTTPNotFound()
        delivery = Quarantine.delivery(doc)
        summary = {name: delivery.get(name) for name in ("source", "topic", "delivery_id", "received_at")}
        return page(request, "quarantined.html", doc=doc, summary=summary, payload=json.dumps(delivery.get("payload"), indent=2, default=str))

    async def redrive_plan(request: web.Request) -> web.Response:
        """What a redrive would do now: which deliveries pass today's validation, which would be back."""
        store = quarantine_of(request)
        reason = request.query.get("reason") or None
        docs = await store.list(reason=reason, limit=REDRIVE_LIMIT)
        found = deliveries.redrive_plan(((d["_id"], Quarantine.delivery(d)) for d in docs), mappings,
                                        frozenset(settings.blocked_identifiers))
        return page(request, "redrive_plan.html", plan=found, reason=reason or "", keys=",".join(d["_id"] for d in docs),
                    more=await store.count(reason=reason) - len(docs))

    async def redrive(request: web.Request) -> web.Response:
        form = await request.post()
        keys = [k for k in str(form.get("keys", "")).split(",") if k]
        queue = topology.events_queue(settings.queue_prefix)
        store = quarantine_of(request)

        async def publish(delivery: dict[str, Any]) -> None:
            message_id, body = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery,))
            await request.app[publisher_key].publish(queue, body, message_id)

        async def step(chunk: list[str]) -> int:
            report = await store.redrive(publish, chunk)
            if report.failed:
                raise BrokerUnavailable(f"{report.failed} of {len(chunk)} deliveries could not be published")
            return report.published

        selection = {"keys": len(keys), **({"reason": str(form["reason"])} if form.get("reason") else {})}
        job = await request.app[REPLAYS].start("quarantine", keys, _rate(form), request[SESSION].token, selection, step)
        raise web.HTTPSeeOther(f"/console/replays/{job.id}")

    async def profiles(request: web.Request) -> web.Response:
        ref = request.query.get("ref", "").strip()
        if not ref:
            return page(request, "profiles.html", ref="", missing=False)
        found = await find_profile(request.app[store_key], ref)
        if found is None:
            return page(request, "profiles.html", ref=ref, missing=True)
        raise web.HTTPSeeOther(f"/console/profiles/{found[0].id}")

    async def profile(request: web.Request) -> web.Response:
        found = await request.app[store_key].load(request.match_info["id"])
        if found is None:
            raise web.HTTPNotFound()
        person, stored = found
        template = request.query.get("template") or None
        previews = {}
        for target in settings.esp_targets():
            try:
                previews[target] = preview(person, stored, settings.esp_targets(), target, template)
            except TemplateError as exc:
                previews[target] = {"error": str(exc)}
        return page(request, "profile.html", profile=person, version=stored.version, sync=stored.esp, previews=previews, template=template or "")

    async def erasures(request: web.Request) -> web.Response:
        receipts = ErasureReceipts(request.app[store_key].client, settings.mongodb_database)
        return page(request, "erasures.html", receipts=[shown(r) for r in await receipts.recent()],
                    can_erase="erase" in request[SESSION].scopes)

    async def request_erase(request: web.Request) -> web.Response:
        form = await request.post()
        lists = {name: [v.strip() for v in str(form.get(name, "")).split(",") if v.strip()] for name in ("emails", "phones", "ids")}
        if not any(lists.values()):
            return web.json_response({"error": "selection_required"}, status=400)
        try:
            keys = operator.request_keys(lists["emails"], lists["phones"], lists["ids"])
        except EventInvalid as exc:
            return web.json_response({"error": "invalid_identifiers", "errors": exc.errors}, status=400)
        receipts = ErasureReceipts(request.app[store_key].client, settings.mongodb_database)
        receipt_id = await request_erasure(receipts, request.app[publisher_key], topology.events_queue(settings.queue_prefix),
                                           settings.hasher(), keys, f"console:{request[SESSION].token}")
        await audit(request).record(request[SESSION].token, "erasure.request", {k: len(v) for k, v in lists.items()}, {"requested": 1},
                                    receipt_id)
        raise web.HTTPSeeOther("/console/erasures")

    async def trail_of(request: web.Request) -> web.Response:
        """One profile's trail, or one event's: its delivery's (received, queued), its merges, and the
        sends of the profiles it merged into that followed."""
        subject = next(((kind, request.query[kind]) for kind in ("event", "profile", "delivery") if request.query.get(kind)), None)
        if subject is None:
            return page(request, "trail.html", subject=None, entries=[])
        kind, ref = subject
        entries = await trail.read(f"{kind}:{ref}")
        if kind == "event":
            merges = [e for e in entries if e.get("profile")]
            for delivery in sorted({e["delivery"] for e in merges if e.get("delivery")}):
                entries += await trail.read(f"delivery:{delivery}")
            for profile_id in sorted({e["profile"] for e in merges}):
                since = min(e["at"] for e in merges if e["profile"] == profile_id)
                entries += [e for e in await trail.read(f"profile:{profile_id}") if e["stage"] in SENT and e["at"] >= since]
        unique = {json.dumps(e, sort_keys=True): e for e in entries}
        return page(request, "trail.html", subject=f"{kind} {ref}", entries=sorted(unique.values(), key=lambda e: e["at"]))

    async def audit_log(request: web.Request) -> web.Response:
        return page(request, "audit.html", entries=await audit(request).entries())

    async def lifecycle(app: web.Application):  # noqa: ANN202
        app[REPLAYS] = Replays(AuditLog(app[store_key].client, settings.mongodb_database))
        yield
        await app[REPLAYS].close()
        await trail.close()
        for esp in esps.values():
            await esp.close()

    app.middlewares.append(login_required)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/console/login", login_form)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console", overview)
    app.router.add_get("/console/dead-letters", dead_letters)
    app.router.add_get("/console/dead-letters/plan", plan)
    app.router.add_get("/console/dead-letters/{id}", dead_letter)
    app.router.add_post("/console/dead-letters/replay", start_replay, name="console_replay")
    app.router.add_post("/console/dead-letters/purge", purge, name="console_purge")
    app.router.add_get("/console/replays/{id}", show_replay)
    app.router.add_post("/console/replays/{id}/cancel", cancel_replay, name="console_cancel")
    app.router.add_get("/console/audit", audit_log)
    app.router.add_get("/console/trail", trail_of)
    app.router.add_get("/console/quarantine", quarantined)
    app.router.add_get("/console/quarantine/{key}", quarantined_one)
    app.router.add_get("/console/quarantine/plan", redrive_plan)
    app.router.add_post("/console/quarantine/redrive", redrive, name="console_redrive")
    app.router.add_get("/console/profiles", profiles)
    app.router.add_get("/console/profiles/{id}", profile)
    app.router.add_get("/console/erasures", erasures)
    app.router.add_post("/console/erasures", request_erase, name="console_erase")


OPERATE = {"console_replay", "console_purge", "console_cancel", "console_redrive"}
ERASE = {"console_erase"}
SENT = {"synced", "refused"}


REDRIVE_LIMIT = 1000
"""Quarantined deliveries one console redrive takes (the CLI's ``--all`` takes every one)."""


def _rate(form: Mapping[str, Any]) -> float:
    """The rate an operator chose, per second, kept within 0.1–1000 (10 when it is not a number)."""
    try:
        return max(0.1, min(1000.0, float(str(form.get("rate", "10")))))
    except ValueError:
        return 10.0


def _filters(form: Mapping[str, Any]) -> dict[str, str]:
    return {f: str(form[f]) for f in FILTERS if form.get(f)}
