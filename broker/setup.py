"""The Dramatiq broker: RabbitMQ with publisher confirms and mergetag's middleware."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import AgeLimit, AsyncIO, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit

from broker import nodes, topology
from broker.middleware import CloseOnShutdown, RetryOrDeadLetter

log = logging.getLogger(__name__)


class ChannelConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, settling only the messages it received itself.

    RabbitMQ numbers deliveries per channel, from 1, and a consumer is one channel. When the broker drops
    the connection the worker goes on with the messages it held and settles each by its number through the
    consumer it has by then: on the new channel that number names another message — an ack would settle it
    before it is processed (lost if the worker dies), a reject would dead-letter it unprocessed. RabbitMQ
    redelivers what the old channel left unsettled, so settling it is dropped (as the RabbitMQ Java client
    drops stale delivery tags).
    """

    def __next__(self):  # noqa: ANN204
        message = super().__next__()
        if message is not None:
            message._consumer = self
        return message

    def _received(self, message) -> bool:  # noqa: ANN001
        if getattr(message, "_consumer", None) is self:
            return True
        log.info("message %s came before a reconnect: RabbitMQ redelivers it, nothing to settle", message.message_id)
        return False

    def ack(self, message) -> None:  # noqa: ANN001
        if self._received(message):
            super().ack(message)

    def nack(self, message) -> None:  # noqa: ANN001
        if self._received(message):
            super().nack(message)


class TopologyBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, declaring every queue from ``broker.topology``, its consumers
    settling only what they received (:class:`ChannelConsumer`).

    Dramatiq's own declarations would give each dead-letter queue a 7-day TTL; these are the
    receiver's declarations, so both declare identical queues by construction.
    """

    @property
    def consumer_class(self) -> type[ChannelConsumer]:
        return ChannelConsumer

    def _build_queue_arguments(self, queue_name: str) -> dict[str, object]:
        return topology.arguments(queue_name)

    def _declare(self, name: str) -> pika.frame.Method:
        return self.channel.queue_declare(queue=name, durable=True, arguments=topology.arguments(name))

    def _declare_queue(self, queue_name: str) -> pika.frame.Method:
        return self._declare(queue_name)

    def _declare_dq_queue(self, queue_name: str) -> pika.frame.Method:
        return self._declare(dq_name(queue_name))

    def _declare_xq_queue(self, queue_name: str) -> pika.frame.Method:
        return self._declare(xq_name(queue_name))


class Worker(dramatiq.Worker):
    """Dramatiq's worker whose delay-queue consumers wake every ``delay_poll_ms``.

    A delayed message (a coalesced sync) waits in the consumer of its delay queue, which moves it to
    its queue when it wakes after the message's time: after a message, or after its timeout. With the
    worker's own timeout (100 ms) a coalesced sync ran up to 100 ms late, 50 ms on average, at every
    ESP; the worker threads keep that timeout (they wake only to notice a shutdown).
    """

    def __init__(self, broker: dramatiq.Broker, *, delay_poll_ms: int, **options: object) -> None:
        self.delay_poll_ms = delay_poll_ms
        super().__init__(broker, **options)  # type: ignore[arg-type]

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        if not delay:
            super()._add_consumer(queue_name)
            return
        timeout, self.worker_timeout = self.worker_timeout, self.delay_poll_ms
        try:
            super()._add_consumer(queue_name, delay=True)
        finally:
            self.worker_timeout = timeout


def create_broker(url: str, *, retry_max: int, min_backoff_ms: int, max_backoff_ms: int,
                  on_shutdown: Callable[[], Awaitable[None]] | None = None,
                  on_dead_letter: Callable[[dramatiq.Message, dict[str, object]], None] | None = None) -> TopologyBroker:
    """Build the broker with mergetag's middleware, on every node ``url`` names (``broker.nodes``); the
    caller installs it, after initialising Sentry (its integration patches the broker).

    Parameters:
      on_shutdown: coroutine function run on the worker's event loop when the worker stops.
      on_dead_letter: told of each message dead-lettered after its retries (or at once), with the reason.
    """
    broker = TopologyBroker(
        url=nodes.urls(url),
        confirm_delivery=True,
        middleware=[
            AgeLimit(),
            TimeLimit(),
            ShutdownNotifications(),
            Callbacks(),
            Pipelines(),
            CurrentMessage(),
            AsyncIO(),
            *([CloseOnShutdown(on_shutdown)] if on_shutdown else []),
            RetryOrDeadLetter(max_retries=retry_max, min_backoff=min_backoff_ms, max_backoff=max_backoff_ms, on_dead_letter=on_dead_letter),
        ],
    )
    broker.parameters = nodes.parameters(url)  # every node, each with a bounded connect timeout
    return broker
