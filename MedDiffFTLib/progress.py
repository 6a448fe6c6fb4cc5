"""Progress reporting for the CLI (tqdm bars or JSON lines) and for in-process callers.

One ``Progress`` object travels through a run; stages report steps to it and poll it for cancel.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import Cancelled

ProgressCallback = Callable[[dict], None]


class Progress:
    """Reports stage progress and carries the cancel request.

    Args:
        mode: ``"bar"`` (tqdm on stderr), ``"json"`` (one JSON object per line on stdout) or
            ``"none"``.
        callback: called with every event dict (in-process callers, e.g. the Slicer bridge).
        should_cancel: polled between steps; returning True raises ``Cancelled``.
        cancel_file: the run is cancelled once this file exists (subprocess callers).
    """

    def __init__(
        self,
        mode: str = "none",
        callback: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        cancel_file: str | None = None,
    ) -> None:
        self.mode = mode
        self.callback = callback
        self.should_cancel = should_cancel
        self.cancel_file = cancel_file

    def emit(self, event: dict) -> None:
        """Send one event to the callback and, in JSON mode, to stdout."""
        if self.callback is not None:
            self.callback(event)
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def check_cancel(self) -> None:
        """Raise ``Cancelled`` when the caller asked to stop."""
        if (self.should_cancel is not None and self.should_cancel()) or (
            self.cancel_file is not None and os.path.exists(self.cancel_file)
        ):
            raise Cancelled("Cancelled by the user; nothing was written.")

    def message(self, text: str) -> None:
        """A line for the user (stderr in bar mode, an event in JSON mode)."""
        if self.mode == "bar":
            print(text, file=sys.stderr)
        self.emit({"event": "message", "message": text})

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``: report ``n`` more finished steps of ``name`` and check cancel."""
        bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=name, file=sys.stderr, dynamic_ncols=True)
        state = {"step": 0}

        def advance(n: int = 1) -> None:
            state["step"] += n
            if bar is not None:
                bar.update(n)
            self.emit({"stage": name, "step": state["step"], "total": total})
            self.check_cancel()

        try:
            self.check_cancel()
            yield advance
        finally:
            if bar is not None:
                bar.close()
