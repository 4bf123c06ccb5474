"""SendGrid Marketing Campaigns: contacts by email, every write an import job, custom fields by id."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from adapters.esps.base import Esp, EspDescriptor
from adapters.esps.guard import EspGuard
from adapters.esps.sendgrid.client import BATCH_LIMIT, KIND, SendGrid
from adapters.esps.targets import EspTarget, TargetEnv

BASE_URL = "https://api.sendgrid.com"
DEFAULT_FIELDS = {
    "first_name": "first_name",
    "last_name": "last_name",
    "lifetime_value": "ltv",
    "order_count": "orders",
    "last_order_date": "last_order",
    "loyalty_tier": "tier",
}


class SendGridEnv(TargetEnv):
    model_config = SettingsConfigDict(env_prefix="MERGETAG_SENDGRID_", extra="ignore")


def client(target: EspTarget, name: str = KIND, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    key = "" if offline and target.api_key is None else target.key()
    return SendGrid(base_url=target.base_url or BASE_URL, api_key=key, fields=target.fields, list_id=target.audience,
                    timeout=target.timeout_s, job_timeout=target.job_timeout_s, guard=guard, name=name)


# Every write is an import job, even for one contact: syncs take other due profiles along, and a
# single send's lease covers the job it waits for.
# The reserved fields' lengths (longer values refuse the whole contact).
TEXT_LIMITS = {"first_name": 50, "last_name": 50, "address_line_1": 100, "address_line_2": 100, "city": 60,
               "state_province_region": 50, "country": 50}

DESCRIPTOR = EspDescriptor(kind=KIND, client=client, env=SendGridEnv, default_fields=DEFAULT_FIELDS, batch_limit=BATCH_LIMIT,
                           prefers_bulk=SendGrid.prefers_bulk, single_sends_wait_for_jobs=True,
                           text_limits=TEXT_LIMITS)
