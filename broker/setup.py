"""The Dramatiq broker: RabbitMQ with publisher confirms and mergetag's middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import AgeLimit, AsyncIO, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit

from adapters import logs
from adapters.sentry import init_sentry
from adapters.settings import Settings
from broker import topology
from broker.middleware import CloseOnShutdown, RetryOrDeadLetter


def create_broker(
    settings: Settings, component: str = "worker", on_shutdown: Callable[[], Awaitable[None]] | None = None
) -> RabbitmqBroker:
    """Build and install the global broker. Sentry is initialised first: its integration patches the broker.

    Parameters:
      on_shutdown: coroutine function run on the worker's event loop when the worker stops.
    """
    logs.install()
    init_sentry(settings, component)
    broker = RabbitmqBroker(
        url=settings.amqp_url,
        confirm_delivery=True,
        max_priority=topology.MAX_PRIORITY,
        middleware=[
            AgeLimit(),
            TimeLimit(),
            ShutdownNotifications(),
            Callbacks(),
            Pipelines(),
            CurrentMessage(),
            AsyncIO(),
            *([CloseOnShutdown(on_shutdown)] if on_shutdown else []),
            RetryOrDeadLetter(
                max_retries=settings.retry_max,
                min_backoff=settings.retry_min_backoff_ms,
                max_backoff=settings.retry_max_backoff_ms,
            ),
        ],
    )
    dramatiq.set_broker(broker)
    return broker
