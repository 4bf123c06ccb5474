"""Retries and dead letters with reasons.

Replaces Dramatiq's ``Retries`` middleware. Dramatiq dead-letters by nacking,
which keeps the original body and loses the reason; this middleware instead
publishes a copy that carries ``options["dead_letter"]`` (error code, detail,
actor, time) into the queue's ``.XQ`` and lets the original be acked. If that
publish fails, it falls back to Dramatiq's nack, so the message is still kept.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import aiohttp
import dramatiq
import pymongo.errors
from dramatiq.common import compute_backoff, q_name, xq_name
from dramatiq.middleware import Middleware

from schemas.errors import MergetagError

log = logging.getLogger(__name__)

TRANSIENT = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    aiohttp.ClientError,
    pymongo.errors.ConnectionFailure,
    pymongo.errors.ServerSelectionTimeoutError,
    pymongo.errors.NetworkTimeout,
    pymongo.errors.ExecutionTimeout,
    pymongo.errors.WTimeoutError,
)


def reason_for(exception: BaseException) -> dict[str, object]:
    """A machine-readable, PII-free reason for any exception."""
    if isinstance(exception, MergetagError):
        reason = exception.as_reason()
    elif isinstance(exception, TRANSIENT):
        reason = {"code": "infrastructure_unavailable", "detail": type(exception).__name__, "retryable": True}
    else:
        # Unexpected failures retry too (they may be transient), then dead-letter.
        reason = {"code": "unexpected_error", "detail": type(exception).__name__, "retryable": True}
    return {**reason, "exception": type(exception).__name__}


def as_dead_letter(message: dramatiq.Message, reason: dict[str, object], retries: int = 0) -> dramatiq.Message:
    """The copy of ``message`` that goes into its queue's ``.XQ``, carrying why."""
    return message.copy(
        queue_name=xq_name(q_name(message.queue_name)),
        options={
            **message.options,
            "dead_letter": {**reason, "actor": message.actor_name, "queue": q_name(message.queue_name),
                            "retries": retries, "failed_at": int(time.time() * 1000)},
        },
    )


class RetryOrDeadLetter(Middleware):
    """Retry retryable failures with exponential backoff; dead-letter the rest at once.

    Parameters:
      max_retries: attempts after the first, for retryable failures.
      min_backoff: milliseconds before the first retry.
      max_backoff: the ceiling of the backoff, in milliseconds.
      on_dead_letter: told of each message dead-lettered, with its reason (the event trail); its
        failure is logged, never the message's.
    """

    def __init__(self, *, max_retries: int = 8, min_backoff: int = 1_000, max_backoff: int = 300_000,
                 on_dead_letter: Callable[[dramatiq.Message, dict[str, object]], None] | None = None) -> None:
        self.max_retries = max_retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.on_dead_letter = on_dead_letter

    @property
    def actor_options(self) -> set[str]:
        return {"max_retries", "min_backoff", "max_backoff"}

    def after_process_message(self, broker, message, *, result=None, exception=None):  # noqa: ANN001
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        reason = reason_for(exception)
        retries = message.options.get("retries", 0)
        max_retries = actor.options.get("max_retries", self.max_retries)
        message.options["last_error"] = reason

        # A call our own guard refused never reached the ESP: it waits without spending the message's
        # retries (an ESP outage, or a spent rate budget, must not dead-letter the backlog).
        spent = 1 if getattr(exception, "counts_as_attempt", True) else 0
        if reason["retryable"] and retries + spent <= max_retries:
            message.options["retries"] = retries + spent
            delay = self._delay(actor, retries, exception)
            log.info("retrying %s in %d ms (%s)", message.message_id, delay, reason["code"])
            try:
                broker.enqueue(message, delay=delay)
            except dramatiq.errors.BrokerConnectionError:
                log.exception("could not schedule retry of %s; nacking to its dead-letter queue", message.message_id)
                message.fail()
            return

        dead = as_dead_letter(message, reason, retries)
        try:
            broker.enqueue(dead)
        except dramatiq.errors.BrokerConnectionError:
            log.exception("could not publish dead letter %s; nacking instead", message.message_id)
            message.fail()
            return
        log.warning("dead-lettered %s from %s: %s", message.message_id, message.actor_name, reason["code"])
        if self.on_dead_letter is not None:
            try:
                self.on_dead_letter(message, dead.options["dead_letter"])
            except Exception:  # the letter is kept; only its trail entry is lost
                log.exception("dead letter %s not noted", message.message_id)

    def _delay(self, actor: dramatiq.Actor, retries: int, exception: BaseException) -> int:
        retry_after = getattr(exception, "retry_after", None)
        if retry_after:
            # Spread out: a backlog waiting for the same moment would otherwise come back all at once.
            return int(retry_after * 1000 * random.uniform(1.0, 1.2))
        min_backoff = actor.options.get("min_backoff", self.min_backoff)
        max_backoff = actor.options.get("max_backoff", self.max_backoff)
        _, delay = compute_backoff(retries, factor=min_backoff, max_backoff=max_backoff)
        return delay


class CloseOnShutdown(Middleware):
    """Runs an async cleanup on the worker's event loop before the AsyncIO middleware stops it.

    Must come after ``AsyncIO`` in the middleware list: Dramatiq runs ``after_*`` hooks in
    reverse list order, so this one then runs while the loop is still up.

    Parameters:
      cleanup: a coroutine function closing per-process connections.
    """

    def __init__(self, cleanup) -> None:  # noqa: ANN001
        self.cleanup = cleanup

    def after_worker_shutdown(self, broker, worker):  # noqa: ANN001
        from dramatiq.asyncio import get_event_loop_thread

        thread = get_event_loop_thread()
        if thread is None:
            return
        try:
            thread.run_coroutine(self.cleanup())
        except Exception:  # shutting down: log and carry on
            log.exception("cleanup on worker shutdown failed")
