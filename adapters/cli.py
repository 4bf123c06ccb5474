"""The ``mergetag`` command: run each process, and the operators' dead-letter tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading

from adapters import logs
from adapters.settings import get_settings


def cmd_receiver(args: argparse.Namespace) -> int:
    from aiohttp import web

    from adapters.receiver import create_app
    from adapters.sentry import init_sentry

    settings = get_settings()
    init_sentry(settings, "receiver")
    host, port = args.host or settings.receiver_host, args.port or settings.receiver_port
    web.run_app(create_app(settings), host=host, port=port, access_log=None,
                print=lambda *_: logging.getLogger("mergetag").info("receiver on %s:%s", host, port))
    return 0


def _serve(queues: list[str], sweep: bool, component: str) -> int:
    """Consume ``queues`` with a Dramatiq worker until SIGTERM/SIGINT; optionally run the sweeper."""
    import dramatiq

    from workers import app

    settings = get_settings()
    workers = app.build(settings, component=component)
    # A short poll: delayed messages (coalesced syncs, abandonment checks) run close to their time.
    worker = dramatiq.Worker(workers.broker, queues=set(queues), worker_threads=settings.worker_threads, worker_timeout=100)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    logging.getLogger("mergetag").info("consuming %s", ", ".join(queues))

    loop = asyncio.new_event_loop()
    sweep_stop = asyncio.Event()
    if sweep:
        threading.Thread(target=loop.run_until_complete, args=(workers.sweeper(sweep_stop),), daemon=True, name="sweeper").start()
    stop.wait()
    if sweep:
        loop.call_soon_threadsafe(sweep_stop.set)
    worker.stop(timeout=10_000)
    workers.broker.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from broker import topology

    prefix = get_settings().queue_prefix
    queues = {"events": [topology.events_queue(prefix)], "sync": [topology.sync_queue(prefix)], "all": topology.all_queues(prefix)}
    return _serve(queues[args.queues], sweep=False, component="worker")


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
    return _serve([topology.sync_queue(get_settings().queue_prefix)], sweep=True, component="sync")


async def _pull(resources: list[str], since: str | None, every: float | None) -> None:
    """Pull now (``every`` None) or on a schedule, publishing through the receiver's confirm path."""
    from adapters.sources.shopify_pull import ShopifyPuller
    from adapters.store.checkpoints import Checkpoints
    from adapters.store.profiles import ProfileStore
    from broker import topology
    from broker.publisher import Publisher, publish_delivery

    settings = get_settings()
    if not settings.shopify_admin_url or settings.shopify_admin_token is None:
        raise SystemExit("set MERGETAG_SHOPIFY_ADMIN_URL and MERGETAG_SHOPIFY_ADMIN_TOKEN")
    queue = topology.events_queue(settings.queue_prefix)
    publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    puller = ShopifyPuller(settings.shopify_admin_url, settings.shopify_admin_token.get_secret_value(),
                           lambda d: publish_delivery(publisher, queue, d),
                           Checkpoints(store.client, settings.mongodb_database), settings.shopify_pull_page_size)
    try:
        while True:
            for resource in resources:
                try:
                    result = await puller.pull(resource, since)
                    print(json.dumps({"resource": result.resource, "pages": result.pages, "records": result.records,
                                      "checkpoint": result.since}), flush=True)
                except Exception:  # a scheduled poller outlives one failed pull; the next run resumes from the checkpoint
                    if every is None:
                        raise
                    logging.getLogger("mergetag").exception("pull of %s failed", resource)
            if every is None:
                return
            since = None
            await asyncio.sleep(every)
    finally:
        await publisher.close()
        await store.close()


def cmd_pull(args: argparse.Namespace) -> int:
    resources = ["customers", "orders"] if args.resource == "all" else [args.resource]
    asyncio.run(_pull(resources, args.since, None))
    return 0


def cmd_poller(args: argparse.Namespace) -> int:
    asyncio.run(_pull(["customers", "orders"], None, get_settings().shopify_pull_interval_s))
    return 0


def _dead_letter_selection(args: argparse.Namespace):  # noqa: ANN202
    from broker.dead_letters import Selection

    ids = getattr(args, "ids", None)
    return Selection(ids=frozenset(ids) if ids else None, queue=args.queue, actor=args.actor, reason=args.reason,
                     older_than_s=args.older_than, newer_than_s=args.newer_than, profile=args.profile, target=args.target)


def cmd_dlq(args: argparse.Namespace) -> int:
    from broker.dead_letters import DeadLetters, UnknownQueue

    settings = get_settings()
    tools = DeadLetters(settings.amqp_url, settings.queue_prefix)
    if args.action == "show":
        letter = tools.show(args.message_id)
        if letter is None:
            print(json.dumps({"error": "not_found", "message_id": args.message_id}))
            return 1
        print(json.dumps({**letter.summary(), "options": letter.message.options}, indent=2, default=str))
        return 0
    where = _dead_letter_selection(args)
    if args.action in {"replay", "purge"} and not (where.narrowed or args.all):
        print(json.dumps({"error": "selection_required", "detail": "name message ids, pass a filter, or pass --all"}))
        return 2
    try:
        if args.action == "list":
            _print_dead_letters([d.summary() for d in tools.list(where=where)], args.json)
            return 0
        done = getattr(tools, args.action)(where=where)
    except UnknownQueue as exc:
        print(json.dumps({"error": "unknown_queue", "detail": str(exc)}))
        return 2
    print(json.dumps({"replayed" if args.action == "replay" else "purged": [d.message_id for d in done], "count": len(done)}))
    return 0


def _print_dead_letters(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    print(f"{'QUEUE':<24} {'MESSAGE ID':<38} {'ACTOR':<15} {'ERROR':<22} {'AGE':>8}  DETAIL")
    for r in rows:
        age = "-" if r["age_s"] is None else f"{r['age_s']:.0f}s"
        print(f"{r['queue']:<24} {r['message_id']:<38} {r['actor']:<15} {r['error']:<22} {age:>8}  {r['detail']}")


def cmd_queues(args: argparse.Namespace) -> int:
    from broker import topology
    from broker.migrate import MigrationRefused, migrate

    settings = get_settings()
    try:
        done = migrate(settings.amqp_url, topology.prefix_declarations(settings.queue_prefix), dry_run=args.dry_run)
    except MigrationRefused as exc:
        print(json.dumps({"error": "migration_refused", "detail": str(exc)}))
        return 1
    print(json.dumps(done.summary(), indent=2))
    return 0


def _quarantine_row(doc: dict) -> dict:
    return {"id": doc["_id"], "source": doc["delivery"].get("source"), "topic": doc["delivery"].get("topic"),
            "reasons": doc["reasons"], "attempts": doc["attempts"], "schema_version": doc["schema_version"],
            "last_failed_at": doc["last_failed_at"].isoformat()}


async def _quarantine(args: argparse.Namespace) -> int:
    from adapters.store.profiles import ProfileStore
    from adapters.store.quarantine import Quarantine
    from broker import topology
    from broker.publisher import Publisher, encode_message

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    quarantine = Quarantine(store.client, settings.mongodb_database)
    try:
        if args.action == "list":
            docs = await quarantine.list(reason=args.reason, limit=args.limit, after=args.after)
            more = await quarantine.count(reason=args.reason, after=docs[-1]["_id"]) if docs else 0
            print(json.dumps({"quarantined": [_quarantine_row(d) for d in docs], "counts": await quarantine.counts(),
                              "total": await quarantine.count(reason=args.reason), "more": more,
                              "next": docs[-1]["_id"] if more else None}, indent=None if args.json else 2))
            return 0
        if args.action == "show":
            doc = await quarantine.get(args.id)
            if doc is None:
                print(json.dumps({"error": "not_found", "id": args.id}))
                return 1
            print(json.dumps(doc, indent=2, default=str))
            return 0
        if not args.ids and not args.all:
            print(json.dumps({"error": "selection_required", "detail": "name ids or pass --all"}))
            return 2
        queue = topology.events_queue(settings.queue_prefix)
        publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)

        async def publish(delivery: dict) -> None:
            message_id, body = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery,))
            await publisher.publish(queue, body, message_id)

        try:
            report = await quarantine.redrive(publish, None if args.all else args.ids)
        finally:
            await publisher.close()
        print(json.dumps(report.summary()))
        return 1 if report.failed else 0
    finally:
        await store.close()


async def _profile(args: argparse.Namespace) -> int:
    from adapters.admin import find
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


def cmd_quarantine(args: argparse.Namespace) -> int:
    return asyncio.run(_quarantine(args))


async def _preview(args: argparse.Namespace) -> int:
    from adapters.admin import find
    from adapters.esps.templates import TemplateError
    from adapters.store.profiles import ProfileStore
    from workers.sync.preview import preview

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, settings.hasher())
    try:
        found = await find(store, args.ref)
        if found is None:
            print(json.dumps({"error": "not_found"}))
            return 1
        template = open(args.template).read() if args.template else None
        try:
            shown = preview(*found, settings.esp_targets(), args.esp, template)
        except TemplateError as exc:
            print(json.dumps({"error": "invalid_template", "detail": str(exc)}))
            return 2
        except ValueError as exc:
            print(json.dumps({"error": "unknown_esp", "detail": str(exc)}))
            return 2
        print(json.dumps(shown, indent=2, default=str))
        return 0
    finally:
        await store.close()


def cmd_preview(args: argparse.Namespace) -> int:
    return asyncio.run(_preview(args))


def cmd_admin(args: argparse.Namespace) -> int:
    from aiohttp import web

    from adapters.admin import create_admin_app

    settings = get_settings()
    web.run_app(create_admin_app(settings), host=settings.admin_host, port=args.port or settings.admin_port,
                access_log=None, print=lambda *_: None)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergetag", description="mergetag: events in, fresh merge fields out.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("receiver", help="run the webhook receiver")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_receiver)

    p = sub.add_parser("worker", help="run the pipeline's Dramatiq workers")
    p.add_argument("--queues", choices=["events", "sync", "all"], default="events")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sync", help="run the background ESP sync (sync workers and the pending sweeper)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("pull", help="pull changed records from a REST source now")
    p.add_argument("source", choices=["shopify"])
    p.add_argument("--since", help="ISO time; default: the stored checkpoint")
    p.add_argument("--resource", choices=["customers", "orders", "all"], default="all")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("poller", help="pull REST sources on a schedule (MERGETAG_SHOPIFY_PULL_INTERVAL_S)")
    p.set_defaults(func=cmd_poller)

    p = sub.add_parser("preview", help="exactly what would be sent to the ESP for a profile, and a template rendered with it")
    p.add_argument("ref", help="profile id or email")
    p.add_argument("--esp", default="mailchimp", help="the ESP target (default mailchimp)")
    p.add_argument("--template", help="a file with Mailchimp merge tags (*|FNAME|*, *|IF:TAG|*…*|END:IF|*)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("reconcile", help="compare what the ESP holds with what was last sent; --repair re-sends the drift")
    p.add_argument("--sample", type=int, default=200, help="profiles to check (random)")
    p.add_argument("--all", action="store_true", help="check every synced profile")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--esp", help="one ESP target (default: every configured one)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("esp", help="ESP accounts: circuit state and connection use, or check the field mapping")
    p.add_argument("action", choices=["status", "check"])
    p.set_defaults(func=cmd_esp)

    p = sub.add_parser("admin", help="run the admin API (MERGETAG_ADMIN_TOKEN)")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_admin)

    p = sub.add_parser("erase", help="erase a person (every identifier named), or show erasure receipts: erase status ID | erase list")
    p.add_argument("action", nargs="?", choices=["status", "list"])
    p.add_argument("receipt", nargs="?", help="the receipt id (with status)")
    p.add_argument("--email", action="append", help="an email address of the person (repeatable)")
    p.add_argument("--phone", action="append", help="a phone number of the person (repeatable)")
    p.add_argument("--id", dest="ids", action="append", metavar="SOURCE:ID", help="a sender's id of the person, e.g. shopify:123")
    p.set_defaults(func=cmd_erase)

    dlq = sub.add_parser("dlq", help="inspect and re-drive dead letters").add_subparsers(dest="action", required=True)
    p = dlq.add_parser("list", help="dead letters per queue with actor, error and age")
    p.add_argument("--json", action="store_true")
    _dead_letter_filters(p)
    p = dlq.add_parser("show", help="one dead letter, with its options")
    p.add_argument("message_id")
    for action in ("replay", "purge"):
        p = dlq.add_parser(action, help=f"{action} the named dead letters, every one matching the filters, or --all")
        p.add_argument("ids", nargs="*", help="message ids")
        p.add_argument("--all", action="store_true")
        _dead_letter_filters(p)
    for p in dlq.choices.values():
        p.set_defaults(func=cmd_dlq)

    queues = sub.add_parser("queues", help="RabbitMQ queues of the prefix").add_subparsers(dest="action", required=True)
    p = queues.add_parser("migrate", help="redeclare queues whose declaration changed, keeping their messages (workers stopped)")
    p.add_argument("--dry-run", action="store_true", help="only report which queues differ and how many messages they hold")
    p.set_defaults(func=cmd_queues)

    profile = sub.add_parser("profile", help="inspect profiles").add_subparsers(dest="action", required=True)
    p = profile.add_parser("show", help="a profile with the lineage of every trait (by id or email)")
    p.add_argument("ref")
    p = profile.add_parser("quality", help="profiles and events per data-quality flag")
    p = profile.add_parser("rekey", help="index profiles by the keyed hashes of their identifiers (once, when upgrading)")
    for p in profile.choices.values():
        p.set_defaults(func=cmd_profile)

    quarantine = sub.add_parser("quarantine", help="deliveries that failed validation").add_subparsers(dest="action", required=True)
    p = quarantine.add_parser("list", help="quarantined deliveries (a page in id order) and counts per reason")
    p.add_argument("--reason")
    p.add_argument("--limit", type=int, default=100, help="deliveries per page (default 100)")
    p.add_argument("--after", help="the id printed as `next`: the page after it")
    p.add_argument("--json", action="store_true")
    p = quarantine.add_parser("show", help="one quarantined delivery with every error")
    p.add_argument("id")
    p = quarantine.add_parser("redrive", help="send quarantined deliveries through the pipeline again (after a fix)")
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true")
    for p in quarantine.choices.values():
        p.set_defaults(func=cmd_quarantine)
    return parser


def _age(text: str) -> float:
    from broker.dead_letters import parse_age

    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dead_letter_filters(p: argparse.ArgumentParser) -> None:
    """Filters of the dead-letter commands; several combine (each must hold)."""
    p.add_argument("--queue", help="events or sync (or the full queue name)")
    p.add_argument("--actor", help="e.g. process_event, sync_profile")
    p.add_argument("--reason", help="the error code, e.g. esp_rejected")
    p.add_argument("--older-than", type=_age, metavar="AGE", help="dead-lettered at least AGE ago (30m, 2h, 7d)")
    p.add_argument("--newer-than", type=_age, metavar="AGE", help="dead-lettered less than AGE ago")
    p.add_argument("--profile", help="profile id (single profile syncs)")
    p.add_argument("--target", help="ESP target name (single profile syncs)")


def main(argv: list[str] | None = None) -> int:
    logs.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
