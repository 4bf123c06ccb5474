"""The storm of issue 11, shared by its system test (a small burst) and its benchmark (the full one):
a burst of customer updates and orders — duplicates re-sent under new delivery ids, the whole in
shuffled order — sent as Shopify sends webhooks (retried on anything but 202), and the reading of
what each ESP sandbox and the store hold against each customer's final state.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp

from tests.conftest import API_KEY, post_webhook
from tests.support.samples import customer, order
from tests.support.stack import TARGETS, Stack

DUPLICATE_SHARE = 10
"""One webhook in this many is an event sent again under a new delivery id (as a sender's resend)."""
ORDER_EVERY = 3
"""Every third event of a customer is an order; the others update the customer with a later first name."""


@dataclass(frozen=True)
class Final:
    """What every ESP must end up holding for one customer."""

    first_name: str
    orders: int
    lifetime_value: Decimal


@dataclass(frozen=True)
class Burst:
    deliveries: list[tuple[str, dict[str, Any]]]
    final: dict[str, Final]
    duplicates: int


def burst(tag: str, events: int, customers: int, seed: int = 11) -> Burst:
    """``events`` webhooks over ``customers`` customers, a tenth of them duplicates, shuffled.

    Customer ``c``'s ``n``-th event happens at minute ``n`` (plus ``c`` seconds): updates name it
    ``F{c}-{n}``, so the latest first name is the one of its last update by event time, whatever the
    order of arrival; orders have ids and totals of their own.
    """
    rng = random.Random(f"{seed}-{tag}")
    duplicates = events // DUPLICATE_SHARE
    per_customer = max(ORDER_EVERY, (events - duplicates) // customers)
    deliveries: list[tuple[str, dict[str, Any]]] = []
    final: dict[str, Final] = {}
    for c in range(customers):
        email = f"storm{c}-{tag}@example.com"
        name, totals = "", []
        for n in range(per_customer):
            at = f"2026-03-{1 + n // 1440:02d}T{n // 60 % 24:02d}:{n % 60:02d}:{c % 60:02d}Z"
            if n % ORDER_EVERY == ORDER_EVERY - 1:
                total = Decimal(10 + n) + Decimal(c % 100) / 100
                totals.append(total)
                deliveries.append(("orders/create", order(email, order_gid=10**14 + c * 10_000 + n, total=f"{total:.2f}", processed_at=at)))
            else:
                name = f"F{c}-{n}"
                deliveries.append(("customers/update", customer(email, first_name=name, updated_at=at)))
        final[email] = Final(name, len(totals), sum(totals, Decimal(0)))
    deliveries += rng.sample(deliveries, min(duplicates, len(deliveries)))
    rng.shuffle(deliveries)
    return Burst(deliveries, final, duplicates)


@dataclass
class Sender:
    """Sends webhooks as Shopify does: each under its own delivery id, retried under the same id with a
    small backoff on anything but 202 (a 503 while the receiver cannot confirm, a dropped connection).
    Only a 202 counts as sent.

    Parameters:
      url: the receiver's root.
      concurrency: requests in flight at once.
    """

    http: aiohttp.ClientSession
    url: str
    concurrency: int = 16
    accepted: int = 0
    last_accepted_at: float = 0.0
    refusals: dict[str, int] = field(default_factory=dict)
    refused_at: list[tuple[float, str]] = field(default_factory=list)
    """When each refusal came (``time.time()``) and what it was."""

    async def send(self, topic: str, body: dict[str, Any], gate: asyncio.Semaphore) -> None:
        webhook_id, delay = uuid.uuid4().hex, 0.1
        while True:
            async with gate:
                try:
                    status = (await post_webhook(self.http, self.url, topic, body, webhook_id=webhook_id)).status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
            if status == 202:
                self.accepted += 1
                self.last_accepted_at = time.time()
                return
            self.refusals[str(status)] = self.refusals.get(str(status), 0) + 1
            self.refused_at.append((time.time(), str(status)))
            await asyncio.sleep(delay * random.uniform(1.0, 1.5))
            delay = min(2.0, delay * 2)

    async def send_all(self, deliveries: list[tuple[str, dict[str, Any]]], rate: float,
                       on_progress: Any = None) -> None:
        """Every delivery, started at ``rate`` per second; ``on_progress(i)`` is called as the i-th starts
        (the storm's faults are scheduled by it)."""
        gate = asyncio.Semaphore(self.concurrency)
        start, tasks = time.monotonic(), []
        for i, (topic, body) in enumerate(deliveries):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            if on_progress is not None:
                on_progress(i)
            tasks.append(asyncio.create_task(self.send(topic, body, gate)))
        await asyncio.gather(*tasks)


def _number(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value)).quantize(Decimal("0.01"))
    except (ArithmeticError, ValueError, TypeError):
        return None


def _holds(first_name: Any, orders: Any, ltv: Any, final: Final) -> bool:
    return first_name == final.first_name and _number(orders) == final.orders and _number(ltv) == final.lifetime_value


async def _get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    async with http.get(url, **kwargs) as r:
        r.raise_for_status()
        return await r.json()


async def mailchimp_held(http: aiohttp.ClientSession, api: str, final: dict[str, Final]) -> set[str]:
    """The customers the Mailchimp sandbox holds exactly as they ended."""
    listing = await _get(http, f"{api}/lists/sandbox/members", headers={"Authorization": aiohttp.encode_basic_auth("storm", API_KEY)})
    held = {m["email_address"].lower(): m["merge_fields"] for m in listing["members"]}
    return {e for e, f in final.items() if e in held and _holds(held[e].get("FNAME"), held[e].get("ORDERS"), held[e].get("LTV"), f)}


async def klaviyo_held(http: aiohttp.ClientSession, url: str, final: dict[str, Final]) -> set[str]:
    held = {p.get("email"): p for p in await _get(http, f"{url}/_sandbox/profiles")}
    return {e for e, f in final.items()
            if e in held and _holds(held[e].get("first_name"), (held[e].get("properties") or {}).get("order_count"),
                                    (held[e].get("properties") or {}).get("lifetime_value"), f)}


async def sendgrid_held(http: aiohttp.ClientSession, url: str, final: dict[str, Final]) -> set[str]:
    held = {c.get("email"): c for c in (await _get(http, f"{url}/_sandbox/contacts"))["contacts"]}
    return {e for e, f in final.items()
            if e in held and _holds(held[e].get("first_name"), (held[e].get("custom_fields") or {}).get("orders"),
                                    (held[e].get("custom_fields") or {}).get("ltv"), f)}


async def profile_problems(db: Any, final: dict[str, Final], targets: list[str]) -> list[str]:
    """What in the store is not exactly each customer's final state, or still waits for an ESP
    (PII-free: counts and customer numbers only)."""
    docs = [d async for d in db.profiles.find({"merged_into": {"$exists": False}})]
    problems = [] if len(docs) == len(final) else [f"{len(docs)} profiles for {len(final)} customers"]
    for doc in docs:
        expected = final.get(doc.get("email"))
        number = str(doc.get("email", "")).split("-")[0]
        if expected is None:
            problems.append(f"a profile of no customer of the burst ({number})")
            continue
        computed = doc.get("computed") or {}
        name = (doc.get("traits") or {}).get("first_name", {}).get("value")
        if name != expected.first_name or len(doc.get("orders") or []) != expected.orders or computed.get("order_count") != expected.orders \
                or _number(computed.get("lifetime_value")) != expected.lifetime_value:
            problems.append(f"{number}: not its final state")
        waiting = [t for t in targets if ((doc.get("esp") or {}).get(t) or {}).get("pending")]
        if waiting:
            problems.append(f"{number}: pending for {','.join(waiting)}")
    return problems


@dataclass(frozen=True)
class Plan:
    """The faults, in the order they start while the burst flows (at these shares of it).

    Parameters:
      outage_s: SendGrid answers every call 503 for this long (from 5 % of the burst), and until it refused
        one (so the outage always meets the sync).
      throttle_s: Klaviyo answers every write 429 with its ``Retry-After`` for this long (from 10 %), and
        the first ``throttled`` writes from then on whenever they come (so the storm always meets some).
      broker_down_s: every broker connection dropped at 25 %, new ones refused this long (a restart).
      store_down_s: SecantusDB stopped at 45 %, started again this much later on its port and data.
      mailchimp_every: one Mailchimp write in this many fails with 503, from the start to the end (and
        the first one does, however few there are).
    The events worker is SIGKILLed at 65 % and another one started.
    """

    outage_s: float = 60.0
    throttle_s: float = 30.0
    throttled: int = 3
    broker_down_s: float = 5.0
    store_down_s: float = 2.0
    mailchimp_every: int = 5


async def storm(stack: Stack, http: aiohttp.ClientSession, deliveries: list[tuple[str, dict[str, Any]]], plan: Plan,
                rate: float, concurrency: int = 16) -> tuple[Sender, list[dict[str, Any]]]:
    """Send the burst at ``rate`` per second while the faults of ``plan`` hit the pipeline; returns the
    sender (its count of 202s, the time of the last) and what was injected, when."""
    injected: list[dict[str, Any]] = []
    began = time.time()
    loop = asyncio.get_running_loop()

    def note(fault: str, **detail: Any) -> None:
        injected.append({"fault": fault, "at_s": round(time.time() - began, 1), **detail})

    async def sendgrid_outage() -> None:
        await stack.control(http, "sendgrid", "outage", {"seconds": plan.outage_s, "calls": 1})
        note("sendgrid_outage", seconds=plan.outage_s)

    async def klaviyo_throttle() -> None:
        await stack.control(http, "klaviyo", "faults", {"status": 429, "count": plan.throttled})
        await stack.control(http, "klaviyo", "faults", {"status": 429, "seconds": plan.throttle_s})
        note("klaviyo_429_storm", seconds=plan.throttle_s, first_writes=plan.throttled)

    async def broker_restart() -> None:
        dropped = await asyncio.to_thread(stack.cut_broker, plan.broker_down_s)
        note("broker_connections_dropped", connections=dropped, refused_s=plan.broker_down_s)

    async def store_restart() -> None:
        note("store_stopped")
        await asyncio.to_thread(stack.restart_store, plan.store_down_s)
        note("store_started")

    async def worker_killed() -> None:
        await asyncio.to_thread(stack.kill_worker)
        note("worker_sigkill")

    schedule = {0.05: sendgrid_outage, 0.10: klaviyo_throttle, 0.25: broker_restart, 0.45: store_restart, 0.65: worker_killed}
    at = {int(share * len(deliveries)): fault for share, fault in schedule.items()}
    running: list[asyncio.Task[None]] = []
    await stack.control(http, "mailchimp", "faults", {"status": 503, "every": plan.mailchimp_every})
    await stack.control(http, "mailchimp", "faults", {"status": 503, "count": 1})
    note("mailchimp_503", every=plan.mailchimp_every)
    sender = Sender(http, stack.receiver_url, concurrency)
    await sender.send_all(deliveries, rate, lambda i: running.append(loop.create_task(at[i]())) if i in at else None)
    await asyncio.gather(*running)
    return sender, injected


async def converge(stack: Stack, http: aiohttp.ClientSession, final: dict[str, Final], timeout: float,
                   interval: float = 1.0) -> tuple[dict[str, float], dict[str, int]]:
    """Poll every ESP until each holds every customer's final state, or ``timeout``; returns when each
    ESP first held them all (Unix time), and how many it held at the end."""
    readers = {"mailchimp": (mailchimp_held, stack.api), "klaviyo": (klaviyo_held, stack.sandboxes["klaviyo"].url),
               "sendgrid": (sendgrid_held, stack.sandboxes["sendgrid"].url)}
    done: dict[str, float] = {}
    held: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(TARGETS) and time.monotonic() < deadline:
        for esp in TARGETS:
            if esp not in done:
                read, url = readers[esp]
                held[esp] = len(await read(http, url, final))
                if held[esp] == len(final):
                    done[esp] = time.time()
        await asyncio.sleep(interval)
    return done, held
