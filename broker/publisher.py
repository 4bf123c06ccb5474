"""The receiver's publisher: asynchronous, with publisher confirms and a deadline.

``publish`` returns only after RabbitMQ has confirmed the message into a durable
queue; anything else (unreachable broker, nack, unroutable, no confirm before
the deadline) raises :class:`BrokerUnavailable`, and the receiver answers 503.

Group commit: the requests in flight share the channel. The publishes of one event-loop turn are
held, then leave together: their frames packed in one buffer (``broker.frames``), one socket write,
one delivery tag each, and RabbitMQ confirms them together (``multiple`` acks). Each request waits
only for its own confirm; nothing is delayed to make a batch.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import uuid
from typing import Any

import aiormq
import dramatiq
from aiormq.abc import AbstractChannel, AbstractConnection, ChannelFrame
from pamqp import commands as spec
from pydantic_core import PydanticSerializationError
from yarl import URL

from broker import frames, nodes, topology
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
        self._held: list[tuple[str, bytes, str, asyncio.Future[Any]]] = []
        self._held_deadline = 0.0

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
        connection = aiormq.Connection(url)
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
        with their confirms. The deadline is one timer per batch (``_send_held``), not one per request."""
        started = time.monotonic()
        try:
            if not self.ready:
                async with asyncio.timeout(self._timeout):
                    await self.connect()
            assert self._channel is not None
            confirm = await self._hold(self._channel, queue, body, message_id, started + self._timeout)
            if not isinstance(confirm, spec.Basic.Ack):
                raise BrokerUnavailable(f"RabbitMQ did not confirm: {type(confirm).__name__}")
            self._confirmed_at = time.monotonic()
        except BrokerUnavailable:
            raise
        except aiormq.exceptions.DeliveryError as exc:
            # This message alone was refused (nacked, or returned as unroutable); the channel is healthy,
            # and so are the publishes in flight beside it.
            log.warning("RabbitMQ refused a publish to %s: %s", queue, type(exc).__name__)
            raise BrokerUnavailable(f"RabbitMQ did not confirm: {type(exc).__name__}") from None
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

    def _hold(self, channel: AbstractChannel, queue: str, body: bytes, message_id: str, deadline: float) -> asyncio.Future[Any]:
        """This publish's confirm, to come (or TimeoutError at ``deadline``, monotonic); its frames leave
        with the others of this loop turn."""
        confirm = channel.create_future()
        self._held.append((queue, body, message_id, confirm))
        if len(self._held) == 1:
            self._held_deadline = deadline
            asyncio.get_running_loop().call_soon(self._send_held, channel)
        return confirm

    def _send_held(self, channel: AbstractChannel) -> None:
        """Every held publish in one write. Tags are numbered as aiormq's ``basic_publish`` numbers them,
        and its reader resolves the confirms (acks, nacks, returns by message id) as for its own."""
        held, self._held = self._held, []
        if channel is not self._channel or channel.is_closed or channel.write_queue.full():
            # Reset under us, or the broker stopped reading our frames (a memory or disk alarm).
            for *_, confirm in held:
                if not confirm.done():
                    confirm.set_exception(BrokerUnavailable("RabbitMQ is not taking publishes"))
            return
        payload: list[bytes] = []
        sent: list[tuple[str, int, asyncio.Future[Any]]] = []
        for queue, body, message_id, confirm in held:
            if confirm.done():
                continue  # its request gave up before it left
            channel.delivery_tag += 1
            channel.confirmations[channel.delivery_tag] = confirm
            channel.message_id_delivery_tag[message_id] = channel.delivery_tag
            sent.append((message_id, channel.delivery_tag, confirm))
            payload += frames.publish_frames(channel.number, queue, message_id, body, channel.max_content_size)
        if sent:
            channel.write_queue.put_nowait(ChannelFrame(payload=b"".join(payload), should_close=False))
            _Sent(channel, sent, self._held_deadline - time.monotonic())

    async def close(self) -> None:
        async with self._lock:
            await self._reset()

    async def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await _close_quietly(connection)


class _Sent:
    """The confirms of one write under one deadline timer, cancelled once the last is in."""

    __slots__ = ("_channel", "_confirms", "_left", "_timer")

    def __init__(self, channel: AbstractChannel, sent: list[tuple[str, int, asyncio.Future[Any]]], delay: float) -> None:
        self._channel, self._confirms, self._left = channel, [confirm for *_, confirm in sent], len(sent)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)
        for message_id, tag, confirm in sent:
            confirm.add_done_callback(functools.partial(self._settled, message_id, tag))

    def _settled(self, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
        if self._channel.message_id_delivery_tag.get(message_id) == tag:
            del self._channel.message_id_delivery_tag[message_id]
        self._left -= 1
        if not self._left:
            self._timer.cancel()

    def _expire(self) -> None:
        """Whatever is still unconfirmed fails (a confirm that comes later is logged and ignored)."""
        for confirm in self._confirms:
            if not confirm.done():
                confirm.set_exception(TimeoutError())


async def _close_quietly(connection: AbstractConnection) -> None:
    if not connection.is_closed:
        try:
            await asyncio.wait_for(connection.close(), timeout=1.0)
        except Exception:  # closing a broken connection may fail in many ways; it is gone either way
            log.debug("error while closing a broken AMQP connection", exc_info=True)


def encode_delivery(queue: str, delivery: Delivery) -> tuple[str, bytes]:
    """``encode_message`` of one delivery for ``process_event``, the same message, with pydantic writing its
    JSON: the receiver's hot path, where a dict and ``json.dumps`` cost five times as much. The id is a
    random UUID as aiormq draws its own (no system call: it names a message, it guards nothing)."""
    message_id = str(uuid.UUID(int=random.getrandbits(128), version=4))
    try:
        args = delivery.model_dump_json().encode()
    except PydanticSerializationError:
        # A lone surrogate (the receiver refuses them; a re-drive may carry one): json.dumps escapes it.
        return encode_message(queue, topology.PROCESS_EVENT_ACTOR, (delivery.model_dump(mode="json"),), message_id)
    return message_id, b"".join((
        _message_head(queue), args, b'],"kwargs":{},"options":{},"message_id":"',
        message_id.encode(), b'","message_timestamp":', str(int(time.time() * 1000)).encode(), b"}",
    ))


@functools.lru_cache(maxsize=64)
def _message_head(queue: str) -> bytes:
    return ('{"queue_name":%s,"actor_name":%s,"args":[' % (json.dumps(queue), json.dumps(topology.PROCESS_EVENT_ACTOR))).encode()


async def publish_delivery(publisher: Publisher, queue: str, delivery: Delivery) -> str:
    """Queue one delivery for ``process_event``; returns the message id once confirmed."""
    message_id, encoded = encode_delivery(queue, delivery)
    await publisher.publish(queue, encoded, message_id)
    return message_id
