"""The agent's frame writer, shared by every thread that answers the pusher."""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..protocol import FrameWriter


class LockedWriter(FrameWriter):
    """The agent's writer: the main loop, the staging threads, the signature
    threads and the cascade heartbeat all answer on it, each frame whole.
    Hold :attr:`lock` to keep several frames together."""

    def __init__(self, send_all: Callable[[Any], None]) -> None:
        super().__init__(send_all)
        self.lock = threading.RLock()

    def message(self, value: Any, stream: int = 0) -> None:
        with self.lock:
            super().message(value, stream)

    def end(self, stream: int, value: Any = None) -> None:
        with self.lock:
            super().end(stream, value)

    def data(self, stream: int, chunk: Any) -> None:
        with self.lock:
            super().data(stream, chunk)

    def flush(self) -> None:
        with self.lock:
            super().flush()
