"""Profiles and their ESP state: show, preview, reconcile, erase, and the ESP accounts' health."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

from adapters.cli.run import check_fields
from adapters.settings import get_settings


async def _profile(args: argparse.Namespace) -> int:
    from adapters.http.admin import find
    from adapters.store.profiles import ProfileStore

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, settings.hasher())
    try:
        if args.action == "quality":
            print(json.dumps(await store.flag_counts(), indent=2))
            return 0
        if args.action == "rekey":
            print(json.dumps({"rekeyed": await store.rekey()}))
            return 0
        found = await find(store, args.ref)
        if found is None:
            print(json.dumps({"error": "not_found"}))
            return 1
        profile, meta = found
        doc = profile.model_dump(mode="json")
        # Lineage first: every trait with the source, event and time it came from.
        print(json.dumps({"id": doc.pop("id"), "email": doc.pop("email"), "version": meta.version,
                          "traits": doc.pop("traits"), **doc, "esp": {esp: state.model_dump(exclude_unset=True) for esp, state in meta.esp.items()}}, indent=2, default=str))
        return 0
    finally:
        await store.close()


def cmd_profile(args: argparse.Namespace) -> int:
    return asyncio.run(_profile(args))


async def _preview(args: argparse.Namespace) -> int:
    from adapters.http.admin import find
    from adapters.store.profiles import ProfileStore
    from workers.sync.preview import preview

    settings = get_settings()
    if args.scenarios:
        from workers.sync import scenarios

        if not args.template:
            print(json.dumps({"error": "template_required", "detail": "--scenarios renders a template: pass --template FILE"}))
            return 2
        shown = _rendered(lambda: scenarios.report(open(args.template).read(), settings.esp_targets(), args.esp))
        if shown is None:
            return 2
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 1 if shown["problems"] else 0
    if not args.ref:
        print(json.dumps({"error": "ref_required", "detail": "name a profile id or email, or pass --scenarios"}))
        return 2
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, settings.hasher())
    try:
        found = await find(store, args.ref)
        if found is None:
            print(json.dumps({"error": "not_found"}))
            return 1
        template = open(args.template).read() if args.template else None
        shown = _rendered(lambda: preview(*found, settings.esp_targets(), args.esp, template))
        if shown is None:
            return 2
        print(json.dumps(shown, indent=2, default=str))
        return 0
    finally:
        await store.close()


def _rendered(build: Callable[[], dict]) -> dict | None:
    """What ``build`` renders; None, with the error printed, for a broken template or an unknown target."""
    from adapters.esps.templates import TemplateError

    try:
        return build()
    except TemplateError as exc:
        print(json.dumps({"error": "invalid_template", "detail": str(exc)}))
    except ValueError as exc:
        print(json.dumps({"error": "unknown_esp", "detail": str(exc)}))
    return None


def cmd_preview(args: argparse.Namespace) -> int:
    return asyncio.run(_preview(args))


async def _esp_status() -> int:
    from adapters.esps.registry import build_guard

    settings = get_settings()
    states = {}
    for name, target in settings.esp_targets().items():
        guard = build_guard(target, settings)
        try:
            states[name] = await guard.state()
        finally:
            await guard.close()
    print(json.dumps(states, indent=2))
    return 0


def cmd_esp(args: argparse.Namespace) -> int:
    if args.action == "check":
        found = asyncio.run(check_fields())
        print(json.dumps({name: {"problems": problems} for name, problems in found.items()}, indent=2))
        return 1 if any(found.values()) else 0
    return asyncio.run(_esp_status())


async def _reconcile(args: argparse.Namespace) -> int:
    from adapters.esps.registry import build_esp, build_guard
    from adapters.store.profiles import ProfileStore
    from workers.sync.reconcile import reconcile

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    report = {}
    try:
        for name, target in settings.esp_targets().items():
            if args.esp and name != args.esp:
                continue
            guard = build_guard(target, settings, wait_s=120)
            esp = build_esp(name, target, guard)
            try:
                report[name] = await reconcile(store, esp, 0 if args.all else args.sample, args.repair)
            finally:
                await esp.close()
                await guard.close()
        print(json.dumps(report, indent=2))
        return 0
    finally:
        await store.close()


def cmd_reconcile(args: argparse.Namespace) -> int:
    return asyncio.run(_reconcile(args))


async def _erase(args: argparse.Namespace) -> int:
    import getpass

    from adapters.sources import operator
    from adapters.sources.operator import request_erasure
    from adapters.store.erasures import ErasureReceipts, shown
    from adapters.store.profiles import ProfileStore
    from broker import topology
    from broker.publisher import Publisher
    from schemas.errors import EventInvalid

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    receipts = ErasureReceipts(store.client, settings.mongodb_database)
    try:
        if args.action == "status":
            receipt = await receipts.get(args.receipt or "")
            print(json.dumps(shown(receipt) if receipt else {"error": "not_found", "id": args.receipt}, indent=2))
            return 0 if receipt else 1
        if args.action == "list":
            print(json.dumps([shown(r) for r in await receipts.recent()], indent=2))
            return 0
        if not (args.email or args.phone or args.ids):
            print(json.dumps({"error": "selection_required", "detail": "name the person: --email, --phone or --id SOURCE:ID"}))
            return 2
        try:
            keys = operator.request_keys(args.email or [], args.phone or [], args.ids or [])
        except EventInvalid as exc:
            print(json.dumps({"error": "invalid_identifiers", "errors": exc.errors}))
            return 2
        publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
        try:
            receipt_id = await request_erasure(receipts, publisher, topology.events_queue(settings.queue_prefix), settings.hasher(),
                                               keys, f"cli:{getpass.getuser()}")
        finally:
            await publisher.close()
        print(json.dumps({"id": receipt_id, "status": "requested"}))
        return 0
    finally:
        await store.close()


def cmd_erase(args: argparse.Namespace) -> int:
    return asyncio.run(_erase(args))
