"""The receiver's publisher: asynchronous, with publisher confirms and a deadline.

``publish`` returns only after RabbitMQ has confirmed the message into a durable
queue; anything else (unreachable broker, nack, unroutable, no confirm before
the deadline) raises :class:`BrokerUnavailable`, and the receiver answers 503.

Group commit: the requests in flight share the channel. A publish does not wait for its frames to
be written, only for its confirm, so the publishes of one event-loop turn leave in one socket write
(:class:`_CoalescingWriter`) and RabbitMQ confirms them together (``multiple`` acks): one write and
one confirm wait per batch, not per request, and no added delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import aiormq
import dramatiq
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.connection import TransportFactory
from pamqp import commands as spec
from yarl import URL

from broker import nodes, topology
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


class _CoalescingWriter(asyncio.StreamWriter):
    """A stream writer that joins the writes of one event-loop turn into one socket write.

    aiormq writes each publish's frames on their own; on these machines a write is a system call
    that costs as much as the rest of a publish. ``drain`` and ``close`` write what is held first.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._held: list[bytes] = []
        self._flush_at: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._held.append(bytes(data))
        if self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        if self._held and not self.transport.is_closing():
            data, self._held = b"".join(self._held), []
            super().write(data)
        self._held.clear()

    async def drain(self) -> None:
        self._flush()
        await super().drain()

    def write_eof(self) -> None:
        self._flush()
        super().write_eof()

    def close(self) -> None:
        self._flush()
        super().close()


class _CoalescingTCP(TransportFactory):
    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=kwargs.pop("limit", 2**16), loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(lambda: protocol, url.host, url.port, **kwargs)
        except OSError as e:
            raise aiormq.exceptions.AMQPConnectionError(*e.args) from e
        return reader, _CoalescingWriter(transport, protocol, reader, loop)


class _Connection(aiormq.Connection):
    """aiormq's connection with room for the frames of every request in flight: with its default of
    10, publishers wait for the writer one at a time, holding the channel, and a write leaves per
    publish again. Backpressure stays: past this many frames a publish waits for the socket."""

    FRAME_BUFFER_SIZE = 1024


class Publisher:
    """One AMQP connection and confirm-mode channel, re-opened on demand.

    Parameters:
      url: the AMQP URL, or several (a cluster's nodes, comma-separated): a connection goes to the node
        that served last, else to the next that answers (``broker.nodes``).
      queues: canonical queue names to declare (with their delay and dead-letter queues).
      timeout: seconds a publish (including any reconnect) may take before it counts as failed.
    """

    def __init__(self, url: str, queues: list[str], timeout: float) -> None:
        self._urls = nodes.urls(url)
        self._node = 0
        self._queues = queues
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._confirmed_at = 0.0

    @property
    def ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def connect(self) -> None:
        """Open the connection and declare the topology; raises BrokerUnavailable."""
        async with self._lock:
            if self.ready:
                return
            await self._reset()
            failure: Exception | None = None
            for step in range(len(self._urls)):
                node = (self._node + step) % len(self._urls)
                try:
                    async with asyncio.timeout(min(self._timeout, nodes.CONNECT_TIMEOUT_S) if len(self._urls) > 1 else self._timeout):
                        self._connection, self._channel = await self._open(URL(self._urls[node]))
                except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
                    failure = exc
                    log.warning("RabbitMQ node %d of %d unavailable: %s", node + 1, len(self._urls), type(exc).__name__)
                    continue
                self._node = node
                return
            raise BrokerUnavailable(f"cannot connect to RabbitMQ: {type(failure).__name__}")

    async def _open(self, url: URL) -> tuple[AbstractConnection, AbstractChannel]:
        connection = _Connection(url, transport_factory=_CoalescingTCP() if url.scheme == "amqp" else None)
        try:
            await connection.connect()
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            for queue in self._queues:
                for name, arguments in topology.declarations(queue):
                    await channel.queue_declare(name, durable=True, arguments=arguments)
        except BaseException:
            await asyncio.shield(_close_quietly(connection))
            raise
        return connection, channel

    async def publish(self, queue: str, body: bytes, message_id: str) -> None:
        """Publish persistently and wait for the broker's confirm (not for the write: see the module).

        A publish that times out resets the connection only when nothing was confirmed since it began
        (the connection looks dead); a broker that is merely slow keeps it, and the requests in flight
        with their confirms."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                if not self.ready:
                    await self.connect()
                assert self._channel is not None
                confirm = await self._channel.basic_publish(
                    body,
                    routing_key=queue,
                    properties=spec.Basic.Properties(delivery_mode=2, message_id=message_id, content_type="application/json"),
                    mandatory=True,
                    wait=False,
                )
            if not isinstance(confirm, spec.Basic.Ack):
                raise BrokerUnavailable(f"RabbitMQ did not confirm: {type(confirm).__name__}")
            self._confirmed_at = time.monotonic()
        except BrokerUnavailable:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            # Another publish reset the shared connection under this one: no confirm, so no 2xx.
            raise BrokerUnavailable("RabbitMQ connection reset before the confirm") from None
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            log.warning("publish to %s failed: %s", queue, type(exc).__name__)
            if not isinstance(exc, TimeoutError) or self._confirmed_at < started:
                self._node = (self._node + 1) % len(self._urls)  # reconnect elsewhere first: this node may be gone
                await self._reset()
            raise BrokerUnavailable(f"RabbitMQ did not confirm: {type(exc).__name__}") from None

    async def close(self) -> None:
        async with self._lock:
            await self._reset()

    async def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await _close_quietly(connection)


async def _close_quietly(connection: AbstractConnection) -> None:
    if not connection.is_closed:
        try:
            await asyncio.wait_for(connection.close(), timeout=1.0)
        except Exception:  # closing a broken connection may fail in many ways; it is gone either way
            log.debug("error while closing a broken AMQP connection", exc_info=True)


async def publish_delivery(publisher: Publisher, queue: str, delivery: Delivery) -> str:
    """Queue one delivery for ``process_event``; returns the message id once confirmed."""
    message_id, encoded = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery.model_dump(mode="json"),))
    await publisher.publish(queue, encoded, message_id)
    return message_id
