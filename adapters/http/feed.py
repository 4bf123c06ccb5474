"""The send-time feed: ``GET /feed/v1/{target}/{ref}`` answers the merge fields mergetag would send to
that ESP target for one person, for an ESP that fetches data while a send runs (Braze Connected
Content, a Klaviyo web feed, Iterable and Customer.io data feeds).

``ref``: an email address, a phone number (E.164), a sender's id (``shopify:123``) or the profile id
(``p_…``). The answer: ``{"target", "hash", "fields"}`` (``hash``: the member's, the one the sync sends),
or with ``?format=flat`` the fields alone as one flat object; an ``ETag`` (``If-None-Match`` gives 304)
and ``Cache-Control: private, max-age=…``. Unknown and erased people are a 404 (``?defaults=1`` adds the
target's configured defaults, for a template to fall back on); never anyone else's data.

Per-target feed tokens (``MERGETAG_FEED_TOKENS``), in ``Authorization: Bearer``, ``X-Feed-Token`` or
``?token=``; each token is rate-limited across every feed process. Served from the Redis cache the
merge keeps (:mod:`adapters.redis.feed_cache`); a miss reads the store once and fills the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from adapters.esps.fields import defaults
from adapters.esps.registry import build_esp
from adapters.metrics import CONTENT_TYPE, Metrics
from adapters.redis.feed_cache import ERASED, HIT, NO_MEMBER, OVER_RATE, FeedCache, Found, entry
from adapters.settings import Settings
from adapters.store.profiles import ProfileStore
from schemas.events import normalize_email, normalize_phone
from schemas.profile import identity_key

log = logging.getLogger(__name__)

STORE = web.AppKey("feed_store", ProfileStore)
CACHE = web.AppKey("feed_cache", FeedCache)


class BadRef(ValueError):
    """Not an email, a phone number, a sender's id or a profile id."""


def plain_key(ref: str) -> str | None:
    """The identity key ``ref`` names (None for a profile id). Raises BadRef."""
    if ref.startswith("p_"):
        return None
    if "@" in ref:
        email = normalize_email(ref)
        if email:
            return identity_key("email", email)
    elif ref.startswith("+"):
        phone = normalize_phone(ref)
        if phone:
            return identity_key("phone", phone)
    elif ":" in ref and all(ref.partition(":")[::2]):
        return ref
    raise BadRef("ref: an email address, a phone number (+…), a sender's id (source:id) or a profile id (p_…)")


def create_feed_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The feed process's app (``mergetag feed``)."""
    metrics = metrics or Metrics()
    targets = settings.esp_targets()
    esps = {name: build_esp(name, target, offline=True) for name, target in targets.items()}
    fallbacks = {name: json.dumps({"error": "not_found", "defaults": defaults(t.fields)}, default=str).encode() for name, t in targets.items()}
    tokens = {hashlib.sha256(t.token.get_secret_value().encode()).digest(): (name, frozenset(t.targets), t.rate_per_s or settings.feed_rate_per_s)
              for name, t in settings.feed_tokens.items()}
    hasher = settings.hasher()
    max_age = settings.feed_max_age_s
    counted: dict[tuple[str, str], Any] = {}
    timed = {kind: metrics.feed_seconds.labels(kind) for kind in ("hit", "miss")}

    def count(target: str, result: str) -> None:
        child = counted.get((target, result))
        if child is None:
            child = counted[(target, result)] = metrics.feed_requests.labels(target, result)
        child.inc()

    def token_of(request: web.Request) -> tuple[str, frozenset[str], int] | None:
        given = request.headers.get("Authorization", "")
        given = given[7:] if given[:7].lower() == "bearer " else request.headers.get("X-Feed-Token") or request.query.get("token", "")
        return tokens.get(hashlib.sha256(given.encode()).digest()) if given else None

    def error(status: int, code: str, **headers: str) -> web.Response:
        return web.Response(status=status, body=b'{"error":"' + code.encode() + b'"}', content_type="application/json", headers=headers)

    def found(request: web.Request, target: str, fields: bytes, digest: str) -> web.Response:
        flat = request.query.get("format") == "flat"
        etag = f'"{digest[:32]}{"-flat" if flat else ""}"'
        headers = {"ETag": etag, "Cache-Control": f"private, max-age={max_age}"}
        if etag in request.headers.get("If-None-Match", ""):
            count(target, "not_modified")
            return web.Response(status=304, headers=headers)
        body = fields if flat else b'{"target":' + json.dumps(target).encode() + b',"hash":"' + digest.encode() + b'","fields":' + fields + b"}"
        return web.Response(body=body, content_type="application/json", headers=headers)

    def not_found(request: web.Request, target: str) -> web.Response:
        count(target, "not_found")
        body = fallbacks[target] if request.query.get("defaults") in ("1", "true") else b'{"error":"not_found"}'
        return web.Response(status=404, body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def from_store(request: web.Request, target: str, key: str | None, ref: str) -> Found:
        """A miss: read the store once, fill the cache (guarded by version), answer what was read."""
        store = request.app[STORE]
        loaded = await (store.load(ref) if key is None else store.find_by_keys([key]))
        if loaded is None:
            return Found(ERASED)  # nobody: the same answer as erased, and nothing to cache
        profile, stored = loaded
        gone = profile.erased is not None
        members = {t: (stored.state(t).member, stored.state(t).member_hash) for t in esps}
        read = entry(esps, profile.id, stored.version or 0, store.index(profile), members, gone=gone)
        if settings.feed_cache:
            await request.app[CACHE].put([read])
        if gone:
            return Found(ERASED)
        body = read.bodies.get(target)
        return Found(HIT, body[0], body[1]) if body else Found(NO_MEMBER)

    async def feed(request: web.Request) -> web.Response:
        started = time.perf_counter()
        target, ref = request.match_info["target"], request.match_info["ref"]
        holder = token_of(request)
        if holder is None:
            count(target if target in esps else "unknown", "unauthorized")
            return error(401, "unauthorized", **{"WWW-Authenticate": 'Bearer realm="mergetag-feed"'})
        name, allowed, rate = holder
        if target not in allowed or target not in esps:
            count("unknown" if target not in esps else target, "forbidden")
            return error(403 if target in esps else 404, "target_not_allowed" if target in esps else "unknown_target")
        try:
            key = plain_key(ref)
        except BadRef:
            return error(400, "invalid_ref")
        index = hasher.index_key(key) if key is not None else None
        got = Found(0)
        try:
            if settings.feed_cache:
                got = await request.app[CACHE].read(target, key=index, profile_id=None if index else ref, rate=(name, rate),
                                                    second=int(time.time()))
            else:
                got = await request.app[CACHE].read(target, rate=(name, rate), second=int(time.time()))
        except RedisError as exc:
            log.warning("feed cache unreadable: %s", type(exc).__name__)  # the store still answers, unlimited
        if got.status == OVER_RATE:
            count(target, "limited")
            return error(429, "rate_limited", **{"Retry-After": "1"})
        kind = "hit"
        if got.status == 0:
            kind = "miss"
            got = await from_store(request, target, key, ref)
        timed[kind].observe(time.perf_counter() - started)
        if got.status == HIT and got.fields is not None and got.hash is not None:
            count(target, kind)
            return found(request, target, got.fields, got.hash)
        return not_found(request, target)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def lifecycle(app: web.Application):  # noqa: ANN202
        app[STORE] = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, hasher)
        app[CACHE] = FeedCache(settings.redis_url, settings.queue_prefix, settings.feed_cache_ttl_s)  # the cache, and the rate limits
        yield
        await app[CACHE].close()
        await app[STORE].close()

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/feed/v1/{target}/{ref}", feed)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", health)
    return app

