"""Peak memory of a Ray job on this machine: the summed RSS of this process and every Ray
worker process, and the largest single process, sampled in a thread (psutil; Ray has no
per-job memory high-water mark)."""
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
    ``metric="uss"`` (Linux) counts only each process's private pages.
    ``metric="anon"`` (Linux) counts each process's anonymous pages (heap, malloc arenas, array
    buffers): what the process allocated. A "flat in the input size" check uses it, because
    USS also counts pages that become private when *another* process exits: a shared
    library's pages (torch's, ~300 MB) when the last worker that also mapped them goes, and
    Ray's object store pages of an object the driver read when the worker that wrote it goes
    (measured: +98 MB object store and +27 MB of libraries in the driver's USS on killing an
    actor that returned a 96 MB array; anon +0). That made a job's driver look as if it grew
    with its input when only the pool's actors had exited.

    Besides the summed ``peak``, ``driver_peak`` is this process's own high-water mark and
    ``worker_peak`` the largest single Ray worker's. Those two do not move with how many idle
    workers Ray keeps (the sum does), so they are what a "memory is flat in the input size"
    check compares: a job that piles up rows or images grows one process, not the count.
    """

    def __init__(self, metric: str = "rss") -> None:
        import psutil

        if metric not in ("rss", "pss", "uss", "anon"):
            raise ValueError(f"metric={metric!r}: use one of rss, pss, uss, anon")
        self.psutil, self.metric, self._stop = psutil, metric, threading.Event()
        self.peak = self.driver_peak = self.worker_peak = 0

    def _sample(self) -> None:
        total, me = 0, os.getpid()
        for proc in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                name = proc.info["name"] or ""
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.pid == me or name.startswith("ray::") or "default_worker.py" in cmd:
                    if self.metric == "rss":
                        size = proc.info["memory_info"].rss
                    elif self.metric == "anon":
                        size = anonymous_bytes(proc.pid)
                    else:
                        size = getattr(proc.memory_full_info(), self.metric)
                    total += size
                    if proc.pid == me:
                        self.driver_peak = max(self.driver_peak, size)
                    else:
                        self.worker_peak = max(self.worker_peak, size)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, TypeError, OSError):
                continue
        self.peak = max(self.peak, total)

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self._sample()
                time.sleep(0.25)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def anonymous_bytes(pid: int) -> int:
    """A process's anonymous memory in bytes (the ``Anonymous:`` line of /proc/PID/smaps_rollup;
    psutil does not report it)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/smaps_rollup has no Anonymous: line")
