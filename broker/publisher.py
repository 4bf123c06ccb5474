"""The receiver's publisher: asynchronous, with publisher confirms and a deadline.

``publish`` returns only after RabbitMQ has confirmed the message into a durable
queue; anything else (unreachable broker, nack, unroutable, no confirm before
the deadline) raises :class:`BrokerUnavailable`, and the receiver answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aio_pika
import dramatiq
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker import topology
from schemas.delivery import Delivery
from schemas.errors import BrokerUnavailable

log = logging.getLogger(__name__)


def encode_message(queue: str, actor: str, args: tuple[Any, ...], message_id: str | None = None) -> tuple[str, bytes]:
    """A Dramatiq message, byte for byte as ``actor.send`` would encode it."""
    message = dramatiq.Message(
        queue_name=queue,
        actor_name=actor,
        args=args,
        kwargs={},
        options={},
        message_id=message_id or str(uuid.uuid4()),
    )
    return message.message_id, message.encode()


class Publisher:
    """One AMQP connection and confirm-mode channel, re-opened on demand.

    Parameters:
      url: the AMQP URL.
      queues: canonical queue names to declare (with their delay and dead-letter queues).
      timeout: seconds a publish (including any reconnect) may take before it counts as failed.
    """

    def __init__(self, url: str, queues: list[str], timeout: float) -> None:
        self._url = url
        self._queues = queues
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def connect(self) -> None:
        """Open the connection and declare the topology; raises BrokerUnavailable."""
        async with self._lock:
            if self.ready:
                return
            await self._reset()
            try:
                async with asyncio.timeout(self._timeout):
                    connection = await aio_pika.connect(self._url, timeout=self._timeout)
                    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    for queue in self._queues:
                        for name, arguments in topology.declarations(queue):
                            await channel.declare_queue(name, durable=True, arguments=arguments)
            except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {type(exc).__name__}") from None
            self._connection, self._channel = connection, channel

    async def publish(self, queue: str, body: bytes, message_id: str) -> None:
        """Publish persistently and wait for the broker's confirm."""
        try:
            async with asyncio.timeout(self._timeout):
                if not self.ready:
                    await self.connect()
                assert self._channel is not None
                await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=message_id,
                        content_type="application/json",
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
        except BrokerUnavailable:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            # Another publish reset the shared connection under this one: no confirm, so no 2xx.
            raise BrokerUnavailable("RabbitMQ connection reset before the confirm") from None
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
            log.warning("publish to %s failed: %s", queue, type(exc).__name__)
            await self._reset()
            raise BrokerUnavailable(f"RabbitMQ did not confirm: {type(exc).__name__}") from None

    async def close(self) -> None:
        async with self._lock:
            await self._reset()

    async def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), timeout=1.0)
            except Exception:  # closing a broken connection may fail in many ways; it is gone either way
                log.debug("error while closing a broken AMQP connection", exc_info=True)


async def publish_delivery(publisher: Publisher, queue: str, delivery: Delivery) -> str:
    """Queue one delivery for ``process_event``; returns the message id once confirmed."""
    message_id, encoded = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery.model_dump(mode="json"),))
    await publisher.publish(queue, encoded, message_id)
    return message_id
