"""The one settings object: every knob is a ``MERGETAG_*`` environment variable."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.esps import registry
from adapters.esps.targets import EspTarget
from adapters.sources.configured import SourceConfig
from schemas.experiments import Experiment
from schemas.profile import DEFAULT_BLOCKED, IdentityHasher

SCOPES = ("read", "operate", "erase")
Scope = Literal["read", "operate", "erase"]


class AdminToken(BaseModel):
    """One operator token: who holds it (its name in the audit trail) and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr
    scopes: list[Scope]

class FeedToken(BaseModel):
    """One send-time feed token (an ESP's web feed or Connected Content call): the targets it may read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr
    targets: list[str] = Field(min_length=1)
    rate_per_s: int | None = Field(None, gt=0, description="Requests per second; default MERGETAG_FEED_RATE_PER_S.")


DEFAULT_LOYALTY_TIERS = {"bronze": 0.0, "silver": 250.0, "gold": 1000.0}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGETAG_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    """One RabbitMQ node, or a cluster's nodes comma-separated: every client fails over to the next (``broker.nodes``)."""
    queue_prefix: str = "mergetag"
    mongodb_uri: str = Field(
        "mongodb://127.0.0.1:27017/?directConnection=true",
        validation_alias=AliasChoices("MERGETAG_MONGODB_URI", "MONGODB_URI"),
    )
    mongodb_database: str = "mergetag"
    redis_url: str = "redis://127.0.0.1:6379/0"

    receiver_host: str = "0.0.0.0"
    receiver_port: int = 8080
    # Prometheus ``/metrics`` of the processes without an HTTP port of their own (0: not served). The
    # receiver and the admin serve theirs on their own port.
    worker_metrics_port: int = 9101
    sync_metrics_port: int = 9102
    max_body_bytes: int = 1_048_576
    publish_timeout_s: float = 2.0
    retry_after_s: int = 5
    shopify_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    shopify_secrets_file: str | None = None
    tracking_write_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    sendgrid_webhook_public_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    mailchimp_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    mandrill_webhook_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    mandrill_webhook_url: str | None = None
    signature_tolerance_s: float = 300.0
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    sources_file: str | None = None
    dedup_window_s: int = 259_200
    shopify_admin_url: str | None = None
    shopify_admin_token: SecretStr | None = None
    shopify_pull_interval_s: float = 300.0
    shopify_pull_page_size: int = 250

    retry_max: int = 8
    retry_min_backoff_ms: int = 1_000
    retry_max_backoff_ms: int = 300_000
    worker_threads: int = 64
    events_worker_threads: int = 128
    merge_batch_max: int = 64
    merge_batch_window_ms: float = 0.0
    merge_rounds_in_flight: int = 2
    merge_cache_profiles: int = 2_500

    esps: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["mailchimp"])
    esp_file: str | None = None
    esp_job_timeout_s: float = 300.0
    esp_circuit_failures: int = 5
    esp_circuit_open_s: float = 30.0
    loyalty_tiers: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LOYALTY_TIERS))
    trait_priority: dict[str, list[str]] = Field(default_factory=dict)
    geoip_database: str | None = None
    cart_abandon_delay_s: float = 3600.0
    blocked_identifiers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: sorted(DEFAULT_BLOCKED))
    identifier_limits: dict[str, int] = Field(default_factory=lambda: {"email": 5, "phone": 5, "anonymous": 100})
    identifier_limit_default: int = 10

    sync_sweep_interval_s: float = 2.0
    sync_grace_s: float = 10.0
    sync_lease_s: float = 60.0
    sync_coalesce_ms: int = 250
    sync_bulk_backlog: int = 200
    # Sync rounds (workers/sync/rounds.py): most (target, profile) pairs in one, and how long one waits for more; 0 pairs: each sync alone;
    # the least time between two import jobs a process starts at a target where every write is one (SendGrid), and how long
    # such a job's record, once it ended, waits to ride another write of the rounds (0: written at once), and how long
    # its note (the job's id, while it runs) waits to ride the next round's claim (0: written at once; the lease holds meanwhile).
    sync_round_max: int = 500
    sync_round_window_ms: float = 5.0
    sync_lane_gap_ms: float = 200.0
    sync_record_carry_ms: float = 400.0
    sync_note_carry_ms: float = 400.0
    # Alerts (Sentry, one per episode) the sync raises beyond exceptions: see workers/sync/alerts.py.
    alert_dead_letters: int = 100
    alert_circuit_open_s: float = 300.0
    alert_freshness_p99_s: float = 60.0
    alert_interval_s: float = 30.0
    # The event trail (adapters/redis/trail.py): entries kept per delivery, event and profile, and for how long.
    trail_cap: int = 100
    trail_ttl_s: int = 7 * 86400

    # Experiment buckets: trait -> experiment (schemas/experiments.py); every mapping naming the trait sends the bucket.
    experiments: dict[str, Experiment] = Field(default_factory=dict)

    # The send-time feed (adapters/http/feed.py) and its Redis cache (adapters/redis/feed_cache.py).
    feed_host: str = "0.0.0.0"
    feed_port: int = 8086
    feed_tokens: dict[str, FeedToken] = Field(default_factory=dict)
    feed_rate_per_s: int = 1000
    """Requests per second per feed token, across every feed process."""
    feed_max_age_s: int = 60
    feed_cache: bool = True
    """The feed's Redis cache, kept by the merge (off, in every process alike: no merge writes it, and the
    feed reads the store for every request)."""
    feed_cache_ttl_s: int = 86400

    admin_host: str = "0.0.0.0"
    admin_port: int = 8083
    admin_token: SecretStr | None = None
    admin_tokens: dict[str, AdminToken] = Field(default_factory=dict)

    identity_hash_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    sentry_dsn: str | None = Field(None, validation_alias=AliasChoices("MERGETAG_SENTRY_DSN", "SENTRY_DSN"))
    sentry_environment: str = "development"

    @field_validator("shopify_secrets", "tracking_write_keys", "sendgrid_webhook_public_keys",
                     "mailchimp_webhook_secrets", "mandrill_webhook_keys", "identity_hash_keys", mode="before")
    @classmethod
    def _split_secrets(cls, value: Any) -> Any:
        """Secrets come comma-separated, newest first, so a rotation is one edit."""
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("esps", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value

    @field_validator("blocked_identifiers", mode="before")
    @classmethod
    def _split_plain(cls, value: Any) -> Any:
        return [s.strip().lower() for s in value.split(",")] if isinstance(value, str) else value

    @field_validator("loyalty_tiers", "sources", "trait_priority", "identifier_limits",
                     "admin_tokens", "experiments", "feed_tokens", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def hasher(self) -> IdentityHasher:
        """The keyed identifier hasher. Raises ValueError when no key is configured: ids and tombstones
        must never fall back to hashes anyone can recompute."""
        keys = reveal(self.identity_hash_keys)
        if not keys:
            raise ValueError("set MERGETAG_IDENTITY_HASH_KEYS (one or more secrets, newest first, comma-separated)")
        short = [k for k in keys if len(k) < 16]
        if short:
            raise ValueError("MERGETAG_IDENTITY_HASH_KEYS: every secret needs at least 16 characters")
        return IdentityHasher(tuple(k.encode() for k in keys))

    def operator_tokens(self) -> dict[str, AdminToken]:
        """Named admin tokens with their scopes; ``MERGETAG_ADMIN_TOKEN`` alone is one token with every scope."""
        tokens = dict(self.admin_tokens)
        if self.admin_token is not None and "admin" not in tokens:
            tokens["admin"] = AdminToken(token=self.admin_token, scopes=list(SCOPES))
        return tokens

    def all_shopify_secrets(self) -> list[str]:
        extra = Path(self.shopify_secrets_file).read_text().split() if self.shopify_secrets_file else []
        return [*reveal(self.shopify_secrets), *extra]

    def configured_sources(self) -> dict[str, SourceConfig]:
        """Sources from ``MERGETAG_SOURCES`` and, when set, the JSON file ``MERGETAG_SOURCES_FILE``."""
        from_file = {}
        if self.sources_file:
            raw = json.loads(Path(self.sources_file).read_text())
            from_file = {name: SourceConfig.model_validate(config) for name, config in raw.items()}
        return {**from_file, **self.sources}

    def esp_targets(self) -> dict[str, EspTarget]:
        """Every ESP target the sync keeps up to date (see :func:`adapters.esps.registry.targets`)."""
        return registry.targets(self)


def reveal(secrets: list[SecretStr]) -> list[str]:
    """Secrets are SecretStr everywhere (never printed by a repr or a log); unwrap only where used."""
    return [s.get_secret_value() for s in secrets]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
