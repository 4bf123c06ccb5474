"""Per-process resources of the workers, created lazily inside the worker's event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from adapters.coalesce import Coalescer
from adapters.esp.guard import EspGuard, account_id
from adapters.esp.mailchimp import Mailchimp
from adapters.geoip import GeoReader, open_reader
from adapters.settings import Settings, get_settings
from adapters.sources.registry import EventMapping, build_mappings
from adapters.store import ProfileStore, Quarantine
from workers.merge import MergeRules


@dataclass
class Runtime:
    settings: Settings
    store: ProfileStore
    esp: Mailchimp
    mappings: dict[str, EventMapping]
    quarantine: Quarantine
    rules: MergeRules
    geo: GeoReader | None
    blocked: frozenset[str]
    coalescer: Coalescer
    guard: EspGuard


_runtime: Runtime | None = None
_lock: asyncio.Lock | None = None


async def runtime() -> Runtime:
    """The process's store and ESP client; created once (under a lock), indexes ensured on first use."""
    global _runtime, _lock
    if _runtime is not None:
        return _runtime
    _lock = _lock or asyncio.Lock()
    async with _lock:
        if _runtime is None:
            _runtime = await _create()
    return _runtime


async def _create() -> Runtime:
    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    await store.ensure_indexes()
    esp = mailchimp_client(settings)
    quarantine = Quarantine(store.client, settings.mongodb_database)
    rules = MergeRules({trait: tuple(sources) for trait, sources in settings.trait_priority.items()})
    geo = open_reader(settings.geoip_database)
    return Runtime(settings, store, esp, build_mappings(settings), quarantine, rules, geo,
                   frozenset(settings.blocked_identifiers), Coalescer(settings.redis_url, settings.sync_coalesce_ms, settings.queue_prefix),
                   mailchimp_guard(settings))


def mailchimp_client(settings: Settings) -> Mailchimp:
    """The configured Mailchimp account's client (the sandbox's for local runs)."""
    return Mailchimp(settings.mailchimp_url, settings.mailchimp_api_key.get_secret_value(), settings.mailchimp_list_id,
                     settings.mailchimp_timeout_s)


def mailchimp_guard(settings: Settings) -> EspGuard:
    """The guard of the configured Mailchimp account, shared by every process through Redis."""
    return EspGuard(settings.redis_url, account_id("mailchimp", settings.mailchimp_api_key.get_secret_value()),
                    settings.mailchimp_max_connections, settings.esp_circuit_failures, settings.esp_circuit_open_s,
                    wait_s=settings.mailchimp_timeout_s, lease_ms=int(2 * settings.mailchimp_timeout_s * 1000) + 5_000,
                    prefix=settings.queue_prefix)


async def close_runtime() -> None:
    """Close the process's connections (called on worker shutdown, inside the event loop)."""
    global _runtime
    if _runtime is not None:
        rt, _runtime = _runtime, None
        await rt.esp.close()
        await rt.store.close()
        await rt.coalescer.close()
        await rt.guard.close()
