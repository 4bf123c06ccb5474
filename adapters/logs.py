"""Logging that keeps personal data out.

Dramatiq logs a failed message as ``actor(args...)``, which would print whole
webhook payloads (emails, names, addresses). A log record factory replaces any
Dramatiq message given as a log argument by ``actor#message_id`` before any
handler, or Sentry's logging integration, sees the record.
"""

from __future__ import annotations

import logging
import os

import dramatiq
from dramatiq.broker import MessageProxy

_installed = False


def _safe(arg: object) -> object:
    if isinstance(arg, dramatiq.Message | MessageProxy):
        return f"{arg.actor_name}#{arg.message_id}"
    return arg


def install(level: str | None = None) -> None:
    """Configure the root logger once and install the PII-safe record factory."""
    global _installed
    if _installed:
        return
    _installed = True
    base_factory = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base_factory(*args, **kwargs)
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_safe(a) for a in record.args)
        return record

    logging.setLogRecordFactory(factory)
    logging.basicConfig(
        level=level or os.environ.get("MERGETAG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiormq", "pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
