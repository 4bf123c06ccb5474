"""The ``mergetag`` command: run each process, and the operators' tools."""

from __future__ import annotations

import argparse

from adapters import logs
from adapters.cli.backfill import cmd_pull
from adapters.cli.operate import cmd_audit, cmd_dlq, cmd_quarantine, cmd_queues, dead_letter_filters
from adapters.cli.people import cmd_erase, cmd_esp, cmd_preview, cmd_profile, cmd_reconcile
from adapters.cli.run import cmd_admin, cmd_feed, cmd_poller, cmd_receiver, cmd_sync, cmd_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergetag", description="mergetag: events in, fresh merge fields out.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("receiver", help="run the webhook receiver")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_receiver)

    p = sub.add_parser("feed", help="run the send-time feed (GET /feed/v1/{target}/{ref}, MERGETAG_FEED_TOKENS)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_feed)

    p = sub.add_parser("worker", help="run the pipeline's Dramatiq workers")
    p.add_argument("--queues", choices=["events", "sync", "all"], default="events")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sync", help="run the background ESP sync (sync workers and the pending sweeper)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("pull", help="pull changed records from a REST source now (a backfill: with --since 1970-01-01, everything)",
                       description="Pull through the webhooks' path, with progress on stderr (a bar on a terminal, a line per "
                                   "--progress-every pages elsewhere) and a summary on stdout.")
    p.add_argument("source", choices=["shopify"])
    p.add_argument("--since", help="ISO time; default: the stored checkpoint")
    p.add_argument("--resource", choices=["customers", "orders", "all"], default="all")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--progress-every", type=int, default=10, metavar="PAGES", help="without a terminal: a progress line per this many pages")
    p.add_argument("--wait", action="store_true",
                   help="then follow the pipeline until everything published is merged and synced (no event queued, no "
                        "profile pending for any ESP target) and add what it cost: store requests per event (the server's "
                        "serverStatus numRequests delta: it counts every client's requests on that server, so it is meaningful "
                        "on a dedicated deployment or sandbox) and each ESP account's write requests against the minimum, "
                        "ceil(profiles synced / batch size); exits 1 when the deadline passes first")
    p.add_argument("--deadline", type=float, default=3600.0, metavar="SECONDS", help="with --wait: the longest wait (default 3600)")
    p.add_argument("--settle", type=float, default=5.0, metavar="SECONDS",
                   help="with --wait: how long no event may be queued and no profile pending before it counts as done (messages a worker "
                        "holds are invisible to the queue; default 5)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("poller", help="pull REST sources on a schedule (MERGETAG_SHOPIFY_PULL_INTERVAL_S)")
    p.set_defaults(func=cmd_poller)

    p = sub.add_parser("preview", help="exactly what would be sent to the ESP for a profile, and a template rendered with it")
    p.add_argument("ref", nargs="?", help="profile id or email (not with --scenarios)")
    p.add_argument("--esp", default="mailchimp", help="the ESP target (default mailchimp)")
    p.add_argument("--scenarios", action="store_true",
                   help="render --template for synthetic edge-case profiles (missing first name, long values, non-Latin and emoji, "
                        "no order, abandoned cart, far time zone) and report each merge tag that fell back, was cut, overflowed the "
                        "ESP's limit or rendered empty; exits 1 when any did")
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
    dead_letter_filters(p)
    p = dlq.add_parser("show", help="one dead letter, with its options")
    p.add_argument("message_id")
    for action in ("replay", "purge"):
        p = dlq.add_parser(action, help=f"{action} the named dead letters, every one matching the filters, or --all")
        p.add_argument("ids", nargs="*", help="message ids")
        p.add_argument("--all", action="store_true")
        p.add_argument("--dry-run", action="store_true", help="only show what it would do (a replay: the plan, with each target's changes)")
        dead_letter_filters(p)
    dlq.choices["replay"].add_argument("--rate", type=float, help="letters per second (default: all at once)")
    dlq.choices["replay"].add_argument("--show-values", action="store_true", help="show personal values in the plan's changes")
    for p in dlq.choices.values():
        p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("audit", help="the audit log of operator actions, newest first (JSON lines)")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(func=cmd_audit)

    queues = sub.add_parser("queues", help="RabbitMQ queues of the prefix").add_subparsers(dest="action", required=True)
    p = queues.add_parser("migrate", help="redeclare queues whose declaration changed, keeping their messages (workers stopped)")
    p.add_argument("--dry-run", action="store_true", help="only report which queues differ and how many messages they hold")
    p.set_defaults(func=cmd_queues)

    profile = sub.add_parser("profile", help="inspect profiles").add_subparsers(dest="action", required=True)
    p = profile.add_parser("show", help="a profile with the lineage of every trait (by id or email)")
    p.add_argument("ref")
    p = profile.add_parser("quality", help="profiles and events per data-quality flag")
    p = profile.add_parser("rekey", help="index profiles by the keyed hashes of their identifiers and claim each identifier (once, when upgrading)")
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
    p.add_argument("--dry-run", action="store_true", help="only validate them again under today's mappings: which would pass, which fail and why")
    p.add_argument("--rate", type=float, help="deliveries per second (default: all at once)")
    for p in quarantine.choices.values():
        p.set_defaults(func=cmd_quarantine)
    return parser


def main(argv: list[str] | None = None) -> int:
    logs.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
