"""The ESPs mergetag can sync to, and what builds each configured target's client and guard.

Adding an ESP: its folder (see README.md next to this file) and one line in ``DESCRIPTORS``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from adapters.esps import klaviyo, mailchimp, sendgrid
from adapters.esps.base import Esp, EspDescriptor
from adapters.esps.fields import with_experiments
from adapters.esps.guard import EspGuard, Observe, account_id
from adapters.esps.targets import EspTarget, load_file

if TYPE_CHECKING:
    from adapters.metrics import Metrics
    from adapters.settings import Settings

DESCRIPTORS: dict[str, EspDescriptor] = {d.kind: d for d in (mailchimp.DESCRIPTOR, klaviyo.DESCRIPTOR, sendgrid.DESCRIPTOR)}

# Longer waits for room at the ESP give the message back (retried later, not counted as an attempt)
# instead of holding a worker that other ESPs could use.
GUARD_WAIT_S = 2.0


def register(descriptor: EspDescriptor) -> None:
    """Add an ESP kind at run time (a test's fake ESP); production ESPs are listed in ``DESCRIPTORS``."""
    DESCRIPTORS[descriptor.kind] = descriptor


def descriptor(kind: str) -> EspDescriptor:
    return DESCRIPTORS[kind]


def targets(settings: Settings) -> dict[str, EspTarget]:
    """Every ESP target the sync keeps up to date: from ``MERGETAG_ESP_FILE`` when set, else one target
    per name in ``MERGETAG_ESPS``, read from that kind's ``MERGETAG_<KIND>_*`` variables; the traits
    ``MERGETAG_EXPERIMENTS`` names map to each profile's bucket.
    Raises ValueError for an unknown ESP name."""
    if settings.esp_file:
        found = load_file(settings.esp_file)
    else:
        unknown = [name for name in settings.esps if name not in DESCRIPTORS]
        if unknown:
            raise ValueError(f"unknown ESP(s) in MERGETAG_ESPS: {', '.join(unknown)} (known: {', '.join(DESCRIPTORS)})")
        found = {name: DESCRIPTORS[name].env().target(name, settings.esp_job_timeout_s, DESCRIPTORS[name].default_fields)
                 for name in settings.esps}
    if settings.experiments:
        # Every mapping that names an experiment's trait sends the profile's bucket.
        found = {name: t.model_copy(update={"fields": with_experiments(t.fields, settings.experiments)}) for name, t in found.items()}
    return found


def build_guard(target: EspTarget, settings: Settings, wait_s: float | None = None, observe: Observe | None = None) -> EspGuard:
    """The guard of the target's account (targets sharing a key share it), kept in Redis.

    ``wait_s``: how long a call may wait for room (default: briefly; a batch job like reconciliation
    can afford to wait for the rate windows instead). ``observe``: told of every request's outcome.
    """
    rates = target.rates if target.rates is not None else DESCRIPTORS[target.kind].rates
    return EspGuard(settings.redis_url, account_id(target.kind, target.key()), limit=target.max_connections,
                    failures=settings.esp_circuit_failures, open_s=settings.esp_circuit_open_s,
                    wait_s=wait_s or min(GUARD_WAIT_S, target.timeout_s),
                    lease_ms=int(2 * target.timeout_s * 1000) + 5_000, prefix=settings.queue_prefix, rates=rates, observe=observe)


def build_esp(name: str, target: EspTarget, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    """The client of one target; ``guard`` None for one-off calls outside the sync (checks, tests).

    ``offline``: only to build members (previews), so no API key is needed.
    """
    return DESCRIPTORS[target.kind].client(target, name=name, guard=guard, offline=offline)


def build_all(settings: Settings, metrics: Metrics | None = None) -> dict[str, tuple[Esp, EspGuard]]:
    """Every configured target with its guard, by target name; ``metrics`` counts their requests."""
    built = {}
    for name, target in settings.esp_targets().items():
        guard = build_guard(target, settings, observe=partial(metrics.esp_request, name) if metrics is not None else None)
        built[name] = (build_esp(name, target, guard), guard)
    return built


def clients(settings: Settings) -> dict[str, Esp]:
    """Every configured target's client, unguarded: for one-off checks, previews and reconciliation."""
    return {name: build_esp(name, target) for name, target in settings.esp_targets().items()}
