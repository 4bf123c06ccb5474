"""Sentry: alarms for the receiver and the workers, with personal data scrubbed.

Scrubbing happens in ``before_send`` over the whole event, because personal
data can hide anywhere (an exception message, a message body, a breadcrumb);
local variables are never attached.
"""

from __future__ import annotations

import re
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.aiohttp import AioHttpIntegration
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

from adapters.settings import Settings

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
PII_KEYS = {
    "email", "email_address", "contact_email", "phone", "first_name", "last_name", "name",
    "address1", "address2", "zip", "browser_ip", "ip", "abandoned_checkout_url", "url",
    "payload", "traits", "merge_fields", "authorization", "x-shopify-hmac-sha256", "query_string", "cookies",
}
REDACTED = "[Filtered]"


def scrub(value: Any) -> Any:
    """Redact PII keys and any email-shaped text, recursively."""
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in PII_KEYS else scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return EMAIL.sub(REDACTED, value)
    return value


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    return scrub(event)


def init_sentry(settings: Settings, component: str) -> bool:
    """Initialise the SDK when a DSN is configured. Must run before the Dramatiq broker is built."""
    if not settings.sentry_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        server_name=component,
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        event_scrubber=EventScrubber(denylist=[*DEFAULT_DENYLIST, *PII_KEYS], recursive=True),
        before_send=_before_send,
        before_breadcrumb=lambda crumb, hint: scrub(crumb),
        integrations=[AioHttpIntegration(), DramatiqIntegration()],
        traces_sample_rate=0.0,
    )
    sentry_sdk.set_tag("component", component)
    return True
