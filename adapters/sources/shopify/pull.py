"""Pulling changed customers and orders from the Shopify Admin REST API.

Pulled records become the same deliveries as webhooks (same topics, same
mapping, same content-derived event ids), so a record seen both ways has one
effect. The checkpoint lives in MongoDB and moves only after RabbitMQ confirmed
a page: ``cursor`` while a pull is under way (a restart resumes there),
``since`` once it finished (the next pull starts there, inclusive).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import aiohttp

from adapters.store.checkpoints import Checkpoints
from schemas.delivery import Delivery
from schemas.errors import SourceRefused, SourceUnavailable

log = logging.getLogger(__name__)

TOPICS = {"customers": "customers/update", "orders": "orders/updated"}
# Shopify lists only open orders unless asked for every status: closed and cancelled ones matter too
# (a cancellation must stop counting toward the lifetime value).
FILTERS = {"orders": {"status": "any"}}
LINK = re.compile(r'<([^>]+)>;\s*rel="?([a-z]+)"?')
EPOCH = "1970-01-01T00:00:00+00:00"
SKEW = timedelta(minutes=5)


def next_link(header: str | None) -> str | None:
    """The ``rel="next"`` URL of a Link header (Shopify separates links with ``", "``)."""
    for url, rel in LINK.findall(header or ""):
        if rel == "next":
            return url
    return None


def call_limit(header: str | None) -> tuple[int, int] | None:
    try:
        used, limit = (header or "").split("/")
        return int(used), int(limit)
    except ValueError:
        return None


@dataclass
class PullResult:
    resource: str
    pages: int
    records: int
    since: str


class ShopifyPuller:
    """Parameters:
      admin_url: ``https://<shop>.myshopify.com/admin/api/<version>`` (or the sandbox's).
      token: the Admin API access token.
      publish: confirms one delivery into the queue (the receiver's publisher path).
      checkpoints: where progress is kept.
      page_size: records per request (at most 250).
      headroom: fraction of the leaky bucket left free for other API clients of the shop.
    """

    def __init__(self, admin_url: str, token: str, *, publish: Callable[[Delivery], Awaitable[Any]], checkpoints: Checkpoints,
                 page_size: int = 250, headroom: float = 0.5, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._base = admin_url.rstrip("/")
        self._headers = {"X-Shopify-Access-Token": token, "Accept": "application/json"}
        self._publish = publish
        self._checkpoints = checkpoints
        self._page_size = page_size
        self._headroom = headroom
        self._sleep = sleep

    async def pull(self, resource: str, since: str | None = None, max_pages: int | None = None,
                   on_page: Callable[[str, int], None] | None = None) -> PullResult:
        """Pull ``resource`` changed since ``since`` (default: the checkpoint), page by page.

        ``on_page(resource, records)`` is called after each page was confirmed into the queue and
        checkpointed (progress displays).

        The next pull starts where this one started (less a clock-skew margin): a record changed
        while this pull paged past it is fetched again next time, never skipped. Re-fetching is
        harmless: pulled records name the same events as before.
        """
        key = f"shopify:{resource}"
        state = await self._checkpoints.get(key) or {}
        if since is not None:
            state = {"since": since}
        start = state.get("since") or EPOCH
        began = state.get("began") or (datetime.now(timezone.utc) - SKEW).isoformat()
        first = f"{self._base}/{resource}.json?" + urlencode({"limit": self._page_size, "updated_at_min": start,
                                                                **FILTERS.get(resource, {})})
        url = state.get("cursor") or first
        pages = records = 0
        async with aiohttp.ClientSession(headers=self._headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
            while url and (max_pages is None or pages < max_pages):
                try:
                    body, link = await self._get(session, url)
                except SourceUnavailable as exc:
                    if url == first or not isinstance(exc, SourceRefused):
                        raise
                    log.warning("stored cursor refused; restarting the pull from %s", start)
                    url = first
                    continue
                rows = body.get(resource, [])
                received = datetime.now(timezone.utc)
                await asyncio.gather(*(self._publish(self._delivery(resource, row, received)) for row in rows))
                url = next_link(link)
                pages, records = pages + 1, records + len(rows)
                await self._checkpoints.put(key, {"since": start, "cursor": url, "began": began} if url else {"since": began})
                if on_page is not None:
                    on_page(resource, len(rows))
        log.info("pulled %d %s in %d page(s)", records, resource, pages)
        return PullResult(resource, pages, records, began if not url else start)

    async def _get(self, session: aiohttp.ClientSession, url: str) -> tuple[dict[str, Any], str | None]:
        for attempt in range(8):
            try:
                async with session.get(url) as response:
                    if response.status == 429:
                        await self._sleep(float(response.headers.get("Retry-After", "2")))
                        continue
                    if response.status >= 500:
                        await self._sleep(min(30, 2 ** attempt))
                        continue
                    if response.status >= 400:
                        raise SourceRefused(f"shopify {response.status}")
                    body = await response.json()
                    await self._pace(response.headers.get("X-Shopify-Shop-Api-Call-Limit"))
                    return body, response.headers.get("Link")
            except (aiohttp.ClientError, TimeoutError):
                await self._sleep(min(30, 2 ** attempt))
        raise SourceUnavailable("shopify did not answer after 8 attempts")

    async def _pace(self, header: str | None) -> None:
        """Stay under the bucket: past the headroom, wait for it to drain (2 requests/s on the standard plan)."""
        limits = call_limit(header)
        if limits is None:
            return
        used, capacity = limits
        allowed = capacity * (1 - self._headroom)
        if used > allowed:
            await self._sleep((used - allowed) / 2.0)

    @staticmethod
    def _delivery(resource: str, row: dict[str, Any], received: datetime) -> Delivery:
        key = f"pull:{resource}:{row.get('id')}:{row.get('updated_at')}"
        return Delivery(source="shopify", topic=TOPICS[resource], delivery_id=key, dedup_key=f"shopify:{key}",
                        received_at=received, meta={"pulled": "true"}, payload=row)
