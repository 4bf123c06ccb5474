"""One pipeline process with every MongoDB command it sends counted: ``python -m bench._counted worker``
takes the arguments of ``python -m adapters.cli`` and runs it unchanged.

The server counts requests but cannot say whose: counted here, by command name and by whether the sync's
sweeper thread (``sweeper``) sent it, a bench tells the sweeper's polls from the events' work and sees
where the requests go. Heartbeats are not commands and are not counted. On SIGUSR1 the counts so far go
to ``$BENCH_COUNTS/<pid>.json`` (``{"seq", "counts": {"<thread>:<command>": n}}``), once at start too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import monitoring


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.RLock()  # the handler of SIGUSR1 may interrupt its own thread inside started()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        thread = "sweeper" if threading.current_thread().name == "sweeper" else "main"
        with self.lock:
            self.counts[f"{thread}:{event.command_name}"] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def main() -> int:
    commands = Commands()
    out = Path(os.environ["BENCH_COUNTS"]) / f"{os.getpid()}.json"
    seq = 0

    def dump(*_: Any) -> None:
        nonlocal seq
        seq += 1
        with commands.lock:
            counts = dict(commands.counts)
        partial = out.with_suffix(".part")
        partial.write_text(json.dumps({"seq": seq, "counts": counts}))
        partial.replace(out)

    signal.signal(signal.SIGUSR1, dump)
    monitoring.register(commands)
    dump()
    from adapters.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
