"""The sync end to end: N events over M profiles at a steady rate, through the real processes.

Reports the ESP requests made against the minimum possible (ceil(changed profiles / 500)),
and the time from an event's acceptance (the receiver's 202) to the ESP holding it or a newer
value (p50, p99). Everything runs here: RabbitMQ and Redis on localhost, a SecantusDB, the
Mailchimp sandbox, the receiver, the worker and the sync. Prints one JSON object.

    python bench/sync_latency.py [--events 600] [--profiles 150] [--rate 60]
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

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.dev import free_port, start_secantus, wait_for_port  # noqa: E402
from adapters.sources.shopify import sign  # noqa: E402
from broker import admin  # noqa: E402

SECRET = "bench-secret"
KEY = "benchkey000000000000000000000000-us1"


def body(email: str, version: int) -> bytes:
    sample = json.loads((ROOT / "tests/fixtures/shopify/CustomersCreate.json").read_text())
    sample.update(email=email, first_name=f"v{version}", updated_at=f"2026-01-01T00:{version // 60:02d}:{version % 60:02d}Z",
                  admin_graphql_api_id=f"gid://shopify/Customer/{abs(hash(email)) % 10**12}")
    return json.dumps(sample).encode()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=600)
    parser.add_argument("--profiles", type=int, default=150)
    parser.add_argument("--rate", type=float, default=60.0, help="events per second")
    args = parser.parse_args()

    prefix = "sbench" + uuid.uuid4().hex[:6]
    mongo, uri = start_secantus()
    sandbox_port, receiver_port = free_port(), free_port()
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_SHOPIFY_SECRETS": SECRET, "MERGETAG_MAILCHIMP_API_KEY": KEY, "MERGETAG_LOG_LEVEL": "WARNING",
           "MERGETAG_MAILCHIMP_BASE_URL": f"http://127.0.0.1:{sandbox_port}/3.0", "MERGETAG_SYNC_GRACE_S": "2",
           "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5"}
    cli = [sys.executable, "-m", "adapters.cli"]
    processes = [subprocess.Popen([*cli, "sandbox", "mailchimp", "--port", str(sandbox_port), "--api-key", KEY], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL)]
    wait_for_port(sandbox_port, process=processes[0])
    processes += [subprocess.Popen([*cli, *c], cwd=ROOT, env=env) for c in (["worker"], ["sync"], ["receiver", "--port", str(receiver_port)])]
    wait_for_port(receiver_port, process=processes[-1])
    emails = [f"b{n}-{prefix}@example.com" for n in range(args.profiles)]
    accepted: list[tuple[float, str, int]] = []
    try:
        await asyncio.sleep(2)  # workers attach to their queues
        async with aiohttp.ClientSession() as http:
            async def send(i: int) -> None:
                email, data = emails[i % args.profiles], body(emails[i % args.profiles], i // args.profiles)
                headers = {"X-Shopify-Topic": "customers/update", "X-Shopify-Hmac-Sha256": sign(data, SECRET),
                           "X-Shopify-Webhook-Id": uuid.uuid4().hex}
                async with http.post(f"http://127.0.0.1:{receiver_port}/webhooks/shopify", data=data, headers=headers) as r:
                    if r.status == 202:
                        accepted.append((time.time(), email, i // args.profiles))

            start, tasks = time.monotonic(), []
            for i in range(args.events):  # a steady rate, not a burst
                await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
            final = {e: max(v for _, em, v in accepted if em == e) for e in emails}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                async with http.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/history") as r:
                    history = await r.json()
                latest = {}
                for _, email, fields in history:
                    latest[email] = fields.get("FNAME")
                if all(latest.get(e) == f"v{final[e]}" for e in emails):
                    break
                await asyncio.sleep(0.5)
            async with http.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/stats") as r:
                stats = await r.json()
    finally:
        for p in reversed(processes):
            p.terminate()
        for p in processes:
            p.wait(timeout=20)
        mongo.terminate()
        admin.drop_queues(env.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), prefix)

    writes = {}
    for ts, email, fields in history:
        writes.setdefault(email, []).append((ts, int(str(fields.get("FNAME", "v-1"))[1:])))
    latencies = []
    for at, email, version in accepted:  # first write holding this version or a newer one
        done = next((ts for ts, v in writes.get(email, []) if v >= version and ts >= at - 0.001), None)
        if done is not None:
            latencies.append(done - at)
    requests = sum(n for route, n in stats["requests"].items() if not route.startswith("GET"))
    minimum = math.ceil(len(writes) / 500)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0] * 99
    print(json.dumps({
        "events": args.events, "profiles": args.profiles, "rate_per_s": args.rate, "accepted": len(accepted),
        "profiles_updated": len(writes), "esp_requests": requests, "minimum_requests": minimum,
        "requests_per_event": round(requests / max(1, len(accepted)), 3),
        "latency_p50_s": round(q[49], 3), "latency_p99_s": round(q[98], 3), "delivered": len(latencies),
    }))


if __name__ == "__main__":
    asyncio.run(main())
