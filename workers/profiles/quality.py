"""Data-quality checks: flag what is suspicious without rejecting it.

Each check is a pure function of one event, so the flags a profile carries are
a function of its events, like everything else in it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

from schemas.events import CheckoutChanged, Event, OrderCompleted

FUTURE_SLACK = timedelta(minutes=5)
TOO_OLD = timedelta(days=365 * 20)
IMPLAUSIBLE_AMOUNT = Decimal("100000")
STRICT_EMAIL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.[a-z]{2,}$")


def quality_flags(event: Event) -> tuple[str, ...]:
    """The flags ``event`` raises, sorted."""
    flags = []
    if event.event_time > event.received_at + FUTURE_SLACK:
        flags.append("event_time_in_future")
    if event.event_time < event.received_at - TOO_OLD:
        flags.append("event_time_too_old")
    email = event.identity.email
    if email is not None and not STRICT_EMAIL.match(email):
        flags.append("email_malformed")
    if isinstance(event, OrderCompleted | CheckoutChanged) and event.total >= IMPLAUSIBLE_AMOUNT:
        flags.append("amount_implausible")
    return tuple(sorted(flags))
