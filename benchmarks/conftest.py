"""Benchmark fixtures: the device, the measured copy bandwidth, and the run's machine info.

Triton's interpreter is never switched on here: on a machine without a GPU the ``triton`` and
``cuda`` providers skip, and the naive and ``torch`` providers run on the CPU.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from .harness import machine_summary
from .shapes import bench_device

# Copy bandwidth: on the GPU a 1 GiB device-to-device copy_ (0.3 ms at H200 speeds), the best of
# 20 timed with CUDA events; on the CPU a 256 MiB torch copy_ (larger than any cache), best of 5.
# With --benchmark-disable the sizes are small: the figure is then only carried, not used.
GPU_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 256 << 20
SMOKE_COPY_BYTES = 16 << 20

_measured: dict = {}


def pytest_configure(config):
    # TWA_BENCH_THREADS=1 on a shared CPU: with 2 threads on 2 busy cores each parallel region
    # waits for a descheduled thread, and one 1M-element copy_ measured 0.05 ms or 8 ms by turns.
    # A --benchmark-disable run times nothing, so it always takes one thread: on this 2-core
    # machine under a load average of 6 it took 34 s with two threads and 5.8 s with one.
    threads = os.environ.get("TWA_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif config.getoption("benchmark_disable", False):
        torch.set_num_threads(1)


def measure_copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        best = min(best, seconds)
    return 2 * src.numel() * 4 / best


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def copy_bw(request, device) -> float:
    """The measured limit every GB/s figure is compared with (bytes/s)."""
    if request.config.getoption("benchmark_disable", False):
        nbytes, reps = SMOKE_COPY_BYTES, 2
    elif device.type == "cuda":
        nbytes, reps = GPU_COPY_BYTES, 20
    else:
        nbytes, reps = CPU_COPY_BYTES, 5
    bw = measure_copy_bandwidth(device, nbytes, reps)
    _measured["copy_gbps"] = round(bw / 1e9, 2)
    _measured["copy_bytes"] = nbytes
    _measured["copy_device"] = str(device)
    return bw


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine_summary())
    machine_info.update(_measured)
