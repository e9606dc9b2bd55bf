"""Peak memory of a Ray job on this machine: the summed RSS of this process and the Ray worker
processes of its own Ray session, and the largest single process, sampled in a thread (psutil;
Ray has no per-job memory high-water mark)."""
from __future__ import annotations

import os
import threading
import time


class PeakMemory:
    """Samples the summed memory of this process and its Ray session's worker processes (every
    0.25 s): the processes under this session's raylets (one per node of a local Cluster), not
    every ``ray::`` process on the machine. Counting another Ray's workers made a score job
    beside a real-data training run read 3.3-4 GB for its "largest worker" (the training
    trial's) and a growth of 184-417 MB between archive sizes that was the other run's.

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
        self.worker_pids: set[int] = set()  # every worker process sampled

    def _size(self, proc) -> int:
        if self.metric == "rss":
            return proc.memory_info().rss
        if self.metric == "anon":
            return anonymous_bytes(proc.pid)
        return getattr(proc.memory_full_info(), self.metric)

    def _sample(self) -> None:
        total, me = 0, self.psutil.Process()
        for proc in [me, *session_workers(self.psutil)]:
            try:
                size = self._size(proc)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, TypeError, OSError):
                continue  # exited between the listing and the reading
            total += size
            if proc.pid == me.pid:
                self.driver_peak = max(self.driver_peak, size)
            else:
                self.worker_peak = max(self.worker_peak, size)
                self.worker_pids.add(proc.pid)
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


def session_dir() -> str | None:
    """This process's Ray session folder (``/tmp/ray/session_...``), None while Ray is not
    initialised here. Ray has no public call for it; its raylets name it in their command lines."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # a Ray without this private attribute: no workers are attributed
        return None


def session_workers(psutil) -> list:
    """The processes under this session's raylets on this machine (workers, actors, agents)."""
    session = session_dir()
    if not session:
        return []
    marker = os.path.join(session, "sockets", "raylet")
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if (proc.info["name"] or "").startswith("raylet") and marker in " ".join(proc.info["cmdline"] or []):
                found.extend(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def anonymous_bytes(pid: int) -> int:
    """A process's anonymous memory in bytes (the ``Anonymous:`` line of /proc/PID/smaps_rollup;
    psutil does not report it)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/smaps_rollup has no Anonymous: line")
