"""The operator's tools for what did not go through: dead letters, queues, quarantined deliveries."""

from __future__ import annotations

import argparse
import asyncio
import json

from adapters.settings import get_settings


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
        if args.dry_run:
            letters = tools.list(where=where)
            if args.action == "replay":
                print(json.dumps(asyncio.run(_plan(letters, args.show_values)), default=str))
            else:
                print(json.dumps({"would_purge": [d.message_id for d in letters], "count": len(letters)}))
            return 0
        if args.action == "replay" and args.rate:
            done = _replay_at(tools, where, args.rate)
        else:
            done = getattr(tools, args.action)(where=where)
    except UnknownQueue as exc:
        print(json.dumps({"error": "unknown_queue", "detail": str(exc)}))
        return 2
    verb = "replayed" if args.action == "replay" else "purged"
    asyncio.run(_audit(f"dead_letters.{args.action}", {k: v for k, v in vars(where).items() if v is not None and k != "ids"}
                       | ({"ids": len(where.ids)} if where.ids else {}) | ({"rate": args.rate} if getattr(args, "rate", None) else {}),
                       {verb: len(done)}))
    print(json.dumps({verb: [d.message_id for d in done], "count": len(done)}))
    return 0


def _replay_at(tools, where, rate: float) -> list:  # noqa: ANN001
    """Replay the selection at about ``rate`` letters per second (:func:`adapters.pacing.at_rate`)."""
    from adapters.pacing import at_rate

    done: list = []

    async def step(chunk: list[str]) -> int:
        replayed = await asyncio.to_thread(tools.replay, message_ids=set(chunk))
        done.extend(replayed)
        return len(replayed)

    asyncio.run(at_rate([d.message_id for d in tools.list(where=where)], rate, step))
    return done


async def _plan(letters: list, personal: bool) -> dict:
    from adapters.esps.registry import clients
    from adapters.store.profiles import ProfileStore
    from workers.sync import replay

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database, settings.hasher())
    esps = clients(settings)
    try:
        return replay.summary(await replay.field_changes(replay.plan(letters), letters, store, esps), personal)
    finally:
        for esp in esps.values():
            await esp.close()
        await store.close()


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


async def _audit(action: str, selection: dict, counts: dict) -> None:
    """Record a finished action; the action is done whatever happens here, so a store that cannot
    take the entry is reported, not fatal."""
    import sys

    from pymongo.errors import PyMongoError

    from adapters.store.audit import AuditLog
    from adapters.store.profiles import ProfileStore

    settings = get_settings()
    store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
    try:
        await AuditLog(store.client, settings.mongodb_database).record(_operator(), action, selection, counts, "finished")
    except PyMongoError as exc:
        print(f"the audit log did not take this action: {type(exc).__name__}", file=sys.stderr)
    finally:
        await store.close()


def cmd_audit(args: argparse.Namespace) -> int:
    async def export() -> None:
        from adapters.store.audit import AuditLog
        from adapters.store.profiles import ProfileStore

        settings = get_settings()
        store = ProfileStore.connect(settings.mongodb_uri, settings.mongodb_database)
        try:
            for entry in await AuditLog(store.client, settings.mongodb_database).entries(args.limit):
                print(json.dumps({"id": entry.pop("_id"), **entry}, default=str))
        finally:
            await store.close()

    asyncio.run(export())
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
        chosen = args.ids or [d["_id"] for d in await quarantine.list(limit=10**9)]
        if args.dry_run:
            from adapters.sources.registry import build_mappings
            from workers.profiles.deliveries import redrive_plan

            docs = [doc for key in chosen if (doc := await quarantine.get(key)) is not None and doc["status"] == "quarantined"]
            plan = redrive_plan(((d["_id"], Quarantine.delivery(d)) for d in docs), build_mappings(settings),
                                frozenset(settings.blocked_identifiers))
            print(json.dumps({"deliveries": plan.deliveries, "passing": len(plan.passing), "events": plan.events,
                              "would_fail_again": plan.failing, "passing_ids": plan.passing}))
            return 0
        queue = topology.events_queue(settings.queue_prefix)
        publisher = Publisher(settings.amqp_url, topology.all_queues(settings.queue_prefix), settings.publish_timeout_s)

        async def publish(delivery: dict) -> None:
            message_id, body = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery,))
            await publisher.publish(queue, body, message_id)

        from adapters.pacing import at_rate
        from adapters.store.quarantine import Redrive

        report = Redrive()

        async def step(chunk: list[str]) -> int:
            done = await quarantine.redrive(publish, chunk)
            report.add(done)
            return done.published

        try:
            await at_rate(chosen, args.rate, step)
        finally:
            await publisher.close()
        print(json.dumps(report.summary()))
        return 1 if report.failed else 0
    finally:
        await store.close()


def cmd_quarantine(args: argparse.Namespace) -> int:
    return asyncio.run(_quarantine(args))


def _age(text: str) -> float:
    from broker.dead_letters import parse_age

    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dead_letter_filters(p: argparse.ArgumentParser) -> None:
    """Filters of the dead-letter commands; several combine (each must hold)."""
    p.add_argument("--queue", help="events or sync (or the full queue name)")
    p.add_argument("--actor", help="e.g. process_event, sync_profile")
    p.add_argument("--reason", help="the error code, e.g. esp_rejected")
    p.add_argument("--older-than", type=_age, metavar="AGE", help="dead-lettered at least AGE ago (30m, 2h, 7d)")
    p.add_argument("--newer-than", type=_age, metavar="AGE", help="dead-lettered less than AGE ago")
    p.add_argument("--profile", help="profile id (single profile syncs)")
    p.add_argument("--target", help="ESP target name (single profile syncs)")
