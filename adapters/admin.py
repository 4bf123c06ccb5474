"""The admin API: what operators and marketers ask of profiles, over HTTP.

``GET /admin/profiles/{ref}`` (a profile with its lineage) and
``GET|POST /admin/preview/{ref}`` (exactly what the sync would send to the ESP,
and a template rendered with it). ``ref`` is a profile id or an email. Every
request needs ``Authorization: Bearer <MERGETAG_ADMIN_TOKEN>``; without a token
configured the API refuses everything.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from adapters.esp.base import member_hash
from adapters.esp.registry import build_esp
from adapters.esp.targets import EspTarget
from adapters.esp.templates import TemplateError, render
from adapters.settings import Settings
from adapters.store import ProfileStore
from schemas.events import normalize_email
from schemas.profile import Profile, identity_key

STORE = web.AppKey("store", ProfileStore)


async def find(store: ProfileStore, ref: str) -> tuple[Profile, dict[str, Any]] | None:
    if ref.startswith("p_"):
        return await store.load(ref)
    return await store.find_by_keys([identity_key("email", normalize_email(ref) or "")])


def preview(profile: Profile, meta: dict[str, Any], targets: dict[str, EspTarget], esp: str = "mailchimp",
            template: str | None = None) -> dict[str, Any]:
    """What the sync would send to the ESP target ``esp`` for ``profile`` now, whether it would send it,
    and ``template`` rendered with it. No I/O. Raises ValueError for a target not configured."""
    if esp not in targets:
        raise ValueError(f"unknown ESP target {esp!r} (configured: {', '.join(targets)})")
    client = build_esp(esp, targets[esp], offline=True)
    member = client.member(profile)
    state = meta.get("esp", {}).get(esp, {})
    digest = member_hash(member) if member else None
    result: dict[str, Any] = {
        "esp": esp,
        "profile_id": profile.id,
        "member": member,
        "would_send": member is not None and digest != state.get("sent_hash"),
        "last_sent_at": state.get("sent_at"),
    }
    if template is not None:
        result["rendered"] = render(template, client.fields(member) if member else {})
    return result


def create_admin_app(settings: Settings, store: ProfileStore | None = None) -> web.Application:
    token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
    targets = settings.esp_targets()

    @web.middleware
    async def auth(request: web.Request, handler):  # noqa: ANN001, ANN202
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if token is None or scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def profile(request: web.Request) -> web.Response:
        found = await find(request.app[STORE], request.match_info["ref"])
        if found is None:
            return web.json_response({"error": "not_found"}, status=404)
        p, meta = found
        return web.json_response({**p.model_dump(mode="json"), "version": meta["version"]})

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

    async def lifecycle(app: web.Application):  # noqa: ANN202
        yield
        await app[STORE].close()

    app = web.Application(middlewares=[auth])
    app[STORE] = store or ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/admin/profiles/{ref}", profile)
    app.router.add_get("/admin/preview/{ref}", show_preview)
    app.router.add_post("/admin/preview/{ref}", show_preview)
    return app


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)

