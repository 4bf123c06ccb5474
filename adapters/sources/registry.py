"""Which sources exist: the receiver's (with their secrets) and the workers' mappings (without)."""

from __future__ import annotations

from collections.abc import Callable

from adapters.settings import Settings, reveal
from adapters.sources import mailchimp, operator, sendgrid, shopify, tracking
from adapters.sources.base import Source
from adapters.sources.configured import ConfiguredSource, configured_mapping
from schemas.delivery import Delivery
from schemas.events import Event

EventMapping = Callable[[Delivery], list[Event]]
BUILT_IN: dict[str, EventMapping] = {
    shopify.NAME: shopify.to_events,
    tracking.NAME: tracking.to_events,
    sendgrid.NAME: sendgrid.to_events,
    mailchimp.NAME: mailchimp.to_events,
    operator.NAME: operator.to_events,
}


def build_sources(settings: Settings) -> dict[str, Source]:
    """Every source the receiver accepts; a built-in one only when its credentials are configured."""
    sources: dict[str, Source] = {shopify.NAME: shopify.ShopifySource(settings.all_shopify_secrets())}
    if settings.tracking_write_keys:
        sources[tracking.NAME] = tracking.TrackingSource(reveal(settings.tracking_write_keys))
    if settings.sendgrid_webhook_public_keys:
        sources[sendgrid.NAME] = sendgrid.SendGridSource(settings.sendgrid_webhook_public_keys, settings.signature_tolerance_s)
    if settings.mailchimp_webhook_secrets or settings.mandrill_webhook_keys:
        sources[mailchimp.NAME] = mailchimp.MailchimpSource(
            reveal(settings.mailchimp_webhook_secrets), reveal(settings.mandrill_webhook_keys), settings.mandrill_webhook_url
        )
    for name, config in settings.configured_sources().items():
        _check_name(name)
        sources[name] = ConfiguredSource(name, config)
    return sources


def build_mappings(settings: Settings) -> dict[str, EventMapping]:
    """Every source's mapping, for the workers: built-in ones always, configured ones by name."""
    mappings = dict(BUILT_IN)
    for name, config in settings.configured_sources().items():
        _check_name(name)
        mappings[name] = configured_mapping(name, config)
    return mappings


def _check_name(name: str) -> None:
    if name in BUILT_IN:
        raise ValueError(f"source name {name!r} is taken by a built-in source")
