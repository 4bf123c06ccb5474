"""Mailchimp: members of one audience (list), merge fields by tag, batches for backlogs."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.esps.base import Esp, EspDescriptor
from adapters.esps.fields import MappingEntry
from adapters.esps.guard import EspGuard
from adapters.esps.mailchimp.client import BATCH_LIMIT, KIND, Mailchimp
from adapters.esps.targets import EspTarget, TargetEnv

DEFAULT_FIELDS = {
    "first_name": "FNAME",
    "last_name": "LNAME",
    "lifetime_value": "LTV",
    "order_count": "ORDERS",
    "last_order_date": "LASTORDER",
    "loyalty_tier": "TIER",
}


class MailchimpEnv(TargetEnv):
    model_config = SettingsConfigDict(env_prefix="MERGETAG_MAILCHIMP_", extra="ignore")

    fields: Annotated[dict[str, MappingEntry], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("MERGETAG_MAILCHIMP_FIELDS", "MERGETAG_MERGE_FIELDS"))


def api_root(target: EspTarget) -> str:
    """Explicit (a sandbox, a proxy), or the data centre named by the key's suffix (``…-us6``)."""
    if target.base_url:
        return target.base_url.rstrip("/")
    return f"https://{target.key().rsplit('-', 1)[-1]}.api.mailchimp.com/3.0"


def client(target: EspTarget, name: str = KIND, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    if not target.audience:
        raise ValueError(f"ESP target {name}: a Mailchimp target needs its audience (list id, MERGETAG_MAILCHIMP_LIST_ID)")
    key = "" if offline and target.api_key is None else target.key()
    base = target.base_url or ("" if offline and not key else api_root(target))
    return Mailchimp(base_url=base, api_key=key, list_id=target.audience, merge_fields=target.fields, timeout=target.timeout_s,
                     guard=guard, name=name, job_timeout=target.job_timeout_s)


DESCRIPTOR = EspDescriptor(kind=KIND, client=client, env=MailchimpEnv, default_fields=DEFAULT_FIELDS, batch_limit=BATCH_LIMIT,
                           text_limit=255)  # a text merge field keeps at most 255 characters
