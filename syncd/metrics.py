"""The daemon's Prometheus metrics, served on ``[node] metrics_listen`` (off by default).

One registry per daemon (no global state, so tests run several), filled by
the daemon as it scans and pushes.  prometheus-client serves it from its own
thread; the listener is meant for 127.0.0.1 or a monitoring network, as the
operator configures.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, node: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = self.registry
        self.node = node
        self.generation = Gauge("syncd_generation", "This node's current generation", registry=reg)
        self.held = Gauge("syncd_mirror_generation", "Generation the downstream acknowledged",
                          ["mirror"], registry=reg)
        self.lag = Gauge("syncd_mirror_lag_generations", "Generations the downstream is behind",
                         ["mirror"], registry=reg)
        self.last_success = Gauge("syncd_mirror_last_success_timestamp_seconds",
                                  "When the last push to the downstream succeeded", ["mirror"], registry=reg)
        self.pushes = Counter("syncd_pushes_total", "Pushes, by result", ["mirror", "result"], registry=reg)
        self.bytes = Counter("syncd_push_bytes_total", "Bytes sent to the downstream", ["mirror"], registry=reg)
        self.files = Counter("syncd_push_files_total", "Files sent to the downstream", ["mirror"], registry=reg)
        self.duration = Histogram("syncd_push_duration_seconds", "Wall time of one push (cascade included)",
                                  ["mirror"], registry=reg,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
        self.scans = Counter("syncd_scans_total", "Scans of root (full or of watched directories)",
                             registry=reg)
        self._server = None

    def serve(self, listen: str) -> None:
        """Start the HTTP listener on ``host:port``."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        log.info("%s: metrics on http://%s/metrics", self.node, listen)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def scanned(self, generation: int) -> None:
        self.scans.inc()
        self.generation.set(generation)

    def pushed(self, result, generation: int) -> None:  # noqa: ANN001 - a push.PushResult
        m = result.mirror
        self.pushes.labels(m, "ok" if result.ok else "failed").inc()
        self.bytes.labels(m).inc(result.bytes_sent)
        self.files.labels(m).inc(result.files_sent)
        self.duration.labels(m).observe(result.seconds)
        self.generation.set(generation)
        if result.ok:
            self.held.labels(m).set(result.generation)
            self.lag.labels(m).set(max(0, generation - result.generation))
            self.last_success.labels(m).set(time.time())
