from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.esps import registry
from tests.support import fake_esp
from tests.support.fake_esp import FakeEsp


@pytest.fixture
def fake() -> Iterator[type[FakeEsp]]:
    """The fourth ESP, registered for one test, its contacts and requests empty."""
    registry.register(fake_esp.DESCRIPTOR)
    FakeEsp.contacts, FakeEsp.requests, FakeEsp.refuse, FakeEsp.running = {}, [], set(), set()
    yield FakeEsp
    registry.DESCRIPTORS.pop(fake_esp.KIND)
