"""Operator actions at a chosen rate (replaying dead letters, redriving quarantined deliveries): the
CLI and the console pace them the same way, in steps of about one second, cancellable between steps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence


async def at_rate(ids: Sequence[str], rate: float | None, step: Callable[[list[str]], Awaitable[int]],
                  cancelled: Callable[[], bool] = lambda: False, progress: Callable[[int], None] | None = None) -> tuple[int, bool]:
    """Run ``step`` over ``ids`` in chunks, about ``rate`` ids per second (None: one chunk, at once);
    ``step`` returns how many of its chunk it did. Returns (done, finished: not cancelled)."""
    size = max(1, int(rate)) if rate else max(1, len(ids))
    done = 0
    for i in range(0, len(ids), size):
        if cancelled():
            return done, False
        started = time.monotonic()
        done += await step(list(ids[i:i + size]))
        if progress is not None:
            progress(done)
        if rate:
            await asyncio.sleep(max(0.0, size / rate - (time.monotonic() - started)))
    return done, True
