"""The one error hierarchy: every failure is either retryable or permanent.

Each error carries a machine-readable ``code`` and a ``detail`` that must never
contain secrets or personal data: it travels into logs, dead letters and Sentry.
"""

from __future__ import annotations


class MergetagError(Exception):
    """Base of all mergetag failures.

    Parameters:
      detail: a short, PII-free explanation.
      code: overrides the class's machine-readable reason.
    """

    code = "error"
    retryable = False

    def __init__(self, detail: str = "", *, code: str | None = None) -> None:
        super().__init__(detail or self.code)
        self.detail = detail
        if code is not None:
            self.code = code

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

    def __init__(self, detail: str = "", *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class EventInvalid(PermanentError):
    """An event that does not satisfy the canonical schema.

    Parameters:
      errors: every problem as ``{"event", "loc", "type", "msg"}`` (never the offending value).
    """

    code = "validation_failed"

    def __init__(self, detail: str = "", *, code: str | None = None, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail, code=code)
        self.errors = errors or []


class UnsupportedEvent(PermanentError):
    """A source topic or type that has no mapping."""

    code = "unsupported_event"


class StoredProfileInvalid(PermanentError):
    """A stored profile no longer validates against the model (needs a migration)."""

    code = "stored_profile_invalid"


class EspRejected(PermanentError):
    """The ESP refused the request with a 4xx other than 429."""

    code = "esp_rejected"


class EspUnavailable(RetryableError):
    """Network failure, timeout, 5xx or 429 from the ESP."""

    code = "esp_unavailable"


class SyncBusy(RetryableError):
    """Another send of the same profile is in flight; try again when its lease ends."""

    code = "sync_in_progress"


class SourceUnavailable(RetryableError):
    """A polled source refused or did not answer."""

    code = "source_unavailable"


class BrokerUnavailable(RetryableError):
    """RabbitMQ is unreachable or did not confirm a publish in time."""

    code = "broker_unavailable"
