"""A Shopify Admin REST sandbox: customers and orders behind Shopify's real pull contract.

Enforced: ``X-Shopify-Access-Token``; ``updated_at_min`` filtering; orders by
``status`` as Shopify has it (``open`` by default: neither closed nor cancelled;
``closed``, ``cancelled``, ``any``); cursor pagination through the ``Link`` header
(``rel="next"``/``rel="previous"``), the filters kept in the cursor, with
only ``limit`` and ``fields`` allowed next to ``page_info``; ``limit`` at most 250;
a leaky bucket per token (40 requests, draining 2/s, both settable) reported in
``X-Shopify-Shop-Api-Call-Limit``, and 429 with ``Retry-After`` when it is full.
State lives in memory; ``POST /_sandbox/{customers|orders}`` adds records.

Run: ``python -m sandboxes.shopify --port 8082``.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

API_VERSION = "2024-10"
RESOURCES = ("customers", "orders")
ORDER_STATUSES = {
    "open": lambda order: not order.get("closed_at") and not order.get("cancelled_at"),
    "closed": lambda order: bool(order.get("closed_at")),
    "cancelled": lambda order: bool(order.get("cancelled_at")),
    "any": lambda order: True,
}


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class LeakyBucket:
    def __init__(self, capacity: int, leak_per_s: float) -> None:
        self.capacity, self.leak = capacity, leak_per_s
        self.level, self.at = 0.0, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.at) * self.leak)
        self.at = now
        if self.level + 1 > self.capacity:
            return False
        self.level += 1
        return True


class ShopifySandbox:
    def __init__(self, token: str, capacity: int = 40, leak_per_s: float = 2.0) -> None:
        self.token = token
        self.records: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RESOURCES}
        self.bucket = LeakyBucket(capacity, leak_per_s)
        self.stats = {"requests": 0, "throttled": 0}
        self._sorted: dict[str, list[dict[str, Any]] | None] = {r: None for r in RESOURCES}

    def ordered(self, resource: str) -> list[dict[str, Any]]:
        """Records in listing order, sorted once per change (a backfill pages through tens of thousands)."""
        if self._sorted[resource] is None:
            self._sorted[resource] = sorted(self.records[resource].values(), key=lambda r: (r["updated_at_sort"], r["id"]))
        return self._sorted[resource]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"/admin/api/{API_VERSION}/{{resource}}.json", self.list)
        app.router.add_post("/_sandbox/{resource}", self.add)
        app.router.add_get("/_sandbox/stats", self.get_stats)
        return app

    async def list(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        if resource not in RESOURCES:
            return web.json_response({"errors": "Not Found"}, status=404)
        if request.headers.get("X-Shopify-Access-Token") != self.token:
            return web.json_response({"errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"}, status=401)
        self.stats["requests"] += 1
        if not self.bucket.take():
            self.stats["throttled"] += 1
            return web.json_response({"errors": "Exceeded 2 calls per second for api client. Reduce request rates to resume uninterrupted service."},
                                     status=429, headers={"Retry-After": "1.0"})
        limit_header = {"X-Shopify-Shop-Api-Call-Limit": f"{int(self.bucket.level)}/{self.bucket.capacity}"}
        query = request.query
        try:
            limit = int(query.get("limit", 50))
        except ValueError:
            return web.json_response({"errors": {"limit": "Expected Integer"}}, status=400, headers=limit_header)
        if not 1 <= limit <= 250:
            return web.json_response({"errors": {"limit": "must be between 1 and 250"}}, status=400, headers=limit_header)
        if "page_info" in query:
            extra = set(query) - {"page_info", "limit", "fields"}
            if extra:
                return web.json_response({"errors": {"page_info": f"page_info cannot be passed with {', '.join(sorted(extra))}"}},
                                         status=400, headers=limit_header)
            try:
                cursor = json.loads(base64.urlsafe_b64decode(query["page_info"]))
            except ValueError:
                return web.json_response({"errors": {"page_info": "Invalid value."}}, status=400, headers=limit_header)
            since, after, direction = cursor["since"], tuple(cursor["after"]) if cursor["after"] else None, cursor["dir"]
            status = cursor.get("status")
        else:
            since, after, direction = query.get("updated_at_min"), None, "next"
            status = query.get("status", "open") if resource == "orders" else None
        if status is not None and status not in ORDER_STATUSES:
            return web.json_response({"errors": {"status": "Invalid value."}}, status=400, headers=limit_header)
        rows = self.ordered(resource)
        if status is not None:
            rows = [r for r in rows if ORDER_STATUSES[status](r)]
        if since:
            try:
                floor = _parse(since)
            except ValueError:
                return web.json_response({"errors": {"updated_at_min": "Invalid date"}}, status=400, headers=limit_header)
            rows = [r for r in rows if r["updated_at_sort"] >= floor.timestamp()]
        keys = [(r["updated_at_sort"], r["id"]) for r in rows]
        if direction == "next":
            start = 0 if after is None else next((i for i, k in enumerate(keys) if k > after), len(keys))
        else:
            end = next((i for i, k in enumerate(keys) if k >= after), len(keys))
            start = max(0, end - limit)
        page = rows[start:start + limit]
        links = []
        base = f"{request.scheme}://{request.host}{request.path}"
        if start + limit < len(rows) and page:
            links.append(f'<{base}?limit={limit}&page_info={self._cursor(since, status, page[-1], "next")}>; rel="next"')
        if start > 0 and page:
            links.append(f'<{base}?limit={limit}&page_info={self._cursor(since, status, page[0], "previous")}>; rel="previous"')
        headers = dict(limit_header)
        if links:
            headers["Link"] = ", ".join(links)
        body = [{k: v for k, v in r.items() if k != "updated_at_sort"} for r in page]
        return web.json_response({resource: body}, headers=headers)

    @staticmethod
    def _cursor(since: str | None, status: str | None, row: dict[str, Any], direction: str) -> str:
        raw = json.dumps({"since": since, "status": status, "after": [row["updated_at_sort"], row["id"]], "dir": direction})
        return base64.urlsafe_b64encode(raw.encode()).decode()

    async def add(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        if resource not in RESOURCES:
            return web.json_response({"errors": "Not Found"}, status=404)
        records = await request.json()
        for record in records:
            record["updated_at_sort"] = _parse(record["updated_at"]).timestamp()
            self.records[resource][str(record["id"])] = record
        self._sorted[resource] = None
        return web.json_response({"count": len(self.records[resource])})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)


def demo_customers(n: int, start: datetime | None = None) -> list[dict[str, Any]]:
    """``n`` customers in Shopify's shape, one minute apart (for local runs and benchmarks)."""
    start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [
        {"id": 7_000_000_000_000 + i, "admin_graphql_api_id": f"gid://shopify/Customer/{7_000_000_000_000 + i}",
         "email": f"pulled-{i}@example.com", "first_name": f"Pat{i}", "last_name": "Pulled",
         "created_at": _iso(start), "updated_at": _iso(start + timedelta(minutes=i)), "orders_count": 0, "tags": ""}
        for i in range(n)
    ]


def demo_orders(n: int, customers: int, start: datetime | None = None) -> list[dict[str, Any]]:
    """``n`` orders in Shopify's shape, spread round-robin over the first ``customers`` of
    :func:`demo_customers` (each carries its customer), one second apart; every tenth is closed."""
    start = start or datetime(2026, 2, 1, tzinfo=timezone.utc)
    orders = []
    for i in range(n):
        c = i % customers
        at = _iso(start + timedelta(seconds=i))
        customer = {"id": 7_000_000_000_000 + c, "admin_graphql_api_id": f"gid://shopify/Customer/{7_000_000_000_000 + c}",
                    "email": f"pulled-{c}@example.com"}
        orders.append({"id": 5_500_000_000_000 + i, "admin_graphql_api_id": f"gid://shopify/Order/{5_500_000_000_000 + i}",
                       "email": customer["email"], "customer": customer, "name": f"#{1000 + i}", "total_price": f"{10 + i % 90}.00",
                       "currency": "EUR", "closed_at": at if i % 10 == 0 else None, "cancelled_at": None, "created_at": at, "updated_at": at,
                       "line_items": [{"product_id": 900 + i % 7, "title": f"Item {i % 7}", "product_type": "demo",
                                       "price": f"{10 + i % 90}.00", "quantity": 1}]})
    return orders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Shopify Admin REST sandbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--token", default="shpat_sandbox")
    parser.add_argument("--capacity", type=int, default=40)
    parser.add_argument("--leak", type=float, default=2.0)
    parser.add_argument("--demo-customers", type=int, default=0)
    parser.add_argument("--demo-orders", type=int, default=0, help="orders of the demo customers (needs --demo-customers)")
    args = parser.parse_args(argv)
    sandbox = ShopifySandbox(args.token, args.capacity, args.leak)
    demo = {"customers": demo_customers(args.demo_customers),
            "orders": demo_orders(args.demo_orders, args.demo_customers) if args.demo_customers else []}
    for resource, records in demo.items():
        for record in records:
            record["updated_at_sort"] = _parse(record["updated_at"]).timestamp()
            sandbox.records[resource][str(record["id"])] = record
    web.run_app(sandbox.app(), host=args.host, port=args.port, print=lambda *_: print(f"shopify sandbox on {args.host}:{args.port}", flush=True))


if __name__ == "__main__":
    main()
