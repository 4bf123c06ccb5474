"""The send-time feed next to a bare aiohttp handler returning the same JSON, in the same run.

Both run as their own processes; one load generator (its own process too) sends GET requests over
``--concurrency`` connections. Three phases against the feed — a warm cache (every profile cached
by the merge's writes), a cold cache (every read a miss: the store once, then the fill) — and one
against the bare handler. ``ratio``: warm feed requests/s over bare requests/s, both at saturation.
``p50_ms``/``p99_ms``: the warm feed's latency at a steady offered rate of half the bare handler's
saturated rate over the same connections (latency at saturation is only the queue: 64 requests in
flight at R per second wait 64/R seconds by Little's law; it is reported as ``saturated_p99_ms``).
Prints one JSON object.

    python bench/feed_latency.py [--profiles 2000] [--requests 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandboxes.local import free_port, start_secantus, wait_for_port  # noqa: E402

TOKEN = "bench-feed-token"

# On the feed's own event loop (uvloop), so the ratio is the feed's work, not the loop's.
BARE = """
import sys
import uvloop
from aiohttp import web
BODY = open(sys.argv[2], "rb").read()
async def handle(request):
    return web.Response(body=BODY, content_type="application/json", headers={"ETag": '"bench"', "Cache-Control": "private, max-age=60"})
app = web.Application()
app.router.add_get("/feed/v1/{target}/{ref}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop())
"""

LOAD = """
import asyncio, json, sys, time
import aiohttp

async def main(urls, concurrency, rate, token):
    latencies, statuses = [], {}
    queue = list(reversed(urls))
    interval = concurrency / rate if rate else 0.0
    started = time.perf_counter()

    async def client(session, i):
        next_at = started + (i / concurrency) * interval
        while queue:
            url = queue.pop()
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            sent = time.perf_counter()
            async with session.get(url, headers={"Authorization": "Bearer " + token}) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            latencies.append(time.perf_counter() - sent)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    print(json.dumps({"rps": len(urls) / elapsed, "latencies": latencies, "statuses": statuses}))

spec = json.load(sys.stdin)
asyncio.run(main(spec["urls"], spec["concurrency"], spec["rate"], spec["token"]))
"""


def load(urls: list[str], concurrency: int, rate: float | None = None) -> dict:
    """Run the load generator in a process of its own (it must not share a core with what it measures)."""
    out = subprocess.run([sys.executable, "-c", LOAD], input=json.dumps({"urls": urls, "concurrency": concurrency, "rate": rate, "token": TOKEN}),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def cuts(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100)
    return round(q[49] * 1000, 2), round(q[98] * 1000, 2)


async def prepare(profiles: int) -> tuple[list[str], bytes]:
    """``profiles`` profiles written through the store as the merge writes them (so the cache is filled
    by the same hooks); returns their emails and one feed answer (the bare handler's body)."""
    from adapters.settings import Settings
    from adapters.store.writes import Save
    from schemas.profile import Profile, Trait
    from workers.runtime import close_runtime, create_runtime

    rt = await create_runtime(Settings())
    emails = [f"feed-{i}@example.com" for i in range(profiles)]
    at = "2026-01-01T00:00:00+00:00"
    saves = []
    for email in emails:
        profile = Profile(id=rt.hasher.profile_id(f"email:{email}"), email=email, identifiers={"email": (email,)},
                          traits={"first_name": Trait(value="Ada", source="shopify", event_time=at, event_id="e1"),
                                  "last_name": Trait(value="Lovelace", source="shopify", event_time=at, event_id="e1")})
        saves.append(Save(profile, None, rt.members(profile)))
    for i in range(0, len(saves), 500):
        assert all(await rt.store.save_many(saves[i:i + 500]))
    member = rt.members(saves[0].profile)["mailchimp"]
    fields = rt.esps["mailchimp"].fields(member[0])
    body = json.dumps({"target": "mailchimp", "hash": member[1], "fields": fields}, separators=(",", ":")).encode()
    await close_runtime(rt)
    return emails, body


async def drop_cache(prefix: str) -> None:
    import redis.asyncio as redis

    r = redis.Redis.from_url(os.environ.get("MERGETAG_REDIS_URL", "redis://127.0.0.1:6379/0"))
    keys = [k async for k in r.scan_iter(f"{prefix}:feed:*", count=1000)]
    for i in range(0, len(keys), 1000):
        await r.delete(*keys[i:i + 1000])
    await r.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    secantus, uri = (None, os.environ["MONGODB_URI"]) if os.environ.get("MONGODB_URI") else start_secantus()
    prefix = "feedbench" + uuid.uuid4().hex[:6]
    os.environ.update(MERGETAG_MONGODB_URI=uri, MERGETAG_MONGODB_DATABASE=prefix, MERGETAG_QUEUE_PREFIX=prefix)
    os.environ.setdefault("MERGETAG_IDENTITY_HASH_KEYS", "bench-identity-hash-key-0123456789")
    os.environ.setdefault("MERGETAG_MAILCHIMP_API_KEY", "bench0000000000000000000000000000-us1")
    os.environ.setdefault("MERGETAG_MAILCHIMP_LIST_ID", "bench")
    os.environ["MERGETAG_FEED_TOKENS"] = json.dumps({"bench": {"token": TOKEN, "targets": ["mailchimp"], "rate_per_s": 10**9}})
    os.environ.pop("MONGODB_URI", None)
    emails, body = await prepare(args.profiles)
    body_file = Path(f"/tmp/{prefix}.json")
    body_file.write_bytes(body)

    feed_port, bare_port = free_port(), free_port()
    env = {**os.environ, "MERGETAG_LOG_LEVEL": "WARNING"}
    feed = subprocess.Popen([sys.executable, "-m", "adapters.cli", "feed", "--host", "127.0.0.1", "--port", str(feed_port)], cwd=ROOT, env=env)
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port), str(body_file)])
    try:
        wait_for_port(feed_port, process=feed)
        wait_for_port(bare_port, process=bare)
        rng = random.Random(7)
        refs = [rng.choice(emails) for _ in range(args.requests)]
        urls = {name: [f"http://127.0.0.1:{port}/feed/v1/mailchimp/{ref}" for ref in refs] for name, port in (("feed", feed_port), ("bare", bare_port))}
        load(urls["feed"][:1000], args.concurrency)  # warm-up of both processes and their connections
        load(urls["bare"][:1000], args.concurrency)
        warm, bare_run = [], []
        for _ in range(2):  # alternating, so a noisy neighbour hits both alike
            warm.append(load(urls["feed"], args.concurrency))
            bare_run.append(load(urls["bare"], args.concurrency))
        warm_rps, bare_rps = statistics.median(r["rps"] for r in warm), statistics.median(r["rps"] for r in bare_run)
        steady_rate = bare_rps / 2
        steady = load(urls["feed"][: max(2000, int(steady_rate * 5))], args.concurrency, rate=steady_rate)
        bare_steady = load(urls["bare"][: max(2000, int(steady_rate * 5))], args.concurrency, rate=steady_rate)
        await drop_cache(prefix)
        cold_urls = [f"http://127.0.0.1:{feed_port}/feed/v1/mailchimp/{e}" for e in emails]  # each profile once: every read a miss
        cold = load(cold_urls, args.concurrency)
        warm_statuses = warm[-1]["statuses"]
    finally:
        feed.terminate()
        bare.terminate()
        feed.wait()
        bare.wait()
        body_file.unlink(missing_ok=True)
        await drop_cache(prefix)
        if secantus is not None:
            secantus.terminate()
            secantus.wait()

    p50, p99 = cuts(steady["latencies"])
    sat50, sat99 = cuts([x for r in warm for x in r["latencies"]])
    cold50, cold99 = cuts(cold["latencies"])
    bare50, bare99 = cuts(bare_steady["latencies"])
    print(json.dumps({
        "feed_rps": round(warm_rps, 1),
        "bare_rps": round(bare_rps, 1),
        "ratio": round(warm_rps / bare_rps, 3),
        "p50_ms": p50,
        "p99_ms": p99,
        "latency_rate_rps": round(steady_rate, 1),
        "achieved_rate_rps": round(steady["rps"], 1),
        "bare_p50_ms_at_rate": bare50,
        "bare_p99_ms_at_rate": bare99,
        "saturated_p50_ms": sat50,
        "saturated_p99_ms": sat99,
        "cold_rps": round(cold["rps"], 1),
        "cold_p50_ms": cold50,
        "cold_p99_ms": cold99,
        "warm_statuses": warm_statuses,
        "cold_statuses": cold["statuses"],
        "concurrency": args.concurrency,
        "profiles": args.profiles,
        "requests_per_round": args.requests,
    }))


if __name__ == "__main__":
    asyncio.run(main())
