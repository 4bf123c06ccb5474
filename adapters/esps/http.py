"""One request path for every ESP call: the account's guard, timeouts, and the mapping of
every failure to retryable (EspUnavailable) or permanent (EspRejected), with a detail that
never carries personal data.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from adapters.esps.guard import EspGuard
from schemas.errors import EspMisconfigured, EspRejected, EspTimeout, EspUnavailable

ACCOUNT_ERRORS = {401, 403}


class EspHttp:
    """Parameters:
      name: the ESP, for error details.
      base_url: API root.
      headers: sent with every request (auth, versions).
      timeout: seconds per request.
      guard: the account's shared guard; None for a one-off (tests, CLI checks).
      describe: (status, body) -> the safe part of the ESP's error body.
      rate: response headers -> (remaining, seconds until reset), when the ESP sends them.
    """

    def __init__(self, name: str, base_url: str, headers: Mapping[str, str], *, timeout: float, guard: EspGuard | None,
                 describe: Callable[[int, dict[str, Any]], str],
                 rate: Callable[[Mapping[str, str]], tuple[int | None, float | None]] | None = None) -> None:
        self.name = name
        self.base = base_url.rstrip("/")
        self.guard = guard
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._describe = describe
        self._rate = rate
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, body: Any = None, *, bucket: str = "default", gone_ok: bool = False,
                      content_type: str = "application/json", account_errors: frozenset[int] = frozenset(ACCOUNT_ERRORS)
                      ) -> tuple[int, dict[str, Any] | None]:
        """One API call through the guard; returns (status, JSON body or None).

        Parameters:
          gone_ok: a 404 means "already as wanted" (returns (404, None)) rather than an error.
          account_errors: statuses that mean the account, not the member, is wrong (retried and
            alarmed until fixed, never dead-lettered member by member).
        Raises:
          EspUnavailable: timeouts (``esp_timeout``: the request may still land), connection
            errors, 429, 5xx, account errors (``esp_misconfigured``), a closed circuit.
          EspRejected: any other 4xx.
        """
        if self.guard is None:
            return await self._send(method, path, body, gone_ok, content_type, account_errors)
        async with self.guard.call(bucket, kind=method):
            return await self._send(method, path, body, gone_ok, content_type, account_errors, bucket)

    async def _send(self, method: str, path: str, body: Any, gone_ok: bool, content_type: str,
                    account_errors: frozenset[int], bucket: str = "default") -> tuple[int, dict[str, Any] | None]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        url = path if path.startswith("http") else self.base + path
        headers = {"Content-Type": content_type} if body is not None else {}
        started = time.perf_counter()
        try:
            async with self._session.request(method, url, json=body, headers=headers) as response:
                status, headers_in = response.status, response.headers
                self._observed(method, status, started)
                if self._rate is not None and self.guard is not None:
                    await self.guard.rate_seen(*self._rate(headers_in), bucket=bucket)
                if gone_ok and status == 404:
                    return status, None
                parsed = await _json(response)
        except TimeoutError:
            self._observed(method, "timeout", started)
            # The request may still be applied late: the caller must not let another send overtake it.
            raise EspTimeout(f"{self.name} timed out") from None
        except aiohttp.ClientError as exc:
            self._observed(method, "unreachable", started)
            raise EspUnavailable(f"{self.name} unreachable: {type(exc).__name__}") from None
        if status < 300:
            return status, parsed
        detail = f"{self.name} {status} {self._describe(status, parsed or {})}".strip()
        if status == 429 or status >= 500:
            raise EspUnavailable(detail, retry_after=retry_after(headers_in))
        if status in account_errors:
            raise EspMisconfigured(detail)
        raise EspRejected(detail)

    def _observed(self, method: str, status: int | str, started: float) -> None:
        if self.guard is not None and self.guard.observe is not None:
            self.guard.observe(method, status, time.perf_counter() - started)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (delta form), when sent."""
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def seconds_until(epoch: str | None) -> float | None:
    """A reset given as a Unix time, as seconds from now."""
    try:
        return max(0.0, float(epoch) - time.time()) if epoch else None
    except ValueError:
        return None


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any] | None:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return None
    return body if isinstance(body, dict) else None


async def wait_for_job(check: Callable[[], Awaitable[bool]], timeout_s: float, name: str) -> None:
    """Poll an asynchronous bulk job until ``check`` says it finished; nothing counts as sent before.

    Polls quickly at first, then every few seconds (each poll spends rate budget); the first poll
    waits a first delay too, since no job is done the moment it is accepted.
    Raises EspUnavailable(``esp_timeout``) after ``timeout_s``: the job may still finish, so the
    caller keeps its send lease until it runs out rather than letting another send overtake it.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        if await check():
            return
        if time.monotonic() >= deadline:
            raise EspTimeout(f"{name} bulk job still running after {timeout_s:.0f}s")
        delay = min(5.0, delay * 1.5)


def chunks_by_size(items: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Consecutive chunks whose JSON stays under ``limit`` bytes (bulk endpoints cap the request size)."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for item in items:
        n = len(json.dumps(item, separators=(",", ":")))
        if chunks[-1] and size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n + 1
    return [c for c in chunks if c]


async def download(url: str, name: str, timeout: float) -> bytes:
    """A result file behind a pre-signed URL (Mailchimp batch results, SendGrid errors files).

    Fetched without the API key: a key must never travel to another host, and such hosts refuse
    a second credential anyway. Raises EspUnavailable when it cannot be had.
    """
    if not url:
        raise EspUnavailable(f"{name} finished without a results URL")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as plain:
            async with plain.get(url) as response:
                if response.status != 200:
                    raise EspUnavailable(f"{name} results file answered {response.status}")
                return await response.read()
    except (aiohttp.ClientError, TimeoutError):
        raise EspUnavailable(f"{name} results file unreachable") from None
