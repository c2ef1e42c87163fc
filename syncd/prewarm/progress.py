"""A prewarm's progress: ``state_dir/prewarm.json`` (which ``status`` reads),
a rich progress bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ..config import Config
from .result import PrewarmResult, human

log = logging.getLogger(__package__)

# status.PREWARM_PROGRESS names this file too, without importing prewarm.
PROGRESS_FILE = "prewarm.json"
PROGRESS_EVERY = 1.0
LOG_EVERY = 5.0


class Progress:
    """prewarm.json for ``status``, a rich bar on a terminal, a log line otherwise."""

    def __init__(self, cfg: Config, result: PrewarmResult, tty: bool) -> None:
        self.path = cfg.node.state_dir / PROGRESS_FILE
        self.result = result
        self.started = time.time()
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.bar: Any = None
        self.task: Any = None
        if tty:
            # rich: imported only for a terminal (docs/performance.md, "Start-up").
            from rich.progress import BarColumn, DownloadColumn
            from rich.progress import Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                    TextColumn("{task.fields[files]}"), TransferSpeedColumn(), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task(f"prewarm {result.mirror}", total=result.bytes_total, files="")

    def update(self, phase: str, bytes_done: int, files_done: int, *, final: bool = False) -> None:
        r = self.result
        now = time.monotonic()
        elapsed = max(now - self.t0, 1e-6)
        rate = max(bytes_done - r.bytes_present, 0) / elapsed
        state = {
            "mirror": r.mirror, "source": r.source, "streams": r.streams, "phase": phase, "pid": os.getpid(),
            "generation": r.generation, "bytes_done": bytes_done, "bytes_total": r.bytes_total,
            "files_done": files_done, "files_total": r.files_total, "rate": round(rate),
            "started": round(self.started, 3), "updated": round(time.time(), 3),
        }
        tmp = self.path.with_name(f"{PROGRESS_FILE}.tmp.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as err:
            log.debug("cannot write %s: %s", self.path, err)
        if self.bar is not None:
            self.bar.update(self.task, completed=bytes_done, files=f"{files_done}/{r.files_total} files")
        elif final or now - self.last_log >= LOG_EVERY:
            self.last_log = now
            left = r.bytes_total - bytes_done
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            log.info("%s: prewarm %s: %s of %s, %d of %d objects, %s/s, ETA %s", r.mirror, phase,
                     human(bytes_done), human(r.bytes_total), files_done, r.files_total, human(rate), eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
