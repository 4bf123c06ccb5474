"""How the store stays durable and knows a lost race: client options, transactions, failures.

Every operation has a time limit, every write that holds an accepted event's effect is majority
journaled, transactions read and commit with majority concern; a failed write is either a lost race
(the caller re-reads and merges again) or an error its message retries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pymongo
from pymongo import ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from adapters.store.identities import ClaimLost, only_duplicates

OPERATION_TIMEOUT_MS = 30_000
"""How long one store operation (one round trip, one batch of a cursor) may take before it fails."""
DURABLE: dict[str, Any] = {"w": "majority", "journal": True, "retryWrites": True, "retryReads": True,
                           "timeoutMS": OPERATION_TIMEOUT_MS}
"""Client options unless the URI sets them: a write that holds an accepted event's effect is acknowledged
only once a majority of the replica set has it in its journal (a failover cannot roll it back, and the
message is acked only after it), and writes and reads are retried once across a failover."""
TRANSACTION_CONCERNS: dict[str, Any] = {"read_concern": ReadConcern("majority"),
                                        "write_concern": WriteConcern(w="majority", j=True),
                                        "read_preference": ReadPreference.PRIMARY}
"""A transaction reads what a majority holds and commits to a majority's journals."""
ORPHAN_AFTER = timedelta(milliseconds=2 * OPERATION_TIMEOUT_MS)
"""A claim this old whose profile does not hold its key belongs to a write that will never land: every
store operation, the write after the claim included, fails within ``timeoutMS`` (the server is told)."""
TRANSACTION_TIMEOUT_S = 10.0
"""A transaction is a few writes: one that takes longer is stuck behind conflicting writes (SecantusDB
retries a plain write that conflicts with an open transaction without end), so it aborts, its message
retries, and the writes it held up go on."""


@asynccontextmanager
async def transaction(session: AsyncClientSession) -> AsyncIterator[None]:
    """A transaction within :data:`TRANSACTION_TIMEOUT_S`."""
    with pymongo.timeout(TRANSACTION_TIMEOUT_S):
        async with await session.start_transaction(**TRANSACTION_CONCERNS):
            yield


class Abort(Exception):
    """A lost race inside a transaction: abort it and let the caller retry."""


def lost(exc: Exception) -> bool:
    """Whether a failed write lost a race, so the caller re-reads and merges again: a version guard that
    missed, an identifier (or a new profile's id) someone else holds, or a transaction's write conflict."""
    if isinstance(exc, (Abort, ClaimLost, DuplicateKeyError)):
        return True
    if isinstance(exc, BulkWriteError):
        return only_duplicates(exc)
    return isinstance(exc, OperationFailure) and exc.has_error_label("TransientTransactionError")
