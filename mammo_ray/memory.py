"""Peak memory of a Ray job on this machine: the summed RSS of this process and every Ray
worker process, sampled in a thread (psutil; Ray has no per-job memory high-water mark)."""
from __future__ import annotations

import os
import threading
import time


class PeakMemory:
    """Samples the summed memory of this process and every Ray worker process (every 0.25 s).

    ``metric="rss"`` sums resident sets: pages shared between processes (torch's libraries in
    every worker) count once per process, so the total jumps by a few hundred MB with each
    extra idle worker Ray happens to keep. ``metric="pss"`` (Linux) splits shared pages among
    the processes that map them: the memory the job really holds, steadier across runs.
    """

    def __init__(self, metric: str = "rss") -> None:
        import psutil

        if metric not in ("rss", "pss"):
            raise ValueError(f"metric={metric!r}: use one of rss, pss")
        self.psutil, self.metric, self.peak, self._stop = psutil, metric, 0, threading.Event()

    def _total(self) -> int:
        total = 0
        for proc in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                name = proc.info["name"] or ""
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.pid == os.getpid() or name.startswith("ray::") or "default_worker.py" in cmd:
                    total += proc.memory_full_info().pss if self.metric == "pss" else proc.info["memory_info"].rss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, TypeError):
                continue
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._total())
                time.sleep(0.25)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
