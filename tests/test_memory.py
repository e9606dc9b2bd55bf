"""PeakMemory's per-process figures: what a "memory is flat in the input size" check reads."""
import gc
import os
import time

import numpy as np
import psutil
import pytest

from mammo_ray.memory import PeakMemory, anonymous_bytes

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="smaps_rollup is Linux-only")


def test_anonymous_bytes_count_what_this_process_allocates():
    import mmap

    # CI read +0 MB from np.ones after 600 tests: the allocation can trigger the garbage
    # collector, which frees an earlier test's arrays in between, or reuse freed heap. So the
    # garbage goes first, and the block is a fresh anonymous mapping with every page written.
    gc.collect()
    before = anonymous_bytes(os.getpid())
    block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(block, dtype=np.uint8)[::4096] = 1
    grown = anonymous_bytes(os.getpid()) - before
    assert 60 * 2**20 < grown < 80 * 2**20, grown
    block.close()
    with pytest.raises(ValueError, match=r"metric='vms': use one of rss, pss, uss, anon"):
        PeakMemory(metric="vms")


def test_driver_memory_does_not_grow_when_a_worker_sharing_its_pages_exits(ray_local):
    """An object the driver read stays in the object store's pages, and the libraries it maps
    are mapped by the workers too: both are shared while the worker lives and the driver's
    alone once it exits. USS counts them then, as if the driver had allocated them; the
    anonymous memory PeakMemory(metric="anon") reads does not."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self):
            return np.ones(96 * 2**20 // 8)

    maker = Maker.remote()
    array = ray.get(maker.make.remote())
    assert float(array.sum()) == array.size  # the driver touches every page
    me = psutil.Process()
    with PeakMemory(metric="anon") as mem:
        time.sleep(0.5)
        anon, uss = anonymous_bytes(me.pid), me.memory_full_info().uss
        ray.kill(maker)
        time.sleep(2)
    anon_growth, uss_growth = anonymous_bytes(me.pid) - anon, me.memory_full_info().uss - uss
    del array
    assert uss_growth > 64 * 2**20, "the worker's exit no longer moves its pages: this test shows nothing"
    assert anon_growth < 8 * 2**20 and mem.driver_peak < anon + 8 * 2**20, (anon_growth, mem.driver_peak - anon)


def test_only_this_sessions_workers_are_counted(ray_local):
    """Another Ray's worker on the machine (here a process whose command line names Ray's
    default_worker.py, holding 2 GB, as the earlier filter matched them) is not this job's:
    PeakMemory samples this session's actor (96 MB) and not the stranger, whose size would
    have been the worker peak."""
    import subprocess
    import sys

    from mammo_ray.memory import session_workers

    ray = ray_local
    stranger = subprocess.Popen([sys.executable, "-c", "import sys, numpy as np; a = np.ones(2048 * 2**20 // 8); "
                                 "print('ready', flush=True); sys.stdin.read()", "default_worker.py"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert stranger.stdout.readline().strip() == "ready"
        assert anonymous_bytes(stranger.pid) > 2000 * 2**20

        @ray.remote(num_cpus=0)
        class Holder:
            def __init__(self):
                self.a = np.ones(96 * 2**20 // 8)

            def pid(self):
                return os.getpid()

        holder = Holder.remote()
        pid = ray.get(holder.pid.remote())
        assert pid in {p.pid for p in session_workers(psutil)} and stranger.pid not in {p.pid for p in session_workers(psutil)}
        with PeakMemory(metric="anon") as mem:
            time.sleep(1)
        assert pid in mem.worker_pids and stranger.pid not in mem.worker_pids
        assert 90 * 2**20 < mem.worker_peak < 2000 * 2**20, mem.worker_peak / 2**20
        ray.kill(holder)
    finally:
        stranger.kill()
        stranger.wait()
