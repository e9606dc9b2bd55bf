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
