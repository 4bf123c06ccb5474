"""The AMQP 0-9-1 frames of one persistent, mandatory ``basic.publish``, packed without pamqp.

The receiver publishes thousands of messages a second that differ only in their routing key, message
id and body; pamqp builds and validates a frame object per field of each. Packed here from a cached
method frame and one ``struct`` call per header, byte for byte what pamqp writes
(``tests/unit/broker/test_frames.py`` holds them equal).
"""

from __future__ import annotations

import functools
import struct

from pamqp import commands as spec
from pamqp import frame

_FRAME_END = b"\xce"
_HEADER, _BODY = 2, 3
_BASIC_CLASS = 60

# Property flags (AMQP 0-9-1 §4.2.6.1, high bit first): content-type 15, delivery-mode 12, message-id 7.
_CONTENT_TYPE, _DELIVERY_MODE, _MESSAGE_ID = 1 << 15, 1 << 12, 1 << 7
CONTENT_TYPE = b"application/json"
PERSISTENT = 2


@functools.lru_cache(maxsize=64)
def method_frame(channel: int, routing_key: str) -> bytes:
    """``basic.publish`` to the default exchange, mandatory (an unroutable message comes back)."""
    return frame.marshal(spec.Basic.Publish(exchange="", routing_key=routing_key, mandatory=True), channel)


def header_frame(channel: int, body_size: int, message_id: str) -> bytes:
    """The content header: JSON, persistent, with the message id (what returns are matched by)."""
    mid = message_id.encode()
    if len(mid) > 255:
        raise ValueError("a message id is a short string (at most 255 bytes)")
    payload = struct.pack(
        f">HHQHB{len(CONTENT_TYPE)}sBB{len(mid)}s",
        _BASIC_CLASS, 0, body_size, _CONTENT_TYPE | _DELIVERY_MODE | _MESSAGE_ID,
        len(CONTENT_TYPE), CONTENT_TYPE, PERSISTENT, len(mid), mid,
    )
    return _frame(_HEADER, channel, payload)


def publish_frames(channel: int, routing_key: str, message_id: str, body: bytes, max_content: int) -> list[bytes]:
    """Method, header and body frames of one publish; a body over ``max_content`` spans several frames."""
    frames = [method_frame(channel, routing_key), header_frame(channel, len(body), message_id)]
    for at in range(0, len(body), max_content):
        frames.append(_frame(_BODY, channel, body[at:at + max_content]))
    return frames


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + _FRAME_END
