"""A backfill end to end: ``mergetag pull shopify --since 1970-01-01 --wait --json`` from a Shopify
sandbox holding N customers and M orders, through the real worker and sync, to the Mailchimp sandbox.

Everything runs here: RabbitMQ and Redis on localhost, a SecantusDB of its own (so the store's
request count is this backfill's alone), the Shopify and Mailchimp sandboxes, the worker and the
sync. Reports the command's summary (records, events/s, store requests per event, ESP write
requests against the minimum), its wall time, and the sandboxes' own counts as a cross-check.
Prints one JSON object as the last line of stdout; progress lines go to stderr.

    python bench/backfill.py [--customers 20000] [--orders 80000] [--leak 2] [--deadline 7200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker import admin  # noqa: E402
from sandboxes.local import free_port, start_secantus, wait_for_port  # noqa: E402
from sandboxes.shopify import API_VERSION  # noqa: E402

KEY = "benchkey000000000000000000000000-us1"
TOKEN = "shpat_bench"
AMQP = os.environ.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# The Mailchimp sandbox's routes that write members (the rest are job polls and reads).
WRITES = ("PUT /3.0/lists/{list_id}/members/{hash}", "POST /3.0/batches")


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/_sandbox/stats") as r:
        return await r.json()


def start(command: list[str], env: dict[str, str], port: int | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if port is not None:
        wait_for_port(port, process=process, timeout=120)
    return process


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--orders", type=int, default=80_000, help="spread round-robin over the customers")
    parser.add_argument("--leak", type=float, default=2.0, help="the Shopify bucket's requests per second (2: the standard plan)")
    parser.add_argument("--deadline", type=float, default=7200.0, help="seconds the pull may wait for the pipeline")
    args = parser.parse_args()

    prefix = "bfbench" + uuid.uuid4().hex[:6]
    mongo, uri = start_secantus()
    shop_port, mailchimp_port = free_port(), free_port()
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_AMQP_URL": AMQP, "MERGETAG_MAILCHIMP_API_KEY": KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           "MERGETAG_MAILCHIMP_BASE_URL": f"http://127.0.0.1:{mailchimp_port}/3.0", "MERGETAG_ESPS": "mailchimp",
           "MERGETAG_SHOPIFY_ADMIN_URL": f"http://127.0.0.1:{shop_port}/admin/api/{API_VERSION}", "MERGETAG_SHOPIFY_ADMIN_TOKEN": TOKEN,
           "MERGETAG_LOG_LEVEL": os.environ.get("MERGETAG_LOG_LEVEL", "WARNING"),
           "MERGETAG_SYNC_GRACE_S": "2", "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5",
           "MERGETAG_IDENTITY_HASH_KEYS": os.environ.get("MERGETAG_IDENTITY_HASH_KEYS", "bench-identity-hash-key-0123456789")}
    for name in ("MONGODB_URI", "MERGETAG_ESP_FILE"):
        env.pop(name, None)
    cli = [sys.executable, "-m", "adapters.cli"]
    began = time.monotonic()
    processes = [start([sys.executable, "-m", "sandboxes.shopify", "--port", str(shop_port), "--token", TOKEN, "--leak", str(args.leak),
                        "--demo-customers", str(args.customers), "--demo-orders", str(args.orders)], env, shop_port),
                 start([sys.executable, "-m", "sandboxes.mailchimp", "--port", str(mailchimp_port), "--api-key", KEY], env, mailchimp_port)]
    processes += [subprocess.Popen([*cli, c], cwd=ROOT, env=env) for c in ("worker", "sync")]
    result: dict[str, Any] = {"customers": args.customers, "orders": args.orders, "shopify_leak_per_s": args.leak}
    try:
        pulled = time.monotonic()
        out = await asyncio.to_thread(subprocess.run, [*cli, "pull", "shopify", "--since", "1970-01-01", "--wait", "--json",
                                                       "--deadline", str(args.deadline), "--progress-every", "20"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        result["pull_wall_s"] = round(time.monotonic() - pulled, 1)
        result["exit_code"] = out.returncode
        result["summary"] = json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else None
        shop, mailchimp = await stats(f"http://127.0.0.1:{shop_port}"), await stats(f"http://127.0.0.1:{mailchimp_port}")
        result["sandboxes"] = {"shopify": shop,
                               "mailchimp_write_requests": sum(mailchimp["requests"].get(route, 0) for route in WRITES)}
    finally:
        for p in reversed(processes):
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        mongo.terminate()
        admin.drop_queues(AMQP, prefix)
    result["bench_wall_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
