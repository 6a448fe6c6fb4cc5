"""Runs one MedDiffFTLib CLI command in a child Python (PythonSlicer in Slicer) without blocking.

Qt-free: a reader thread queues the child's output lines and ``poll()`` hands them out on the
caller's thread (in Slicer, from a QTimer on the main thread), so callbacks may touch MRML and Qt.
The child prints one JSON object per line (``--progress json``): progress events go to
``onProgress``, everything else (messages, warnings, tracebacks) to ``onLog``. Cancel creates the
``--cancel-file`` the library polls between steps, then kills the whole process tree after a grace
period: PythonSlicer is a launcher, so killing it alone would leave the interpreter running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import slicer.util
from MedDiffFTLib.errors import Cancelled, MedDiffFTError

EXIT_CANCELLED = 3
LOG_LINES_IN_ERROR = 20


def parseLine(line: str) -> dict | None:
    """The JSON object printed on ``line``, or None for any other output."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class CLIProcess:
    """One running ``python -m MedDiffFTLib.cli`` command.

    Args:
        arguments: the command line without the program (``MRMLBridge.Job.arguments``).
        workDir: working folder of the child; the cancel file is created there.
        python: the interpreter to run (PythonSlicer in Slicer, ``sys.executable`` in tests).
        onProgress: called with each progress event (``{"stage", "step", "total"}``).
        onLog: called with every other output line.
        useStartupEnvironment: start from the environment Slicer was started with (False
            outside the Slicer application).
        killGracePeriod: seconds between the cancel request and killing the process tree.
    """

    def __init__(
        self,
        arguments: list[str],
        workDir: Path,
        *,
        python: str,
        onProgress: Callable[[dict], None] | None = None,
        onLog: Callable[[str], None] | None = None,
        useStartupEnvironment: bool = True,
        killGracePeriod: float = 10.0,
    ) -> None:
        self.cancelFile = Path(workDir) / "CANCEL"
        self._onProgress = onProgress or (lambda event: None)
        self._onLog = onLog or (lambda line: None)
        self._killGracePeriod = killGracePeriod
        self._killDeadline: float | None = None
        self._doneEvent: dict | None = None
        self._errorMessage: str | None = None
        self._logTail: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._process = slicer.util.launchConsoleProcess(
            [python, "-m", "MedDiffFTLib.cli", *arguments, "--progress", "json", "--cancel-file", str(self.cancelFile)],
            useStartupEnvironment=useStartupEnvironment,
            updateEnvironment={"PYTHONPATH": _pythonPathWithLibrary()},
            cwd=str(workDir),
        )
        self._reader = threading.Thread(target=self._readLines, daemon=True)
        self._reader.start()

    def _readLines(self) -> None:
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\r\n"))

    def poll(self) -> bool:
        """Dispatches the output received so far; True once the child has exited and all of its
        output has been dispatched."""
        finished = not self._reader.is_alive()  # read before draining: no line can follow
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            self._dispatch(line)
        if self._killDeadline is not None and time.monotonic() > self._killDeadline:
            self._killDeadline = None
            _killProcessTree(self._process.pid)
        return finished and self._process.poll() is not None

    def _dispatch(self, line: str) -> None:
        event = parseLine(line)
        if event is not None and "stage" in event:
            self._onProgress(event)
        elif event is not None and event.get("event") == "done":
            self._doneEvent = event
        elif event is not None and event.get("event") in ("error", "message"):
            if event["event"] == "error":
                self._errorMessage = event["message"]
            self._onLog(event["message"])
        else:
            self._logTail = [*self._logTail, line][-LOG_LINES_IN_ERROR:]
            self._onLog(line)

    def cancel(self) -> None:
        """Asks the command to stop; the process tree is killed if it is still running after the grace period."""
        self.cancelFile.touch()
        self._killDeadline = time.monotonic() + self._killGracePeriod

    @property
    def cancelRequested(self) -> bool:
        return self.cancelFile.exists()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returnCode(self) -> int | None:
        """The child's exit status (negative: killed by that signal), None while it runs."""
        return self._process.returncode

    def result(self) -> dict:
        """The command's ``done`` event, once ``poll()`` returned True.

        Raises ``Cancelled`` once a cancel was requested (even if the command got to the end, the
        user asked for nothing), ``MedDiffFTError`` with the library's message after a failure.
        """
        returnCode = self.returnCode
        if returnCode == EXIT_CANCELLED or self.cancelRequested:
            raise Cancelled(self._errorMessage or "Cancelled by the user; nothing was written.")
        if returnCode == 0 and self._doneEvent is not None:
            return self._doneEvent
        raise MedDiffFTError(
            self._errorMessage or f"MedDiffFT stopped with exit code {returnCode}:\n" + "\n".join(self._logTail)
        )

    def wait(self, shouldCancel: Callable[[], bool] | None = None, interval: float = 0.05) -> dict:
        """Polls until the command ends (blocking) and returns ``result()``; ``shouldCancel()``
        returning True cancels it."""
        while not self.poll():
            if shouldCancel is not None and not self.cancelRequested and shouldCancel():
                self.cancel()
            time.sleep(interval)
        return self.result()


def _pythonPathWithLibrary() -> str:
    """PYTHONPATH with the folder that holds MedDiffFTLib first, so the child imports the same library."""
    spec = importlib.util.find_spec("MedDiffFTLib")
    libraryRoot = str(Path(next(iter(spec.submodule_search_locations))).parent)
    return os.pathsep.join([libraryRoot, *filter(None, [os.environ.get("PYTHONPATH")])])


def _killProcessTree(pid: int) -> None:
    import psutil  # a dependency of peft, so present wherever the library runs

    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
