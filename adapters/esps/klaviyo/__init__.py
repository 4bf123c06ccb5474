"""Klaviyo: profiles by email (JSON:API), bulk import jobs for backlogs, per-endpoint rate windows."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from adapters.esps.base import Esp, EspDescriptor
from adapters.esps.guard import EspGuard
from adapters.esps.klaviyo.client import BATCH_LIMIT, KIND, RATES, Klaviyo
from adapters.esps.targets import EspTarget, TargetEnv

BASE_URL = "https://a.klaviyo.com"
DEFAULT_FIELDS = {
    "first_name": "first_name",
    "last_name": "last_name",
    "lifetime_value": "lifetime_value",
    "order_count": "order_count",
    "last_order_date": "last_order_date",
    "loyalty_tier": "loyalty_tier",
}


class KlaviyoEnv(TargetEnv):
    model_config = SettingsConfigDict(env_prefix="MERGETAG_KLAVIYO_", extra="ignore")


def client(target: EspTarget, name: str = KIND, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    key = "" if offline and target.api_key is None else target.key()
    return Klaviyo(base_url=target.base_url or BASE_URL, api_key=key, fields=target.fields, list_id=target.audience,
                   timeout=target.timeout_s, job_timeout=target.job_timeout_s, guard=guard, name=name)


DESCRIPTOR = EspDescriptor(kind=KIND, client=client, env=KlaviyoEnv, default_fields=DEFAULT_FIELDS, batch_limit=BATCH_LIMIT, rates=RATES)
