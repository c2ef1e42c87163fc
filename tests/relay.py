"""A TCP relay on 127.0.0.1 for measuring and breaking connections.

Sits between a client and a server (normally sshd): counts the bytes each way
("bytes on the wire"), can throttle each direction to a rate, can delay each
direction (a link with a round-trip time, for the benchmarks), and can cut a
connection after N bytes have passed in a direction (fault injection).  One
thread accepts, two threads per connection pump (four with a delay);
``stop()`` ends them all.

"up" is client to server, "down" is server to client.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import socket
import struct
import threading
import time

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_BLOCK = 64 * 1024
_SPLICE_BLOCK = 1 << 20


class _Throttle:
    """A token bucket shared by every connection in one direction."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def block_size(self) -> int:
        # About 20 slices a second keeps the rate smooth at any setting.
        return max(1024, min(_BLOCK, int(self.rate / 20)))

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        delay = start - now
        if delay > 0:
            time.sleep(delay)


class _DelayLine:
    """Sends what it is given ``delay`` seconds later, in order, from a thread
    of its own: a link's one-way latency.  It holds what is in flight, as a
    link does; the peers' own windows (TCP's, SSH's) bound how much that is."""

    def __init__(self, dst: socket.socket, delay: float, on_error) -> None:  # noqa: ANN001
        self.dst = dst
        self.delay = delay
        self.on_error = on_error
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="relay-delay")
        self._thread.start()

    def send(self, data: bytes | None) -> None:
        """Queue ``data``; None: shut the write side down once all before it went."""
        with self._cond:
            self._queue.append((time.monotonic() + self.delay, data))
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    due, data = self._queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self.dst.sendall(data)
        except OSError:
            self.on_error()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _Connection:
    def __init__(self, relay: Relay, client: socket.socket, server: socket.socket,
                 cut_up: int | None, cut_down: int | None) -> None:
        self.relay = relay
        self.client = client
        self.server = server
        self.up = 0
        self.down = 0
        self.cut = False
        self._limits = {"up": cut_up, "down": cut_down}
        self._threads = [
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True),
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True),
        ]
        self._done = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        throttle = self.relay._throttles.get(direction)
        limit = self._limits[direction]
        block = throttle.block_size() if throttle else _BLOCK
        line = None
        if self.relay.delay:
            line = _DelayLine(dst, self.relay.delay, self._drop)
            block = max(block, _SPLICE_BLOCK) if throttle is None else block
        send = line.send if line is not None else dst.sendall
        try:
            if throttle is None and limit is None and line is None and hasattr(os, "splice"):
                # Nothing to look at: socket to pipe to socket in the kernel.
                # The relay then takes next to no CPU from the tools it
                # measures (on a 2-core host a copying relay took a share).
                self._splice(src, dst, direction)
                return
            while True:
                data = src.recv(block)
                if not data:
                    if line is not None:
                        break  # the delay line shuts the write side once the rest went (finally)
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    break
                passed = getattr(self, direction)
                if limit is not None and passed + len(data) >= limit:
                    data = data[:max(0, limit - passed)]
                    if throttle and data:
                        throttle.wait(len(data))
                    self._account(direction, len(data))
                    if data:
                        send(data)
                    self.abort()
                    log.debug("relay: cut %s after %d bytes", direction, limit)
                    break
                if throttle:
                    throttle.wait(len(data))
                # Counted before it is sent: a peer that has a byte must find
                # it in counts() already (sent first, a test reading counts()
                # the moment its session ended could miss the last block).
                self._account(direction, len(data))
                send(data)
        except OSError:
            # One side went away: take the other down too, but this is the
            # peers' doing, not a cut.
            self._drop()
        finally:
            if line is not None:
                line.send(None)  # its write side is shut once what is in flight went
                line.join(30)  # (or the peer is gone)
            with self._lock:
                self._done += 1
                finished = self._done == 2
            if finished:
                self._close()

    def _splice(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), _SPLICE_BLOCK)
            except OSError:
                pass
            while True:
                n = os.splice(src.fileno(), w, _SPLICE_BLOCK)
                if not n:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self._account(direction, n)  # before it leaves, as in _pump
                moved = 0
                while moved < n:
                    moved += os.splice(r, dst.fileno(), n - moved)
        finally:
            os.close(r)
            os.close(w)

    def _account(self, direction: str, n: int) -> None:
        setattr(self, direction, getattr(self, direction) + n)
        self.relay._count(direction, n)

    def abort(self) -> None:
        """Cut: drop both sides at once, as a dead link or a reset would."""
        self.cut = True
        self._drop()

    def _drop(self) -> None:
        for s in (self.client, self.server):
            try:
                # RST rather than FIN: the peer must not mistake a cut for EOF.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close(self) -> None:
        for s in (self.client, self.server):
            try:
                s.close()
            except OSError:
                pass
        self.relay._forget(self)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)


class Relay:
    """Listen on 127.0.0.1 and forward each connection to ``target``.

    ``rate_up`` / ``rate_down``: bytes per second per direction (None: as fast as
    it goes).  ``delay``: seconds each direction holds what passes (the link's
    round-trip time is twice that; 0: none).  ``cut_up`` / ``cut_down``: drop
    each new connection once that many bytes passed in that direction (None:
    never); change them between connections with ``set_cut``.  Totals over
    all connections are in ``bytes_up`` / ``bytes_down``.
    """

    def __init__(self, target_host: str, target_port: int, *, rate_up: float | None = None,
                 rate_down: float | None = None, cut_up: int | None = None,
                 cut_down: int | None = None, delay: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self._throttles = {}
        if rate_up:
            self._throttles["up"] = _Throttle(rate_up)
        if rate_down:
            self._throttles["down"] = _Throttle(rate_down)
        self.cut_up = cut_up
        self.cut_down = cut_down
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_accepted = 0
        self._lock = threading.Lock()
        self._live: set[_Connection] = set()
        self._finished: list[_Connection] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self.host, self.port = self._listener.getsockname()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="relay-accept")
        self._acceptor.start()

    # -- counters

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.bytes_up += n
            else:
                self.bytes_down += n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"up": self.bytes_up, "down": self.bytes_down,
                    "connections": self.connections_accepted}

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = 0

    @property
    def cuts(self) -> int:
        """Connections this relay has cut (by limit or by ``cut_all``)."""
        with self._lock:
            return sum(c.cut for c in (*self._live, *self._finished))

    # -- faults

    def set_cut(self, up: int | None = None, down: int | None = None) -> None:
        """Limits for connections accepted from now on."""
        self.cut_up, self.cut_down = up, down

    def cut_all(self) -> None:
        """Drop every live connection now."""
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn.abort()

    # -- life cycle

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                break
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError as err:
                log.debug("relay: cannot reach %s:%d: %s", *self.target, err)
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server, self.cut_up, self.cut_down)
            with self._lock:
                self.connections_accepted += 1
                self._live.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._live.discard(conn)
            self._finished.append(conn)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn._drop()
            conn.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
