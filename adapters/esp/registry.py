"""Builds each configured ESP target's client and its account's shared guard."""

from __future__ import annotations

from adapters.esp import klaviyo
from adapters.esp.base import Esp
from adapters.esp.guard import EspGuard, account_id
from adapters.esp.klaviyo import Klaviyo
from adapters.esp.mailchimp import Mailchimp
from adapters.esp.sendgrid import SendGrid
from adapters.esp.targets import EspTarget
from adapters.settings import Settings

# Longer waits for room at the ESP give the message back (retried later, not counted as an attempt)
# instead of holding a worker that other ESPs could use.
GUARD_WAIT_S = 2.0
DEFAULT_RATES = {"mailchimp": None, "klaviyo": klaviyo.RATES, "sendgrid": None}
BATCH_LIMITS = {"mailchimp": Mailchimp.batch_limit, "klaviyo": Klaviyo.batch_limit, "sendgrid": SendGrid.batch_limit}


def build_guard(target: EspTarget, settings: Settings, wait_s: float | None = None) -> EspGuard:
    """The guard of the target's account (targets sharing a key share it), kept in Redis.

    ``wait_s``: how long a call may wait for room (default: briefly; a batch job like reconciliation
    can afford to wait for the rate windows instead).
    """
    rates = target.rates if target.rates is not None else DEFAULT_RATES[target.kind]
    return EspGuard(settings.redis_url, account_id(target.kind, target.key()), target.max_connections,
                    settings.esp_circuit_failures, settings.esp_circuit_open_s, wait_s=wait_s or min(GUARD_WAIT_S, target.timeout_s),
                    lease_ms=int(2 * target.timeout_s * 1000) + 5_000, prefix=settings.queue_prefix, rates=rates)


def build_esp(name: str, target: EspTarget, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    """The client of one target; ``guard`` None for one-off calls outside the sync (checks, tests).

    ``offline``: only to build members (previews), so no API key is needed.
    """
    key = "" if offline and target.api_key is None else target.key()
    if target.kind == "mailchimp":
        if not target.audience:
            raise ValueError(f"ESP target {name}: a Mailchimp target needs its audience (list id)")
        return Mailchimp(target.base_url or "", key, target.audience, target.fields, target.timeout_s, guard, name=name,
                         job_timeout=target.job_timeout_s)
    cls = Klaviyo if target.kind == "klaviyo" else SendGrid
    base = target.base_url or ("https://a.klaviyo.com" if target.kind == "klaviyo" else "https://api.sendgrid.com")
    return cls(base, key, target.fields, target.audience, target.timeout_s, target.job_timeout_s, guard, name=name)


def build_all(settings: Settings) -> dict[str, tuple[Esp, EspGuard]]:
    """Every configured target with its guard, by target name."""
    built = {}
    for name, target in settings.esp_targets().items():
        guard = build_guard(target, settings)
        built[name] = (build_esp(name, target, guard), guard)
    return built


def clients(settings: Settings) -> dict[str, Esp]:
    """Every configured target's client, unguarded: for one-off checks, previews and reconciliation."""
    return {name: build_esp(name, target) for name, target in settings.esp_targets().items()}
