"""The one error hierarchy: every failure is either retryable or permanent.

::

    MergetagError
    ├── PermanentError              retrying cannot help: dead-lettered (or quarantined) at once
    │   ├── EventInvalid            an event the canonical schema refuses (quarantined, with every error)
    │   ├── UnsupportedEvent        a source topic or type without a mapping
    │   ├── StoredProfileInvalid    a stored profile the model no longer reads (needs a migration)
    │   └── EspRejected             the ESP refused this member (a 4xx other than 429)
    └── RetryableError              transient: retried with backoff (``retry_after`` when the far side said)
        ├── EspUnavailable          the ESP cannot take the call now: network failure, 5xx or 429
        │   ├── EspTimeout          no answer in time: the request may still land (``may_still_land``)
        │   ├── EspMisconfigured    the account is wrong (401/403, a field it lacks): alarmed until fixed
        │   └── EspHeld             our own guard held the call back: the ESP was never called
        │       ├── CircuitOpen     the account's circuit is open (or its trial found it still down)
        │       └── EspBusy         no room in the shared budget within the wait
    │           └── RateSpent   the rate of one kind of request (a bucket) is spent: another kind may have room
        ├── SyncBusy                another send of the profile holds its lease
        ├── SourceUnavailable       a polled source failed or did not answer
        │   └── SourceRefused       it refused the request (a stale cursor, say)
        ├── BrokerUnavailable       RabbitMQ unreachable, or no confirm in time
        └── LostRace                another writer kept winning the optimistic write

Control flow goes by these types and their attributes (``retryable``, ``counts_as_attempt``,
``may_still_land``), never by comparing codes. Each error carries a machine-readable ``code``, the
reason operators see, and a ``detail`` that must never contain secrets or personal data: both
travel into logs, dead letters and Sentry.
"""

from __future__ import annotations


class MergetagError(Exception):
    """Base of all mergetag failures.

    Parameters:
      detail: a short, PII-free explanation.
    """

    code = "error"
    retryable = False
    counts_as_attempt = True
    """False when nothing was tried (our own guard held it back): the message waits without spending a retry."""
    may_still_land = False
    """True when the far side may still apply the request: nothing else may overtake it meanwhile."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail

    def as_reason(self) -> dict[str, object]:
        return {"code": self.code, "detail": self.detail, "retryable": self.retryable}


class PermanentError(MergetagError):
    """Retrying cannot help; the message goes straight to the dead-letter queue."""

    code = "permanent_failure"


class RetryableError(MergetagError):
    """A transient failure; the message is retried with backoff.

    Parameters:
      retry_after: seconds the remote side asked us to wait, when it said so.
    """

    code = "transient_failure"
    retryable = True

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class EventInvalid(PermanentError):
    """An event that does not satisfy the canonical schema.

    Parameters:
      errors: every problem as ``{"event", "loc", "type", "msg"}`` (never the offending value).
    """

    code = "validation_failed"

    def __init__(self, detail: str = "", *, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class UnsupportedEvent(PermanentError):
    code = "unsupported_event"


class StoredProfileInvalid(PermanentError):
    code = "stored_profile_invalid"


class EspRejected(PermanentError):
    code = "esp_rejected"


class EspUnavailable(RetryableError):
    code = "esp_unavailable"


class EspTimeout(EspUnavailable):
    code = "esp_timeout"
    may_still_land = True


class EspMisconfigured(EspUnavailable):
    code = "esp_misconfigured"


class EspHeld(EspUnavailable):
    code = "esp_held"
    counts_as_attempt = False


class CircuitOpen(EspHeld):
    code = "circuit_open"


class EspBusy(EspHeld):
    code = "esp_busy"


class RateSpent(EspBusy):
    """Only this bucket's rate is spent: a sync that can send the same members another way (a bulk job,
    whose bucket is its own) does that instead of waiting."""

    code = "esp_rate_spent"


class SyncBusy(RetryableError):
    code = "sync_in_progress"


class SourceUnavailable(RetryableError):
    code = "source_unavailable"


class SourceRefused(SourceUnavailable):
    code = "source_refused"


class BrokerUnavailable(RetryableError):
    code = "broker_unavailable"


class LostRace(RetryableError):
    code = "write_contention"


class CacheUnavailable(RetryableError):
    """The feed cache could not be invalidated before a profile write: nothing was written. The merge
    waits for Redis without spending the message's retries (an outage must not dead-letter the backlog)."""

    code = "cache_unavailable"
    counts_as_attempt = False
