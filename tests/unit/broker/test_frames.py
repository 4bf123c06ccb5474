"""The receiver's hand-packed publish frames are the bytes pamqp (aiormq's own encoder) writes."""

from __future__ import annotations

import pytest
from pamqp import commands as spec
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from broker import frames


def pamqp_frames(channel: int, routing_key: str, message_id: str, body: bytes, max_content: int) -> list[bytes]:
    properties = spec.Basic.Properties(delivery_mode=2, message_id=message_id, content_type="application/json")
    out = [frame.marshal(spec.Basic.Publish(exchange="", routing_key=routing_key, mandatory=True), channel),
           frame.marshal(ContentHeader(properties=properties, body_size=len(body)), channel)]
    out += [frame.marshal(ContentBody(body[at:at + max_content]), channel) for at in range(0, len(body), max_content)]
    return out


@pytest.mark.parametrize(("channel", "routing_key", "message_id", "body", "max_content"), [
    (1, "mergetag.events", "6f1c2a4e-8a8b-4f7e-9a51-2b1f0c3d4e5f", b'{"args":[{"a":1}]}', 131064),
    (7, "p.sync", "x", b"\x00" * 300, 100),  # a body over the frame size spans frames
    (65535, "q" * 255, "m" * 255, "é".encode() * 10, 4096),
])
def test_frames_match_pamqp_byte_for_byte(channel, routing_key, message_id, body, max_content):
    assert frames.publish_frames(channel, routing_key, message_id, body, max_content) == \
        pamqp_frames(channel, routing_key, message_id, body, max_content)


def test_a_message_id_longer_than_a_short_string_is_refused():
    with pytest.raises(ValueError):
        frames.header_frame(1, 10, "m" * 256)
