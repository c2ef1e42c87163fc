"""What one push has in flight (:class:`Window`), from its ``begin`` to its commit."""

from __future__ import annotations

from ..manifest import Entry


class Window:
    """The entries batches the agent has not answered yet, the files it has
    not acknowledged, and the items it put off or will send a signature for.

    Entries are kept only while their batch is in flight or their file is
    unacknowledged: memory follows the window, not the tree.
    """

    def __init__(self) -> None:
        self.by_path: dict[bytes, Entry] = {}
        self.batch_paths: dict[int, list[bytes]] = {}
        self.batches = 0  # entries batches sent
        self.outstanding = 0  # entries batches not yet answered
        self.awaiting = 0  # acknowledgements still to come
        self.unacked: set[bytes] = set()
        self.retried: set[bytes] = set()  # sent whole again after the agent failed them once
        self.sig_waiting: dict[int, Entry] = {}  # 1.3: delta items whose signature is still coming
        self.later: set[bytes] = set()  # need "later": named again in "planned"

    def add_batch(self, batch: list[Entry]) -> int:
        """An entries batch goes out: its number, counted from 1."""
        self.batches += 1
        for e in batch:
            self.by_path[e.path] = e
        self.batch_paths[self.batches] = [e.path for e in batch]
        self.outstanding += 1
        return self.batches

    def answered(self, batch: object) -> None:
        """The agent answered batch ``batch``: its entries go, but for the
        files still to be acknowledged or named again."""
        for path in self.batch_paths.pop(batch, []) if isinstance(batch, int) else []:
            if path not in self.unacked and path not in self.later:
                self.by_path.pop(path, None)

    def expect_ack(self, path: bytes) -> None:
        self.awaiting += 1
        self.unacked.add(path)

    def acked(self, path: bytes) -> None:
        self.awaiting -= 1
        self.unacked.discard(path)
        self.by_path.pop(path, None)

    def forget_signature(self, path: bytes) -> None:
        """``path`` goes whole after all: its signature will not come (1.3)."""
        for stream, waiting in list(self.sig_waiting.items()):
            if waiting.path == path:
                del self.sig_waiting[stream]
