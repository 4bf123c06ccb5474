"""What every ESP sandbox shares: the ``/_sandbox`` controls and the request bookkeeping.

A sandbox subclasses :class:`SandboxBase` and provides:
  - ``routes(app)``: the ESP's own API routes;
  - ``admit(request)``: the ESP's auth and rate limits (a refusal response, or None to go on);
  - ``error(status, title, detail)``: an error in the ESP's own format.

Controls (never authenticated, never counted):
  ``POST /_sandbox/faults {"status", "count"}``   the next writes fail with that status (``{"clear": true}``: no more);
  ``POST /_sandbox/faults {"status", "every": n}``  one write in n fails with it (the n-th, the 2n-th…) until cleared;
  ``POST /_sandbox/faults {"status", "seconds"}``  every write fails with it for that long;
      each fault is the ESP's own error (``error``), so a 429 carries what the ESP sends with one;
  ``POST /_sandbox/outage {"seconds", "calls"}``  every API call answers 503 for that long, and until it
      refused ``calls`` of them (default 0; ``{"seconds": 0}`` ends an outage);
  ``POST /_sandbox/latency {"ms"}``               every API call waits that long;
  ``GET /_sandbox/stats``, ``POST /_sandbox/stats/reset``  requests per route, peak concurrency, faults given
      (by status, and ``outage``: calls refused by an outage);
  ``GET /_sandbox/history``                       every profile write: [unix time, email, fields after];
  ``GET /_sandbox/requests``                      every API request as received (for spec checks).
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RECORDED_HEADERS = ("content-type", "accept", "revision")


class SandboxBase(ABC):
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.writes_in_flight = 0
        self.max_writes_in_flight = 0
        self.requests: dict[str, int] = {}
        self.faults: list[int] = []
        self.fault_every: tuple[int, int] | None = None
        self.fault_until: tuple[int, float] | None = None
        self.writes_seen = 0
        self.faults_given: dict[str, int] = {}
        self.down_until = 0.0
        self.down_for_calls = 0
        self.latency_s = 0.0
        self.history: list[tuple[float, str, dict[str, Any]]] = []
        self.recorded: list[dict[str, Any]] = []

    @abstractmethod
    def routes(self, app: web.Application) -> None:
        """Add the ESP's own API routes."""

    async def admit(self, request: web.Request) -> web.StreamResponse | None:
        return None

    def error(self, status: int, title: str, detail: str) -> web.Response:
        return web.json_response({"status": status, "title": title, "detail": detail}, status=status)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self.routes(app)
        app.router.add_post("/_sandbox/faults", self._add_faults)
        app.router.add_post("/_sandbox/outage", self._outage)
        app.router.add_post("/_sandbox/latency", self._set_latency)
        app.router.add_get("/_sandbox/stats", self._stats)
        app.router.add_post("/_sandbox/stats/reset", self._reset_stats)
        app.router.add_get("/_sandbox/history", self._history)
        app.router.add_get("/_sandbox/requests", self._requests)
        return app

    def record_write(self, email: str, fields: dict[str, Any]) -> None:
        self.history.append((time.time(), email.lower(), dict(fields)))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sandbox/"):
            return await handler(request)
        body = await request.read()
        self.recorded.append({
            "method": request.method, "path": request.path, "query": request.query_string,
            "headers": {h: request.headers[h] for h in RECORDED_HEADERS if h in request.headers},
            "authorization": request.headers.get("Authorization", "").partition(" ")[0],
            "body": body.decode("utf-8", "replace") if body else None,
        })
        refused = await self.admit(request)
        if refused is not None:
            return refused
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        writing = request.method != "GET"
        if writing:
            self.writes_in_flight += 1
            self.max_writes_in_flight = max(self.max_writes_in_flight, self.writes_in_flight)
        try:
            resource = request.match_info.route.resource
            route = f"{request.method} {resource.canonical if resource else request.path}"
            self.requests[route] = self.requests.get(route, 0) + 1
            if time.time() < self.down_until or self.down_for_calls > 0:
                self.down_for_calls = max(0, self.down_for_calls - 1)
                self.faults_given["outage"] = self.faults_given.get("outage", 0) + 1
                return self.error(503, "Service Unavailable", "sandbox outage")
            status = self._fault() if writing else None
            if status is not None:
                self.faults_given[str(status)] = self.faults_given.get(str(status), 0) + 1
                return self.error(status, "Injected Fault", f"sandbox fault {status}")
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await handler(request)
        finally:
            self.in_flight -= 1
            if writing:
                self.writes_in_flight -= 1

    def _fault(self) -> int | None:
        """The status this write fails with, if a fault is due: counted ones first, then timed, then one in n."""
        self.writes_seen += 1
        if self.faults:
            return self.faults.pop(0)
        if self.fault_until is not None and time.time() < self.fault_until[1]:
            return self.fault_until[0]
        if self.fault_every is not None and self.writes_seen % self.fault_every[1] == 0:
            return self.fault_every[0]
        return None

    async def _add_faults(self, request: web.Request) -> web.Response:
        body = await json_body(request) or {}
        status = int(body.get("status", 503))
        if body.get("clear"):
            self.faults, self.fault_every, self.fault_until = [], None, None
        elif "every" in body:
            self.fault_every, self.writes_seen = (status, max(1, int(body["every"]))), 0
        elif "seconds" in body:
            self.fault_until = (status, time.time() + float(body["seconds"]))
        else:
            self.faults.extend([status] * int(body.get("count", 1)))
        return web.json_response({"pending_faults": len(self.faults), "every": self.fault_every and self.fault_every[1],
                                  "until": self.fault_until and self.fault_until[1]})

    async def _outage(self, request: web.Request) -> web.Response:
        body = await json_body(request) or {}
        self.down_until = time.time() + float(body.get("seconds", 60))
        self.down_for_calls = int(body.get("calls", 0))
        return web.json_response({"down_until": self.down_until})

    async def _set_latency(self, request: web.Request) -> web.Response:
        body = await json_body(request) or {}
        self.latency_s = float(body.get("ms", 0)) / 1000
        return web.json_response({"latency_ms": self.latency_s * 1000})

    async def _history(self, request: web.Request) -> web.Response:
        return web.json_response(self.history)

    async def _requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.recorded)

    async def _reset_stats(self, request: web.Request) -> web.Response:
        self.requests, self.max_in_flight, self.max_writes_in_flight = {}, self.in_flight, self.writes_in_flight
        self.faults_given = {}
        self.recorded = []
        return await self._stats(request)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "max_in_flight": self.max_in_flight,
                                  "max_writes_in_flight": self.max_writes_in_flight, "faults_given": self.faults_given,
                                  **self.extra_stats()})

    def extra_stats(self) -> dict[str, Any]:
        return {}


async def json_body(request: web.Request) -> Any:
    """The request's JSON, or None when it is not JSON."""
    try:
        return json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None


def serve(sandbox: SandboxBase, name: str, host: str, port: int) -> None:
    web.run_app(sandbox.app(), host=host, port=port, print=lambda *_: print(f"{name} sandbox on {host}:{port}", flush=True))
