"""The fused CUDA step (csrc/step.cu) beyond the backend-parametrised tests of
test_fused_step_op.py: many splits and K tiles, the largest rank, its workspaces and the
messages of its ops. Needs a CUDA device (the extension is built on first use)."""

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
    coord = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], "cuda")
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
