"""Backend ``"cuda"``: the CUDA C++ kernels in ``csrc/``, registered as ``torch.ops.twa_cuda.*``.

The extension is loaded on first use, never at ``import twa_kernels``: the prebuilt
``twa_kernels._C`` when the package was installed with ``TWA_KERNELS_BUILD_CUDA=1``, otherwise
a JIT build of ``csrc/`` through ``torch.utils.cpp_extension.load`` with ninja (cached under
``TORCH_EXTENSIONS_DIR``; about 25 s the first time on 2 cores, instant afterwards).

The functions take the arguments of the ``twa::`` ops without ``backend`` and follow
``twa_kernels.reference``. Every op that reads a basis also takes an int8 one with its block
scales, fp32 [K, ceil(D / 64)] (kernels of their own, dequantising with byte permutes;
``orthogonalize_`` quantises the row it stores per block of 64 values).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ._cuda_build import CXX_FLAGS, HEADERS, NVCC_FLAGS, SOURCES  # noqa: F401 (HEADERS: for callers)
from ._layout import warn_if_narrow
from ._ops import check_rank
from ._param_table import BLOCK, Plan, plan_for

EXTENSION_NAME = "twa_kernels_cuda"
# Used when no GPU is visible to pick an architecture from: the H100/H200 generation.
DEFAULT_ARCH_LIST = "9.0"
# Where the toolkit usually lives when neither torch nor CUDA_HOME names it.
FALLBACK_CUDA_HOME = "/usr/local/cuda"


def csrc_dir() -> Path:
    """The directory holding the kernel sources (a checkout, an installed wheel or an override)."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("TWA_KERNELS_CSRC"):
        candidates.append(Path(os.environ["TWA_KERNELS_CSRC"]))
    candidates += [here / "csrc", here.parent / "csrc"]
    for path in candidates:
        if (path / SOURCES[0]).is_file():
            return path
    try:
        from importlib import resources

        path = Path(str(resources.files("twa_kernels.csrc")))
        if (path / SOURCES[0]).is_file():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    raise RuntimeError(
        "twa_kernels: the CUDA sources (csrc/bindings.cpp, ...) were not found next to the "
        "package; set TWA_KERNELS_CSRC to the csrc/ directory"
    )


def _cuda_home() -> str:
    """A CUDA toolkit root with nvcc, set as torch's CUDA_HOME; RuntimeError when there is none."""
    from torch.utils import cpp_extension

    candidates = [
        cpp_extension.CUDA_HOME,
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        FALLBACK_CUDA_HOME,
    ]
    for root in candidates:
        # torch guesses the parent of the nvcc on PATH; a /usr/local/bin/nvcc wrapper then gives
        # /usr/local, which has no include/cuda_runtime.h.
        if root and Path(root, "bin", "nvcc").is_file() and Path(root, "include", "cuda_runtime.h").is_file():
            cpp_extension.CUDA_HOME = root
            os.environ["CUDA_HOME"] = root
            return root
    raise RuntimeError(
        "twa_kernels backend='cuda' must compile its kernels and needs the CUDA toolkit (nvcc), "
        "which was not found: set CUDA_HOME to the toolkit root (the directory with bin/nvcc), "
        "or install with TWA_KERNELS_BUILD_CUDA=1 on a machine that has it"
    )


def _jit_build(verbose: bool):
    from torch.utils import cpp_extension

    _cuda_home()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch reads the architecture from the visible device; without one it fails with an
        # IndexError, so build for a default instead.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    src = csrc_dir()
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        verbose=verbose,
    )


@functools.cache
def load(verbose: bool = False):
    """Load the extension (once) and return its module; ``torch.ops.twa_cuda`` is then defined.

    Raises RuntimeError saying what is missing when torch is not a CUDA build or there is no
    CUDA toolkit to build with.
    """
    if torch.version.cuda is None:
        raise RuntimeError(
            "twa_kernels backend='cuda' needs a CUDA build of PyTorch; this torch "
            f"({torch.__version__}) is built without CUDA. Use backend='torch' or 'triton', or "
            "install a CUDA build of torch"
        )
    if os.environ.get("TWA_KERNELS_FORCE_JIT") != "1":
        try:
            return importlib.import_module("twa_kernels._C")
        except ModuleNotFoundError:
            pass
        except (ImportError, OSError) as exc:
            # A stale build (another torch or CUDA version) fails to link; rebuild instead.
            warnings.warn(f"twa_kernels._C does not load ({exc}); building csrc/ instead")
    return _jit_build(verbose)


def _ops():
    load()
    return torch.ops.twa_cuda


def project(basis: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    warn_if_narrow(basis, "cuda")
    return _ops().project(basis, scales, x)


def reconstruct_(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    warn_if_narrow(basis, "cuda")
    _ops().reconstruct_(out, w0, basis, scales, alpha)


def orthogonalize_(
    basis: Tensor,
    scales: Tensor,
    sample: Tensor,
    rank: int,
    *,
    all_reduce: Callable[[Tensor, str], None] | None = None,
) -> Tensor:
    """CGS2 of ``sample`` fp32 [D] against rows [0, rank) of ``basis`` [K, D]: fp64 [rank + 2].

    Without ``all_reduce``, one ``twa_cuda::orthogonalize_`` call. With it (the hook of
    ``reference.orthogonalize_``, for a basis sharded along D), the same kernels run in three
    ``twa_cuda::orthogonalize_phase_`` calls on an fp64 workspace sized by
    ``twa_cuda::orthogonalize_workspace``, and the hook gets fp64 CUDA views of that workspace to
    combine in place: after phase 1 the raw ``[P^T v, ||v||^2]`` [rank + 1] ("sum"); after phase
    2 the raw ``[P^T v1, ||v1||^2]`` [rank + 1] ("sum"), then ``max|v1|`` [1] ("max"). Phase 3
    writes the result, row ``rank`` and ``scales[rank]`` (when ``rank < K``).
    """
    warn_if_narrow(basis, "cuda")
    ops = _ops()
    if all_reduce is None:
        return ops.orthogonalize_(basis, scales, sample, rank)
    # The workspace op checks the arguments as orthogonalize_ does, and sizes the workspace for
    # the split over D that all three phases use.
    elems, sums1, sums2 = ops.orthogonalize_workspace(basis, scales, sample, rank)
    workspace = torch.empty(elems, dtype=torch.float64, device=sample.device)
    result = torch.empty(rank + 2, dtype=torch.float64, device=sample.device)
    ops.orthogonalize_phase_(basis, scales, sample, rank, workspace, result, 1)
    all_reduce(workspace[sums1 : sums1 + rank + 1], "sum")
    ops.orthogonalize_phase_(basis, scales, sample, rank, workspace, result, 2)
    all_reduce(workspace[sums2 : sums2 + rank + 1], "sum")
    all_reduce(workspace[sums2 + rank + 1 : sums2 + rank + 2], "max")
    ops.orthogonalize_phase_(basis, scales, sample, rank, workspace, result, 3)
    return result


def subspace_step_(
    alpha: Tensor,
    momentum_buffer: Tensor,
    counters: Tensor,
    coord_grad: Tensor,
    gram: Tensor,
    pw0: Tensor,
    lr: Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    _ops().subspace_step_(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        lr, float(momentum), float(dampening), float(weight_decay), bool(nesterov),
    )  # fmt: skip


# ---- the fused step: gradients read and parameters written in place, through the tables of
# _param_table (csrc/step.cu)

# (device, basis dtype, K, table blocks) -> (splits, K tiles) of the projection.
_step_sizes: dict[tuple, tuple[int, int]] = {}


def _projection_workspaces(plan: Plan, basis: Tensor) -> tuple[Tensor, Tensor]:
    """The plan's partials fp32 [splits, K] and tickets int32 [K tiles] (zeroed once: every
    launch leaves them zero) for ``basis``; fixed addresses, so CUDA graphs can replay them."""
    K = basis.shape[0]
    nblk = plan.btab.shape[0]
    key = (basis.device, basis.dtype, K, nblk)
    sizes = _step_sizes.get(key)
    if sizes is None:
        splits, tiles, block = _ops().step_sizes(basis, nblk)
        if block != BLOCK:
            raise RuntimeError(
                f"twa_kernels: the CUDA step cuts parameters into blocks of {block} columns, "
                f"_param_table into blocks of {BLOCK}: rebuild the extension"
            )
        sizes = _step_sizes[key] = (splits, tiles)
    splits, tiles = sizes
    part = plan.workspace("cuda_step_partials", (splits, K))
    tickets = plan.workspace("cuda_step_tickets", (tiles,), zero=True)
    return part, tickets.view(torch.int32)


def project_grads(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, basis: Tensor, scales: Tensor,
    segments: list[int] | None = None,
) -> Tensor:  # fmt: skip
    """``twa::project_grads`` on the CUDA backend (see ``reference.project_grads``): one kernel
    reads ``grads`` in place (None: zero) and adds its partials over D in a fixed order;
    ``workspace`` is not used. fp32 [K].

    With ``segments`` (one coefficient row per parameter, non-decreasing): fp32
    [segments[-1] + 1, K], row l the projection of the parameters of row l (0 for a row of no
    parameter), in two launches: the same pass over the basis keeping each warp's sums per
    row, then a fixed-order sum of each row's partials over the warps that hold its blocks."""
    warn_if_narrow(basis, "cuda")
    ops = _ops()
    plan = plan_for(params, basis.device)
    ptab, keep = plan.table(params, grads)
    if segments is None:
        part, tickets = _projection_workspaces(plan, basis)
        out = torch.empty(basis.shape[0], dtype=torch.float32, device=basis.device)
        ops.step_project_(ptab, plan.btab, basis, scales, part, tickets, out)
    else:
        rows = _segment_rows(tuple(segments), len(params))
        part, starts = _block_workspaces(plan, basis, rows)
        out = torch.empty(rows, basis.shape[0], dtype=torch.float32, device=basis.device)
        seg = plan.segment_table(segments)
        ops.step_project_blocks_(ptab, plan.btab, basis, scales, seg, part, starts, out)
    del keep  # contiguous copies of strided grads live until the launch is queued
    return out


def step_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, w0: Tensor,
    basis: Tensor, scales: Tensor, alpha: Tensor, momentum_buffer: Tensor, counters: Tensor,
    gram: Tensor, pw0: Tensor, lr: Tensor, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool,
) -> None:  # fmt: skip
    """``twa::step_`` on the CUDA backend (see ``reference.step_``) in four launches: ``P^T g``
    straight from ``grads``, the K-dimensional step (skipped on the device when ``P^T g`` is not
    finite), then ``w0 + P alpha`` written into every parameter in its dtype. ``workspace`` is
    not used; no host synchronisation.

    CUDA graphs: the step can be captured once an eager step has run with the very ``.grad``
    tensors the graph will read (see ``_param_table``); ``lr`` is read from device memory at
    replay, the other hyperparameters are fixed at their capture values.
    """
    K, D = basis.shape
    check_rank("fused TWA step", K)
    warn_if_narrow(basis, "cuda")
    ops = _ops()
    plan = plan_for(params, basis.device)
    torch._check(plan.numel == D, lambda: f"parameters hold {plan.numel} values, the basis has D={D}")
    ptab, keep = plan.table(params, grads)
    part, tickets = _projection_workspaces(plan, basis)
    ops.fused_step_(
        ptab, plan.btab, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0, lr, part,
        tickets, plan.workspace("cuda_step_coord", (K,)), plan.workspace("cuda_step_direction", (K,)),
        float(momentum), float(dampening), float(weight_decay), bool(nesterov),
    )  # fmt: skip
    del keep  # contiguous copies of strided grads live until all launches are queued


# ---- per-block coordinates: the fused step's kernels with each parameter's coefficient row
# (segments), and the coordinate step of every block (csrc/step.cu)

# (device, basis dtype, K, table blocks, rows) -> rows of the per-block projection's partials.
_block_sizes: dict[tuple, int] = {}
# (device, alpha address) -> the block step's ticket, int32 [1] (every launch leaves it zero).
_block_tickets: dict[tuple, Tensor] = {}


@functools.lru_cache(maxsize=256)
def _segment_rows(segments: tuple[int, ...], params: int) -> int:
    """The coefficient rows ``segments`` reaches (its last entry + 1), after checking that it has
    one non-decreasing row >= 0 per parameter: the kernels trust it (a row out of place would
    write past their workspaces)."""
    if len(segments) != params:
        raise ValueError(f"segments has {len(segments)} entries, the parameter list {params}")
    if any(not isinstance(s, int) for s in segments) or segments[0] < 0:
        raise ValueError(f"segments must be non-negative ints, got {list(segments)[:8]}...")
    for i in range(1, params):
        if segments[i] < segments[i - 1]:
            raise ValueError(
                f"segments must be non-decreasing: segments[{i - 1}] = {segments[i - 1]}, "
                f"segments[{i}] = {segments[i]}"
            )
    return segments[-1] + 1


def _block_workspaces(plan: Plan, basis: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """The plan's per-block projection workspaces for ``rows`` coefficient rows: partials fp32
    [warps + rows, K] and starts int32 [rows + 1] (both written before they are read)."""
    K = basis.shape[0]
    nblk = plan.btab.shape[0]
    key = (basis.device, basis.dtype, K, nblk, rows)
    n = _block_sizes.get(key)
    if n is None:
        n = _block_sizes[key] = _ops().step_blocks_sizes(basis, nblk, rows)[0]
    part = plan.workspace("cuda_blocks_partials", (n, K))
    starts = plan.workspace("cuda_blocks_starts", (rows + 1,)).view(torch.int32)
    return part, starts


def _checked_segments(plan: Plan, params: list[Tensor], segments: list[int], rows: int) -> Tensor:
    """The device segment table, after checking that every entry is a row of ``rows``."""
    last = _segment_rows(tuple(segments), len(params)) - 1
    torch._check(last < rows, lambda: f"segments reach row {last}, the coefficients have {rows} rows")
    return plan.segment_table(segments)


def write_params_(
    params: list[Tensor], workspace: Tensor | None, w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
    segments: list[int] | None,
) -> None:  # fmt: skip
    """``twa::write_params_`` on the CUDA backend (see ``reference.write_params_``): the fused
    step's write kernel alone, ``w0 + P coef`` written into every parameter in its dtype (with
    ``segments``, parameter i takes row ``segments[i]`` of coef [rows, K]). One launch;
    ``workspace`` is not used. Graph-capturable after one eager call with the same
    parameters and segments."""
    warn_if_narrow(basis, "cuda")
    D = basis.shape[1]
    plan = plan_for(params, basis.device)
    torch._check(plan.numel == D, lambda: f"parameters hold {plan.numel} values, the basis has D={D}")
    seg = None
    if segments is not None:
        torch._check(coef.dim() == 2, lambda: f"coef must be [rows, K] with segments: {tuple(coef.shape)}")
        seg = _checked_segments(plan, params, segments, coef.shape[0])
    _ops().step_write_(plan.param_table(params), plan.btab, w0, basis, scales, coef, seg)


def _block_step_ticket(alpha: Tensor) -> Tensor:
    """The block step's ticket for the coordinates at ``alpha``'s address: launches on one
    ``alpha`` are ordered (they update it), so they may share it."""
    key = (alpha.device, alpha.data_ptr())
    ticket = _block_tickets.get(key)
    if ticket is None:
        ticket = _block_tickets[key] = torch.zeros(1, dtype=torch.int32, device=alpha.device)
    return ticket


def block_step_(
    alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor, coord_grad: Tensor, gram: Tensor,
    pw0: Tensor, inv_norms: Tensor, coef: Tensor, lr: Tensor, rule: str, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """``twa::block_step_`` on the CUDA backend (see ``reference.block_step_``): the coordinate
    step of every block (``rule`` "sgd" or "adamw"), skipped on the device unless every entry
    of ``coord_grad * inv_norms`` is finite, then ``coef = alpha * inv_norms``. One launch, no
    host synchronisation; ``lr`` is read on the device."""
    _ops().block_step_(
        alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, _block_step_ticket(alpha),
        str(rule), float(momentum), float(dampening), float(weight_decay), bool(nesterov), float(beta1),
        float(beta2), float(eps),
    )  # fmt: skip


def step_blocks_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, w0: Tensor, basis: Tensor,
    scales: Tensor, alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor, gram: Tensor, pw0: Tensor,
    inv_norms: Tensor, coef: Tensor, segments: list[int], lr: Tensor, rule: str, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """``twa::step_blocks_`` on the CUDA backend: the per-block projection of ``grads`` read in
    place (``project_grads`` with ``segments``, over alpha's L rows), ``block_step_``, then
    ``write_params_`` with ``coef`` and ``segments``: one ``twa_cuda::fused_block_step_``
    call, four launches, no host synchronisation; ``workspace`` is not used.

    CUDA graphs: as ``step_``, capturable once an eager step has run with the very ``.grad``
    tensors (and segments) the graph will read; ``lr`` is read on the device at replay."""
    K, D = basis.shape
    check_rank("fused TWA step", K)
    warn_if_narrow(basis, "cuda")
    ops = _ops()
    plan = plan_for(params, basis.device)
    torch._check(plan.numel == D, lambda: f"parameters hold {plan.numel} values, the basis has D={D}")
    torch._check(alpha.dim() == 2, lambda: f"alpha must be [L, K], got {tuple(alpha.shape)}")
    L = alpha.shape[0]
    seg = _checked_segments(plan, params, segments, L)
    ptab, keep = plan.table(params, grads)
    part, starts = _block_workspaces(plan, basis, L)
    ops.fused_block_step_(
        ptab, plan.btab, w0, basis, scales, seg, alpha, buf1, buf2, counters, gram, pw0, inv_norms, coef,
        lr, part, starts, plan.workspace("cuda_blocks_coord", (L, K)),
        plan.workspace("cuda_blocks_ticket", (1,), zero=True).view(torch.int32),
        str(rule), float(momentum), float(dampening), float(weight_decay), bool(nesterov), float(beta1),
        float(beta2), float(eps),
    )  # fmt: skip
    del keep  # contiguous copies of strided grads live until all launches are queued
