"""Convergence after a storm (issue 11), the full one: how long after the last event every ESP holds
each customer's final state.

A burst of 10,000 Shopify webhooks over 1,000 customers (updates with later first names, orders, a
tenth sent again under new delivery ids, all shuffled) goes through a pipeline of its own — a
SecantusDB on a storage directory, the Mailchimp, Klaviyo and SendGrid sandboxes, the receiver, an
events worker and the sync, each its own process — while, in turn: SendGrid is down for a minute,
Klaviyo answers every write 429 (with its Retry-After) for 30 s, every broker connection of the
pipeline is dropped and refused for 5 s (a proxy: the machine's RabbitMQ is shared), SecantusDB is
stopped and started again on its port and data, and the events worker is SIGKILLed and replaced;
one Mailchimp write in five fails with 503 throughout. Senders retry anything but 202, as Shopify does.

The pipeline runs with the product's default settings (sweep, leases, retries, circuits); ``--fast``
takes the system test's cadence instead (short leases and backoffs, for small bursts).

Prints one JSON object (the last line): ``converged``, ``seconds_after_last_event`` per ESP and
``max``, the faults injected (when, and how many each ESP gave), and the store's check (every profile
exact, none pending) and the dead letters.

    python bench/storm.py [--events 10000] [--customers 1000] [--rate 200] [--outage 60] [--throttle 30]
                          [--broker-down 5] [--store-down 2] [--mailchimp-every 5] [--timeout 900] [--fast] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.stack import FAST, TARGETS, Stack  # noqa: E402
from tests.support.storm import Plan, burst, converge, profile_problems, storm  # noqa: E402

FIVE_MINUTES = 300


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="webhooks in the burst, duplicates included")
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks started per second")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds SendGrid is down")
    parser.add_argument("--throttle", type=float, default=30.0, help="seconds Klaviyo answers every write 429")
    parser.add_argument("--broker-down", type=float, default=5.0, help="seconds the broker refuses the pipeline after dropping it")
    parser.add_argument("--store-down", type=float, default=2.0, help="seconds SecantusDB stays stopped")
    parser.add_argument("--mailchimp-every", type=int, default=5, help="one Mailchimp write in this many fails with 503")
    parser.add_argument("--timeout", type=float, default=900.0, help="how long to wait for convergence after the last event")
    parser.add_argument("--fast", action="store_true", help="the system test's settings instead of the defaults")
    parser.add_argument("--keep", action="store_true", help="keep the store's data and the logs (their directory is printed)")
    args = parser.parse_args()
    plan = Plan(outage_s=args.outage, throttle_s=args.throttle, broker_down_s=args.broker_down, store_down_s=args.store_down,
                mailchimp_every=args.mailchimp_every)
    shot = burst(uuid.uuid4().hex[:8], args.events, args.customers)
    root = Path(tempfile.mkdtemp(prefix="mergetag-storm-"))
    os.environ.setdefault("MERGETAG_LOG_LEVEL", "WARNING")
    stack = Stack(root, **(FAST if args.fast else {}))
    result: dict[str, object] = {"events": len(shot.deliveries), "customers": len(shot.final), "duplicates": shot.duplicates,
                                 "rate_per_s": args.rate, "settings": "fast" if args.fast else "defaults"}
    try:
        await asyncio.to_thread(stack.start)
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(stack.ready):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not attach to their queues")
            await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            began = time.time()
            sender, injected = await storm(stack, http, shot.deliveries, plan, args.rate)
            last = sender.last_accepted_at
            done, held = await converge(stack, http, shot.final, timeout=args.timeout)
            after = {esp: round(done[esp] - last, 1) if esp in done else None for esp in TARGETS}
            converged = len(done) == len(TARGETS)
            problems = await profile_problems(stack.db, shot.final, TARGETS)
            if problems and converged:  # the record of the last sends follows the ESPs' answers: look again shortly
                await asyncio.sleep(5)
                problems = await profile_problems(stack.db, shot.final, TARGETS)
            given = {esp: (await stack.control(http, esp, "stats"))["faults_given"] for esp in TARGETS}
        result.update({
            "accepted": sender.accepted, "receiver_refusals": sender.refusals, "burst_s": round(last - began, 1),
            "converged": converged,
            "seconds_after_last_event": {**after, "max": max(after.values()) if converged else None},
            "within_five_minutes": converged and max(after.values()) <= FIVE_MINUTES,
            "held_at_end": held,
            "faults": {"injected": injected, "given": given,
                       "broker": {"cuts": stack.proxy.cuts, "connections_refused": stack.proxy.refused}},
            "store": {"exact": converged and not problems, "problems": problems[:10], "problem_count": len(problems)},
            "dead_letters": stack.dead_letters(),
        })
    finally:
        await stack.close()
        if args.keep:
            result["kept"] = str(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
