"""The sync end to end, to all three ESP sandboxes, through the real processes.

Two phases, each reported per ESP:
- steady: N events over M profiles at a steady rate, with the sync running. Reports the time
  from an event's webhook request (answered 202) to the ESP holding it or a newer value
  (p50, p99), and the ESP write requests made.
- backlog: the sync is down while B events for B new profiles are merged, then it starts.
  Reports the write requests made against the minimum possible, ceil(changed profiles /
  the ESP's batch size), and how long the backlog took to drain.

Everything runs here: RabbitMQ and Redis on localhost, a SecantusDB, the Mailchimp, Klaviyo and
SendGrid sandboxes, the receiver, the worker and the sync. Prints one JSON object.

    python bench/sync_latency.py [--events 300] [--profiles 100] [--rate 10] [--backlog 1000] [--esps mailchimp,klaviyo,sendgrid]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.esps.registry import descriptor  # noqa: E402
from adapters.sources.shopify import sign  # noqa: E402
from broker import admin  # noqa: E402
from sandboxes import klaviyo as klaviyo_sandbox  # noqa: E402
from sandboxes import sendgrid as sendgrid_sandbox
from sandboxes.local import free_port, start_secantus, wait_for_port  # noqa: E402

SECRET = "bench-secret"
KEY = "benchkey000000000000000000000000-us1"
# Where each sandbox keeps the first name, and which of its routes write profiles (not job polls or reads).
NAME_FIELD = {"mailchimp": "FNAME", "klaviyo": "first_name", "sendgrid": "first_name"}
WRITES = {
    "mailchimp": ("PUT /3.0/lists/{list_id}/members/{hash}", "POST /3.0/batches"),
    "klaviyo": ("POST /api/profile-import", "POST /api/profile-bulk-import-jobs"),
    "sendgrid": ("PUT /v3/marketing/contacts",),
}


def body(email: str, version: int) -> bytes:
    sample = json.loads((ROOT / "tests/support/fixtures/shopify/CustomersCreate.json").read_text())
    sample.update(email=email, first_name=f"v{version}", updated_at=f"2026-01-01T{version // 3600:02d}:{version // 60 % 60:02d}:{version % 60:02d}Z",
                  admin_graphql_api_id=f"gid://shopify/Customer/{abs(hash(email)) % 10**12}")
    return json.dumps(sample).encode()


class Bench:
    def __init__(self, http: aiohttp.ClientSession, receiver: str, sandboxes: dict[str, str]) -> None:
        self.http, self.receiver, self.sandboxes = http, receiver, sandboxes
        self.accepted: list[tuple[float, str, int]] = []

    async def send(self, email: str, version: int) -> None:
        data = body(email, version)
        headers = {"X-Shopify-Topic": "customers/update", "X-Shopify-Hmac-Sha256": sign(data, SECRET),
                   "X-Shopify-Webhook-Id": uuid.uuid4().hex}
        # Timed from the request, not from reading the 202: on a busy machine the ESP may hold the
        # change before this client gets round to reading its answer. (A few ms pessimistic.)
        sent_at = time.time()
        async with self.http.post(f"{self.receiver}/webhooks/shopify", data=data, headers=headers) as r:
            if r.status == 202:
                self.accepted.append((sent_at, email, version))

    async def control(self, esp: str, path: str, body: Any = None) -> Any:
        method = self.http.post if body is not None else self.http.get
        async with method(f"{self.sandboxes[esp]}/_sandbox/{path}", json=body) as r:
            return await r.json()

    async def writes(self, esp: str) -> dict[str, list[tuple[float, int]]]:
        found: dict[str, list[tuple[float, int]]] = {}
        for ts, email, fields in await self.control(esp, "history"):
            name = str(fields.get(NAME_FIELD[esp]) or "")
            if name.startswith("v"):
                found.setdefault(email, []).append((ts, int(name[1:])))
        return found

    async def wait_for(self, final: dict[str, int], timeout: float) -> dict[str, float]:
        """Until every ESP holds each profile's final version; returns when each ESP got there."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(self.sandboxes) and time.monotonic() < deadline:
            for esp in self.sandboxes:
                if esp in done:
                    continue
                held = {e: max(v for _, v in w) for e, w in (await self.writes(esp)).items()}
                if all(held.get(e, -1) >= v for e, v in final.items()):
                    done[esp] = time.time()
            await asyncio.sleep(0.5)
        return done

    async def requests(self, esp: str) -> int:
        stats = await self.control(esp, "stats")
        return sum(stats["requests"].get(route, 0) for route in WRITES[esp])


def quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=100)
    return round(q[49], 3), round(q[98], 3)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second in the steady phase")
    parser.add_argument("--backlog", type=int, default=1000, help="profiles changed while the sync is down")
    parser.add_argument("--esps", default="mailchimp,klaviyo,sendgrid", help="the ESP targets to sync to")
    args = parser.parse_args()

    prefix = "sbench" + uuid.uuid4().hex[:6]
    mongo, uri = start_secantus()
    ports = {esp: free_port() for esp in args.esps.split(",")}
    receiver_port = free_port()
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_SHOPIFY_SECRETS": SECRET, "MERGETAG_MAILCHIMP_API_KEY": KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           "MERGETAG_KLAVIYO_API_KEY": klaviyo_sandbox.DEFAULT_KEY, "MERGETAG_SENDGRID_API_KEY": sendgrid_sandbox.DEFAULT_KEY,
           "MERGETAG_LOG_LEVEL": os.environ.get("MERGETAG_LOG_LEVEL", "WARNING"),
           "MERGETAG_ESPS": args.esps, **{f"MERGETAG_{esp.upper()}_BASE_URL": f"http://127.0.0.1:{port}" + ("/3.0" if esp == "mailchimp" else "")
                                          for esp, port in ports.items()},
           "MERGETAG_SYNC_GRACE_S": "2", "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5",
           "MERGETAG_IDENTITY_HASH_KEYS": os.environ.get("MERGETAG_IDENTITY_HASH_KEYS", "bench-identity-hash-key-0123456789")}
    env.pop("MERGETAG_ESP_FILE", None)
    cli = [sys.executable, "-m", "adapters.cli"]
    processes = []
    for esp, port in ports.items():
        extra = ["--api-key", KEY] if esp == "mailchimp" else []
        processes.append(subprocess.Popen([sys.executable, "-m", f"sandboxes.{esp}", "--port", str(port), *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        wait_for_port(port, process=processes[-1])
    processes += [subprocess.Popen([*cli, *c], cwd=ROOT, env=env) for c in (["worker"], ["receiver", "--port", str(receiver_port)])]
    wait_for_port(receiver_port, process=processes[-1])
    sync = subprocess.Popen([*cli, "sync"], cwd=ROOT, env=env)
    result: dict[str, Any] = {}
    try:
        await asyncio.sleep(2)  # workers attach to their queues
        async with aiohttp.ClientSession() as http:
            bench = Bench(http, f"http://127.0.0.1:{receiver_port}", {esp: f"http://127.0.0.1:{p}" for esp, p in ports.items()})

            # Steady: a rate the sync keeps up with, measured from each 202 to each ESP.
            emails = [f"s{n}-{prefix}@example.com" for n in range(args.profiles)]
            start, tasks = time.monotonic(), []
            for i in range(args.events):
                await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                tasks.append(asyncio.create_task(bench.send(emails[i % args.profiles], i // args.profiles)))
            await asyncio.gather(*tasks)
            final = {e: max(v for _, em, v in bench.accepted if em == e) for e in emails}
            await bench.wait_for(final, timeout=180)
            steady: dict[str, Any] = {"events": args.events, "profiles": args.profiles, "rate_per_s": args.rate,
                                      "accepted": len(bench.accepted)}
            for esp in ports:
                writes = await bench.writes(esp)
                latencies = []
                for at, email, version in bench.accepted:  # the first write holding this version or a newer one
                    done = next((ts for ts, v in writes.get(email, []) if v >= version and ts >= at - 0.001), None)
                    if done is not None:
                        latencies.append(done - at)
                p50, p99 = quantiles(latencies)
                steady[esp] = {"write_requests": await bench.requests(esp), "delivered": len(latencies),
                               "latency_p50_s": p50, "latency_p99_s": p99}
            result["steady"] = steady

            # Backlog: the sync is down while many profiles change; then it comes back.
            sync.terminate()
            sync.wait(timeout=30)
            for esp in ports:
                await bench.control(esp, "stats/reset", {})
            backlog = [f"b{n}-{prefix}@example.com" for n in range(args.backlog)]
            bench.accepted = []
            for start_at in range(0, len(backlog), 50):
                await asyncio.gather(*(bench.send(e, 1) for e in backlog[start_at:start_at + 50]))
            depth = admin.queue_depths(env.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), prefix)
            while depth.get(f"{prefix}.events", 0):
                await asyncio.sleep(0.5)
                depth = admin.queue_depths(env.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), prefix)
            await asyncio.sleep(2)  # the last merges finish
            restarted = time.time()
            sync = subprocess.Popen([*cli, "sync"], cwd=ROOT, env=env)
            done = await bench.wait_for({e: 1 for e in backlog}, timeout=600)
            result["backlog"] = {"profiles": len(backlog), "accepted": len(bench.accepted), **{
                esp: {"write_requests": await bench.requests(esp), "minimum_requests": math.ceil(len(backlog) / descriptor(esp).batch_limit),
                      "drain_s": round(done[esp] - restarted, 1) if esp in done else None}
                for esp in ports}}
    finally:
        for p in [sync, *reversed(processes)]:
            p.terminate()
        for p in [sync, *processes]:
            p.wait(timeout=20)
        mongo.terminate()
        admin.drop_queues(env.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), prefix)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
