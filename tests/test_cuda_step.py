"""The fused CUDA step (csrc/step.cu) beyond the backend-parametrised tests of
test_fused_step_op.py: many splits and K tiles, the largest rank, its workspaces and the
messages of its ops; over an int8 basis, its own kernels at awkward sizes and layouts. Needs a
CUDA device (the extension is built on first use)."""

import warnings

import pytest
import torch
from conftest import TOL
from oracle import assert_within

from twa_kernels import _ops, ops
from twa_kernels._param_table import BLOCK, plan_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA step needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_ops():
    from twa_kernels import _cuda

    _cuda.load()  # a build failure is an error, not a skip
    return torch.ops.twa_cuda


def make(shapes, dtypes, K, dtype, seed=0):
    """Parameters with grads, and a subspace (rows 128-byte aligned) over them."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=g, device=device).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    grads = [torch.randn(p.shape, generator=g, device=device).to(p.dtype) for p in params]
    D = sum(p.numel() for p in params)
    basis = ops.empty_basis(K, D, dtype, device)
    basis.copy_(torch.randn(K, D, generator=g, device=device).to(dtype))
    scales = torch.rand(K, generator=g, device=device) / D**0.5 + 1e-3
    state = dict(
        w0=torch.randn(D, generator=g, device=device),
        basis=basis,
        scales=scales,
        alpha=torch.zeros(K, device=device),
        momentum_buffer=torch.zeros(K, device=device),
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        gram=torch.eye(K, device=device),
        pw0=torch.zeros(K, device=device),
    )
    return params, grads, state


def flat(tensors):
    return torch.cat([t.double().flatten() for t in tensors])


@pytest.mark.parametrize(
    "shapes, K",
    [
        # 2^20 + 517 values in 2050 blocks: hundreds of splits added by the last block of threads
        ([(1 << 20,), (517,)], 40),
        # The largest rank: 256 K tiles, 32 KiB of coefficients in the write kernel's shared memory
        ([(1100,)], _ops.MAX_RANK),
    ],
    ids=["many-splits", "max-rank"],
)
def test_large_steps_match_the_fp64_oracle(cuda_ops, shapes, K):
    params, grads, s = make(shapes, [torch.float32, torch.bfloat16][: len(shapes)], K, torch.float16)
    P = s["basis"].double() * s["scales"].double()[:, None]
    g = flat(grads)
    D = g.numel()
    workspace = torch.empty(D, device="cuda")
    coord = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend="cuda")
    assert_within(coord, P @ g, P.abs() @ g.abs(), TOL[torch.float32], "P^T g")
    lr = 0.5
    ops.step_(params, grads, workspace, *s.values(), lr, backend="cuda")
    a = s["alpha"].double()
    assert_within(a, -lr * (P @ g), lr * (P.abs() @ g.abs()), TOL[torch.float32], "alpha")
    w, bound = s["w0"].double() + a @ P, s["w0"].double().abs() + a.abs() @ P.abs()
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        got = p.double().flatten()
        assert_within(got, w[offset : offset + n], bound[offset : offset + n], TOL[p.dtype], f"params[{i}]")
        offset += n


def test_workspaces_and_block_size(cuda_ops):
    params, grads, s = make([(3000,), (17,)], [torch.float32, torch.float16], 33, torch.bfloat16)
    splits, tiles, block = cuda_ops.step_sizes(s["basis"], plan_for(params, s["basis"].device).nblk)
    assert block == BLOCK and tiles == 2 and splits >= 1
    ops.step_(params, grads, torch.empty(3017, device="cuda"), *s.values(), 0.1, backend="cuda")
    plan = plan_for(params, s["basis"].device)
    tickets = plan.workspace("cuda_step_tickets", (tiles,)).view(torch.int32)
    assert tickets.tolist() == [0] * tiles  # every launch leaves them ready for the next
    assert plan.workspace("cuda_step_partials", (splits, 33)).shape == (splits, 33)


def test_bad_arguments_are_named(cuda_ops):
    params, grads, s = make([(600,)], [torch.float32], 5, torch.float16)
    plan = plan_for(params, s["basis"].device)
    ptab, _ = plan.table(params, grads)
    splits, tiles, _ = cuda_ops.step_sizes(s["basis"], plan.nblk)
    part = torch.empty(splits, 5, device="cuda")
    tickets = torch.zeros(tiles, dtype=torch.int32, device="cuda")
    out = torch.empty(5, device="cuda")
    base = dict(ptab=ptab, btab=plan.btab, basis=s["basis"], scales=s["scales"], partials=part,
                tickets=tickets, out=out)  # fmt: skip
    cases = [
        (dict(ptab=ptab.int()), "ptab must be int64"),
        (dict(btab=plan.btab[:, :3].contiguous()), r"btab must have shape \[n >= 1, 4\]"),
        (dict(partials=torch.empty(splits + 1, 5, device="cuda")), "partials must be a contiguous float32"),
        (dict(tickets=tickets.float()), "tickets must be Int"),
        (dict(out=torch.empty(4, device="cuda")), r"out must have shape \[5\]"),
        (dict(ptab=ptab.cpu()), "ptab is on cpu"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            cuda_ops.step_project_(**{**base, **change})
    with pytest.raises(RuntimeError, match="twa_cuda::step_project_ runs on CUDA tensors only"):
        cuda_ops.step_project_(**{k: v.cpu() for k, v in base.items()})


# ---- an int8 basis (step_project_int8_kernel, step_write_int8_kernel), called through _cuda ----


def make_int8(shapes, param_dtypes, grad_dtypes, K, layout="aligned", seed=0):
    """Parameters (each of its dtype) with grads (None where grad_dtypes says None), an int8
    basis and block scales fp32 [K, ceil(D / 64)] taken as a column slice of a wider tensor (a
    row stride past the blocks). ``layout``: "aligned" rows from ``empty_basis`` (16-byte loads
    of whole aligned blocks); "offset" rows one byte past a 16-byte boundary (every block takes
    the masked byte loads)."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(seed)
    params = [
        torch.randn(s, generator=g, device=device).to(d) for s, d in zip(shapes, param_dtypes, strict=True)
    ]
    grads = [
        None if d is None else torch.randn(p.shape, generator=g, device=device).to(d)
        for p, d in zip(params, grad_dtypes, strict=True)
    ]
    D = sum(p.numel() for p in params)
    q = torch.randint(-127, 128, (K, D), generator=g, device=device, dtype=torch.int8)
    if layout == "aligned":
        basis = ops.empty_basis(K, D, torch.int8, device)
    else:
        basis = ops.empty_basis(K, D + 1, torch.int8, device)[:, 1:]
    basis.copy_(q)
    blocks = -(-D // 64)
    wide = torch.full((K, blocks + 3), float("nan"), device=device)
    wide[:, :blocks] = torch.rand(K, blocks, generator=g, device=device) / 127 + 1e-5
    scales = wide[:, :blocks]
    state = dict(
        w0=torch.randn(D, generator=g, device=device),
        basis=basis,
        scales=scales,
        alpha=torch.zeros(K, device=device),
        momentum_buffer=torch.zeros(K, device=device),
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        gram=torch.eye(K, device=device),
        pw0=torch.zeros(K, device=device),
    )
    return params, grads, state


def int8_columns(basis, scales):
    D = basis.shape[1]
    return basis.double() * scales.double().repeat_interleave(64, dim=1)[:, :D]


def flat_grads(params, grads):
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for p, g in pairs])


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

INT8_CASES = {
    # D = 1: one lane, one value, one scale block
    "D1-K1": ([(1,)], [F32], [F32], 1),
    # a prime D over many splits, a masked tail block
    "prime-D-K37": ([(1_000_003,)], [F32], [BF16], 37),
    # flat offsets 7, 524, 539, 1563 (not multiples of 16): masked blocks whose lanes straddle
    # scale blocks; a missing grad; mixed param and grad dtypes
    "offsets-K3": (
        [(7,), (517,), (3, 5), (1024,), (1,)],
        [F32, BF16, F16, F32, F32],
        [F32, F32, None, F16, BF16],
        3,
    ),
    # aligned offsets (0, 512, 1536, 2048): whole blocks in 16-byte loads; K tiles 32 + 5
    "aligned-K37": ([(512,), (1024,), (512,), (4099,)], [F32, F16, BF16, F32], [BF16, F16, F32, F32], 37),
    # 10 K tiles, the last of 13 rows; partial blocks of 1-511 values
    "K301": ([(4099,), (33,), (512,), (1,)], [F32, F32, BF16, F16], [F32, F16, None, F16], 301),
}


@pytest.mark.parametrize("layout", ["aligned", "offset"])
@pytest.mark.parametrize("case", list(INT8_CASES), ids=list(INT8_CASES))
def test_int8_step_matches_the_fp64_oracle(cuda_ops, case, layout):
    """The CUDA fused step over an int8 basis, its kernels called directly (``_cuda``): ``P^T g``
    from the grads in place (zero where missing), then ``alpha = -lr P^T g`` and every
    parameter ``w0 + P alpha`` in its dtype, against fp64; ``project_grads`` alone gives the same
    bits as the step's projection and is deterministic."""
    from twa_kernels import _cuda

    shapes, param_dtypes, grad_dtypes, K = INT8_CASES[case]
    params, grads, s = make_int8(shapes, param_dtypes, grad_dtypes, K, layout)
    P = int8_columns(s["basis"], s["scales"])
    g = flat_grads(params, grads)
    bound = P.abs() @ g.abs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offset rows' narrow-load warning
        coord = _cuda.project_grads(params, grads, None, s["basis"], s["scales"])
        assert torch.equal(coord, _cuda.project_grads(params, grads, None, s["basis"], s["scales"]))
        assert_within(coord, P @ g, bound, TOL[torch.int8], "P^T g")
        lr = 0.5
        _cuda.step_(params, grads, None, *s.values(), torch.tensor(lr, device="cuda"), 0.0, 0.0, 0.0, False)
    assert s["counters"].tolist() == [1, 0]
    a = s["alpha"].double()
    assert torch.equal(s["alpha"], -lr * coord), "the step's projection differs from project_grads"
    w, wb = s["w0"].double() + a @ P, s["w0"].double().abs() + a.abs() @ P.abs()
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        tol = TOL[p.dtype] if p.dtype != torch.float32 else TOL[torch.int8]
        got = p.double().flatten()
        assert_within(got, w[offset : offset + n], wb[offset : offset + n], tol, f"params[{i}]")
        offset += n


def test_int8_workspaces_and_messages(cuda_ops):
    """An int8 basis: step_sizes sizes its projection (the int8 kernel's occupancy), the tickets
    come back zero, and the extension names bad block scales."""
    from twa_kernels import _cuda

    params, grads, s = make_int8([(3000,), (17,)], [F32, F16], [F32, F16], 33)
    plan = plan_for(params, s["basis"].device)
    splits, tiles, block = cuda_ops.step_sizes(s["basis"], plan.nblk)
    assert block == BLOCK and tiles == 2 and splits >= 1
    _cuda.step_(params, grads, None, *s.values(), torch.tensor(0.1, device="cuda"), 0.9, 0.0, 1e-3, True)
    tickets = plan.workspace("cuda_step_tickets", (tiles,)).view(torch.int32)
    assert tickets.tolist() == [0] * tiles
    for bad, match in [
        (s["scales"][:, :-1], r"twa_cuda::step_project_: scales must have shape \[33, 48\] for an int8"),
        (s["scales"][:, 0], r"scales must have shape \[33, 48\]"),
        (s["scales"].double(), "scales must be Float"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            _cuda.project_grads(params, grads, None, s["basis"], bad)
    with pytest.raises(RuntimeError, match=r"twa_cuda::fused_step_: scales must have shape \[33, 48\]"):
        _cuda.step_(params, grads, None, *{**s, "scales": s["scales"][:1]}.values(),
                    torch.tensor(0.1, device="cuda"), 0.0, 0.0, 0.0, False)  # fmt: skip
