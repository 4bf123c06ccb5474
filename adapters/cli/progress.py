"""The pull's progress on stderr (stdout keeps the summary): a live bar per resource on a terminal,
plain lines elsewhere, so CI logs and captured output get no cursor movement or redraws."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import Progress as Bar
from rich.progress import SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from adapters.cli.summary import Tally


class Progress:
    """Parameters:
      tally: what the pull counted so far (fed by :meth:`page`).
      stream: where to show it (default stderr).
      every: without a terminal, one line per this many pages of a resource (and when it ends).
      status_every_s: without a terminal, at most one waiting line this often.
      terminal: force the bar on or off (default: whether ``stream`` is a terminal that can redraw).
    """

    def __init__(self, tally: Tally, stream: TextIO | None = None, *, every: int = 10, status_every_s: float = 10.0,
                 terminal: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.tally = tally
        self._every, self._status_every, self._clock = every, status_every_s, clock
        self._console = Console(file=stream or sys.stderr, force_terminal=terminal, highlight=False)
        self._stream = self._console.file
        self.live = self._console.is_terminal and not self._console.is_dumb_terminal
        self._bar: Bar | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last_status = float("-inf")
        self._moved: list[logging.StreamHandler] = []

    def __enter__(self) -> Progress:
        if self.live:
            self._bar = Bar(SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), TextColumn("{task.fields[count]:>16}"),
                            TextColumn("{task.fields[pages]:>11}"), TextColumn("{task.fields[rate]:>10}"), TimeElapsedColumn(),
                            console=self._console)
            self._bar.start()
            self._route_logs(sys.stderr)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            if "waiting" in self._tasks:
                self._bar.update(self._tasks["waiting"], total=1, completed=1)
            self._bar.stop()
            self._route_logs(None)

    def _route_logs(self, stream: TextIO | None) -> None:
        """Log lines written to stderr while the bar is live go above it (rich's stand-in for stderr
        while it runs), not through it; ``None`` puts the handlers back."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if stream is not None and handler.stream is sys.__stderr__:
                    self._moved.append(handler)
                    handler.setStream(stream)
        if stream is None:
            for handler in self._moved:
                handler.setStream(sys.__stderr__)
            self._moved = []

    def begin(self, resource: str) -> None:
        self.tally.begin(resource, self._clock())
        if self._bar is not None:
            self._tasks[resource] = self._bar.add_task(resource, total=None, count="0 records", pages="0 pages", rate="")

    def page(self, resource: str, records: int) -> None:
        """One page confirmed (the puller's ``on_page``)."""
        self.tally.add(resource, records)
        if self._bar is not None:
            self._update(resource)
        elif self.tally.pages[resource] % self._every == 0:
            self._print(self.tally.line(resource, self._clock()))

    def end(self, resource: str) -> None:
        self.tally.end(resource, self._clock())
        if self._bar is not None:
            self._update(resource)
            self._bar.update(self._tasks[resource], total=1, completed=1)
        else:
            self._print(self.tally.line(resource, self._clock()) + " (done)")

    def status(self, text: str) -> None:
        """What the wait for the pipeline is at (queued, pending)."""
        if self._bar is not None:
            if "waiting" not in self._tasks:
                self._tasks["waiting"] = self._bar.add_task("waiting", total=None, count="", pages="", rate="")
            self._bar.update(self._tasks["waiting"], description=f"waiting: {text}")
            return
        now = self._clock()
        if now - self._last_status >= self._status_every:
            self._last_status = now
            self._print(f"waiting: {text}")

    def _update(self, resource: str) -> None:
        rate = self.tally.rate(resource, self._clock())
        self._bar.update(self._tasks[resource], count=f"{self.tally.records[resource]:,} records",
                         pages=f"{self.tally.pages[resource]} pages", rate=f"{rate:,.1f}/s" if rate is not None else "")

    def _print(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
