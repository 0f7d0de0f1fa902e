"""Timing, skipping and the numbers every benchmark records.

Providers, in the order each shape runs them:

- ``naive-fp32``: what a user writes in plain PyTorch: an fp32 basis and ``torch.mv``/``mm``.
- ``naive-fp16-upcast``: an fp16 basis upcast whole to fp32 on every call, then the same.
- ``torch``, ``triton``, ``cuda``: the ``twa::`` ops with that ``backend``, each over an fp16
  basis and over an int8 one (``basis`` "int8", ids ending ``-int8``: one fp32 scale per 64
  values, 1.0625 bytes per value).

Benchmarks never run Triton's interpreter: ``triton`` and ``cuda`` need a CUDA device and skip
with the reason otherwise; on a CUDA device a backend whose implementation of the op is missing
or fails on a tiny input fails the case (the message names the error). An int8 case skips where
the package lists no int8 kernel of the op for that backend (``_ops.BLOCKWISE_BACKENDS``: not
written yet), and fails like any other where it lists one that does not run.

Every result's ``extra_info`` holds ``RESULT_KEYS`` (``record``): what was measured (``op``,
``provider``, ``D``, ``K``, ``B``, ``basis``: the basis storage dtype, or None where there is no
basis) and how it compares with the card (``pct_copy_bw``, ``x_floor``; None where the result has
no byte floor, as a whole training step, or where nothing was timed, under
``--benchmark-disable``).

The floor of an op or step is the time the least bytes an implementation over the package's
basis must move (each basis row read once per pass over it, each vector read or written once:
``shapes``) take at the copy bandwidth measured at the start of the same process (``conftest``);
``x_floor`` = time / floor, so 1.0 is a kernel that streams as fast as a device copy. The floor
is that of an fp16 basis, except for the int8 cases, whose floor is their own (int8 values and
their block scales).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from twa_kernels import _ops, ops

from .shapes import BASES, Shape, bench_device, drop_dense_basis, make_inputs, shapes

NAIVE = ("naive-fp32", "naive-fp16-upcast")
BACKEND_PROVIDERS = ("torch", "triton", "cuda")
PROVIDERS = NAIVE + BACKEND_PROVIDERS

# Seconds of timed work per benchmark. On the GPU each round runs the op enough times to last
# >= 1 ms: the one host synchronisation per round, and the idle gap after it, are spread over
# that much GPU work, and the launches between syncs overlap the GPU work as in training.
# TWA_BENCH_TIME_S overrides both budgets (e.g. a few ms for a run that only checks the suite).
CUDA_TIME_BUDGET_S = 0.25
CUDA_ROUND_S = 1e-3
CPU_TIME_BUDGET_S = 0.3
MIN_ROUNDS = 3
MAX_ROUNDS = 200
# A fit check leaves this fraction of the card for the allocator, the CUDA context and workspaces.
MEMORY_HEADROOM = 0.9

REPO = Path(__file__).resolve().parent.parent

# What every result's extra_info holds (values None where they do not apply, see the docstring).
RESULT_KEYS = ("op", "provider", "D", "K", "B", "basis", "pct_copy_bw", "x_floor")


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float16`` -> ``"float16"`` (the ``basis`` of a result); None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def time_budget(device: torch.device) -> float:
    """Seconds of timed work per benchmark: ``TWA_BENCH_TIME_S``, else the device's default."""
    if os.environ.get("TWA_BENCH_TIME_S"):
        return float(os.environ["TWA_BENCH_TIME_S"])
    return CUDA_TIME_BUDGET_S if device.type == "cuda" else CPU_TIME_BUDGET_S


def parametrize_cases(metafunc, providers, batched: bool = False) -> None:
    """Parametrize ``shape`` x ``provider`` (x ``basis``, where the test takes it), shape-major
    so that one basis serves a shape: every provider over fp16 first, then the backend providers
    over int8 (ids ending ``-int8``).

    ``--benchmark-disable`` (the suite run once as tests) gets the tiny smoke shapes.
    """
    if "shape" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    if "provider" not in metafunc.fixturenames:
        metafunc.parametrize("shape", shapes(batched, smoke), ids=lambda s: s.id)
        return
    if "basis" not in metafunc.fixturenames:
        cases = [(s, p) for s in shapes(batched, smoke) for p in providers]
        ids = [f"{s.id}-{p}" for s, p in cases]
        metafunc.parametrize("shape, provider", cases, ids=ids)
        return
    cases = [
        (s, p, b)
        for s in shapes(batched, smoke)
        for b in BASES
        for p in providers
        if b == "fp16" or p in BACKEND_PROVIDERS
    ]
    ids = [f"{s.id}-{p}" + ("" if b == "fp16" else f"-{b}") for s, p, b in cases]
    metafunc.parametrize("shape, provider, basis", cases, ids=ids)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def basis_dtype(provider: str, basis: str = "fp16") -> torch.dtype:
    """The storage of ``provider``'s basis in a case of ``basis`` (fp16 or int8)."""
    return torch.float32 if provider == "naive-fp32" else BASES[basis]


def floor_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The storage whose bytes make a case's floor: int8 for an int8 basis, else fp16."""
    return torch.int8 if dtype == torch.int8 else torch.float16


def skip_unless_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Skip when ``nbytes`` of device memory cannot be allocated on this card."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes > MEMORY_HEADROOM * total:
        pytest.skip(f"{what} needs {nbytes / 1e9:.0f} GB, the card has {total / 1e9:.0f} GB")


# The twa:: ops a one-process TWA runs (the int8 check of the step benchmarks): the fused step,
# and at its construction P^T w0 and the start weights.
STEP_OPS = ("step_", "project", "reconstruct_")


def int8_kernels_missing(op: str, backend: str) -> list[str]:
    """The twa:: ops of ``op`` (a benchmark's op, or "twa_step") that ``backend`` has no int8
    kernel for, as the package lists them (``_ops.BLOCKWISE_BACKENDS``)."""
    names = STEP_OPS if op == "twa_step" else (op,)
    return [name for name in names if backend not in _ops.BLOCKWISE_BACKENDS.get(name, ())]


@functools.cache
def _backend_error(op: str, backend: str, dtype: torch.dtype = torch.float16) -> str | None:
    """None when ``backend`` runs ``op`` on a tiny CUDA input, else what went wrong.

    Deterministic mode (warnings only) has the Triton kernels run their first config instead of
    autotuning: one compilation per kernel instead of one per config (about a second each), for
    an input that only checks the backend runs.
    """
    dev = torch.device("cuda")
    if dtype == torch.int8:
        basis = torch.randint(-127, 128, (4, 1000), dtype=torch.int8, device=dev)
        scales = torch.full((4, 16), 0.01, device=dev)
    else:
        basis = torch.randn(4, 1000, device=dev).half()
        scales = torch.ones(4, device=dev)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        if op == "project":
            ops.project(basis, scales, torch.randn(1000, device=dev), backend=backend)
        elif op == "reconstruct_":
            out = torch.empty(1000, device=dev)
            w0 = torch.zeros(1000, device=dev)
            ops.reconstruct_(out, w0, basis, scales, torch.ones(4, device=dev), backend=backend)
        elif op == "orthogonalize_":
            ops.orthogonalize_(basis, scales, torch.randn(1000, device=dev), 3, backend=backend)
        elif op == "twa_step":
            from twa_kernels import _backend

            if backend == "triton":
                from twa_kernels._triton.step import fused_twa_step  # noqa: F401
            for name in ("project", "reconstruct_", "subspace_step_"):
                _backend.implementation(name, backend)
        else:
            raise ValueError(op)
        torch.cuda.synchronize(dev)
    except Exception as exc:  # reported by the caller as a failure, once per op and backend
        return f"backend={backend!r} cannot run {op}: {type(exc).__name__}: {str(exc)[:2000]}"
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    return None


def skip_unless_backend(
    op: str, provider: str, device: torch.device, dtype: torch.dtype = torch.float16
) -> None:
    """Skip a GPU backend on a machine without CUDA, and an int8 case of a backend the package
    lists no int8 kernel of ``op`` for; on a CUDA device, a backend that cannot run ``op`` fails
    the case (a broken kernel must not read as a missing measurement)."""
    if provider not in BACKEND_PROVIDERS:
        return
    if dtype == torch.int8:
        missing = int8_kernels_missing(op, provider)
        if missing:
            pytest.skip(f"backend={provider!r} has no int8 kernel of {', '.join(missing)} yet")
    if provider == "torch":
        return
    if device.type != "cuda":
        if provider == "triton":
            pytest.skip("backend='triton' needs a CUDA device; benchmarks never use Triton's interpreter")
        pytest.skip(f"backend={provider!r} needs a CUDA device")
    error = _backend_error(op, provider, dtype)
    if error:
        pytest.fail(error)


# ---------------------------------------------------------------------------------------------
# timing


def prepare_case(
    benchmark, op: str, provider: str, shape: Shape, device: torch.device, need: int, basis: str = "fp16"
):
    """Skip a case that cannot run here, name its group, and make its inputs.

    ``need`` is the bytes the op's fp16 case holds (an int8 case holds less); the naive providers
    also hold a dense fp32 basis (or its upcast), 4KD bytes more. Returns ``(basis dtype,
    inputs)``.
    """
    dtype = basis_dtype(provider, basis)
    skip_unless_backend(op, provider, device, dtype)
    if provider in NAIVE:
        need += 4 * shape.K * shape.D
    skip_unless_fits(need, device, f"{provider} at {shape.id}")
    if dtype != torch.float32:
        drop_dense_basis()
    benchmark.group = f"{op.rstrip('_')} {shape.id}"
    return dtype, make_inputs(shape, dtype, device)


def _flush_l2(device: torch.device):
    """A setup that evicts the GPU's L2 (50 MB on H100/H200) so no round starts warm."""
    if device.type != "cuda":
        return None
    scratch = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def setup():
        scratch.zero_()
        torch.cuda.synchronize(device)

    return setup


def run(benchmark, fn, device: torch.device, min_rounds: int = MIN_ROUNDS):
    """Time ``fn`` with ``benchmark.pedantic``; GPU work is complete when each round ends.

    On the GPU one call of ``fn`` is timed first; a round then runs ``fn`` ``n`` times with one
    synchronisation at its end (``n`` such that a round lasts >= CUDA_ROUND_S), and the stats are
    per call. With ``n == 1`` each round starts from a flushed L2 instead.
    """
    synchronize(device)
    if benchmark.disabled:  # one plain call: --benchmark-disable runs the suite as tests

        def once():
            fn()
            synchronize(device)

        benchmark.pedantic(once, rounds=1)
        return
    fn()  # compile, autotune, allocate: none of it is timed
    synchronize(device)
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        once = t0.elapsed_time(t1) / 1e3
        n = max(1, math.ceil(CUDA_ROUND_S / max(once, 1e-7)))
        rounds = _rounds(time_budget(device), once * n, min_rounds)
    else:
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        n = 1
        rounds = _rounds(time_budget(device), once, min_rounds)

    if n == 1:

        def target():
            fn()
            synchronize(device)

        benchmark.pedantic(target, setup=_flush_l2(device), rounds=rounds, warmup_rounds=1)
    else:
        calls = [0]

        def target():
            fn()
            calls[0] += 1
            if calls[0] % n == 0:
                torch.cuda.synchronize(device)

        benchmark.pedantic(target, rounds=rounds, iterations=n, warmup_rounds=1)
    synchronize(device)
    benchmark.extra_info["calls_per_round"] = n


def _rounds(budget: float, per_round: float, min_rounds: int) -> int:
    return int(min(MAX_ROUNDS, max(min_rounds, budget // max(per_round, 1e-9))))


def record(
    benchmark,
    *,
    op: str,
    provider: str,
    shape: Shape,
    basis: torch.dtype | None,
    copy_bw: float,
    nbytes: int | None,
    floor_bytes: int | None = None,
    **extra,
) -> None:
    """Put ``RESULT_KEYS``, the bytes moved, GB/s and the card and versions in extra_info.

    ``basis``: the dtype the provider stores the basis in (None: no basis). ``nbytes``: the least
    this provider's storage must move (None: no byte count, as for a whole training step), from
    which ``gbps`` and ``pct_copy_bw`` (% of the measured copy bandwidth) follow;
    ``floor_bytes`` (default ``nbytes``): the same for the package's own layout (fp16 basis), the
    floor ``x_floor`` is measured against. Both are None where nothing was timed.
    """
    info = benchmark.extra_info
    info.update(op=op, provider=provider, model=shape.model, D=shape.D, K=shape.K, B=shape.B)
    floor = floor_bytes if floor_bytes is not None else nbytes
    info.update(basis=dtype_name(basis), bytes_moved=nbytes, floor_bytes=floor)
    info.update(copy_gbps=round(copy_bw / 1e9, 2), pct_copy_bw=None, x_floor=None, **extra)
    info.update(machine_summary())
    stats = getattr(benchmark, "stats", None)
    if benchmark.disabled or stats is None:
        return
    seconds = stats.stats.median
    if nbytes is not None:
        info["gbps"] = round(nbytes / seconds / 1e9, 3)
        info["pct_copy_bw"] = round(100 * nbytes / seconds / copy_bw, 2)
    if floor is not None:
        info["x_floor"] = round(seconds / (floor / copy_bw), 3)


# ---------------------------------------------------------------------------------------------
# what the run was made on


def device_name(device: torch.device | None = None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def git_commit() -> str:
    """``TWA_GIT_COMMIT`` when set, else HEAD (``+dirty`` when tracked files changed)."""
    if os.environ.get("TWA_GIT_COMMIT"):
        return os.environ["TWA_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def machine_summary() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    device = bench_device()
    return {
        "card": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
