"""The ``twa::step_`` op (the whole TWA step over a parameter list) and ``twa::project_grads``
(its gradient projection alone, the sharded step's first half) as ops: the same result on every
backend, their contract (opcheck), torch.compile, and the checks of their arguments."""

import pytest
import torch
from conftest import STORAGE_DTYPES, TOL
from oracle import assert_within

from twa_kernels import _backend, _ops, ops

BACKENDS = ["torch", "triton", "cuda"]
SHAPES = [(7, 3), (1,), (600,), (2, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32]


def runs_here(backend, device):
    try:
        _backend.resolve(backend, device)
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


def problem(device, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(s, generator=g).to(device=device, dtype=d) for s, d in zip(SHAPES, DTYPES, strict=True)
    ]
    grads = [
        torch.randn(s, generator=g).to(device=device, dtype=d) for s, d in zip(SHAPES, DTYPES, strict=True)
    ]
    grads[1] = None  # a parameter without gradient: zero
    D = sum(p.numel() for p in params)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    scales = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    basis = (Q.T / scales[:, None]).to(dtype)
    P = basis.double() * scales[:, None]
    state = dict(
        w0=torch.randn(D, generator=g).to(device),
        basis=basis.to(device),
        scales=scales.float().to(device),
        alpha=torch.zeros(K, device=device),
        momentum_buffer=torch.zeros(K, device=device),
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        gram=(P @ P.T).float().to(device),
        pw0=torch.zeros(K, device=device),
    )
    return params, grads, state, P


def flat_grads(params, grads):
    """The gradients as one fp64 [D] vector on the CPU (zeros where a grad is None)."""
    return torch.cat(
        [
            (torch.zeros(p.shape) if g is None else g.double().cpu()).flatten()
            for p, g in zip(params, grads, strict=True)
        ]
    )


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_matches_the_fp64_oracle(backend, dtype, device):
    """From alpha = 0 without momentum or decay: alpha = -lr P^T g, w = w0 + P alpha."""
    runs_here(backend, device)
    K, lr = 5, 0.25
    params, grads, s, P = problem(device, K, dtype)
    D = P.shape[1]
    workspace = torch.empty(D, device=device)
    ops.step_(params, grads, workspace, s["w0"], s["basis"], s["scales"], s["alpha"], s["momentum_buffer"],
              s["counters"], s["gram"], s["pw0"], lr, backend=backend)  # fmt: skip
    g = flat_grads(params, grads)
    alpha = -lr * (P @ g)
    assert s["counters"].tolist() == [1, 0]
    assert_within(s["alpha"].cpu(), alpha, lr * (P.abs() @ g.abs()), TOL[dtype], "alpha")
    w = s["w0"].double().cpu() + alpha @ P
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        expected = w[offset : offset + n].view(p.shape)
        atol, rtol = TOL[p.dtype] if p.dtype != torch.float32 else TOL[dtype]
        torch.testing.assert_close(p.double().cpu(), expected, atol=atol, rtol=rtol, msg=f"params[{i}]")
        offset += n


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_backend_takes_the_reference_steps(backend, device):
    """Five steps with momentum, decay and a skipped non-finite one, against the reference."""
    runs_here(backend, device)
    results = {}
    for b in ("torch", backend):
        params, grads, s, _ = problem(device, 4, torch.float16, seed=1)
        workspace = torch.empty(s["w0"].numel(), device=device)
        for k in range(5):
            if k == 2:
                grads[0] = grads[0].clone()
                grads[0].view(-1)[0] = float("nan")
            ops.step_(params, grads, workspace, *s.values(), 0.1, 0.9, 0.0, 1e-2, False, backend=b)
            if k == 2:
                grads[0].view(-1)[0] = 0.0
        results[b] = (params, s)
    (p_ref, s_ref), (p, s) = results["torch"], results[backend]
    assert s["counters"].tolist() == s_ref["counters"].tolist() == [4, 1]
    # Same fp32 math summed in another order (blocks of 512 columns vs chunks of the reference).
    torch.testing.assert_close(s["alpha"], s_ref["alpha"], atol=1e-6, rtol=1e-5)
    for x, y in zip(p, p_ref, strict=True):
        torch.testing.assert_close(x, y, atol=TOL[x.dtype][0], rtol=TOL[x.dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    runs_here(backend, device)
    params, grads, s, _ = problem(device, 3, torch.float16)
    workspace = torch.empty(s["w0"].numel(), device=device)
    args = (params, grads, workspace, *s.values(), torch.tensor(0.1, device=device), 0.9, 0.0, 1e-3, False)
    torch.library.opcheck(torch.ops.twa.step_.default, args, {"backend": backend})


def test_compiles_fullgraph():
    params, grads, s, _ = problem(torch.device("cpu"), 3, torch.float16)
    workspace = torch.empty(s["w0"].numel())
    lr = torch.tensor(0.1)

    def step(params, grads, workspace, s, lr):
        torch.ops.twa.step_(params, grads, workspace, *s.values(), lr, 0.9, 0.0, 1e-3, False, "torch")

    expected = [p.clone() for p in params]
    _, _, s_eager, _ = problem(torch.device("cpu"), 3, torch.float16)
    step(expected, grads, workspace.clone(), s_eager, lr)
    torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, workspace, s, lr)
    for a, b in zip(params, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(grads=a["grads"][:-1]), "grads"),
        (lambda a: a.update(workspace=torch.empty(3)), "workspace must have shape"),
        (lambda a: a.update(params=a["params"][:-1], grads=a["grads"][:-1]), "params hold"),
        (lambda a: a["grads"].__setitem__(0, torch.zeros(3)), r"grads\[0\] has shape"),
        (lambda a: a.update(lr=torch.tensor([0.1])), "lr must be a 0-dim"),
    ],
    ids=["grads-count", "workspace", "D", "grad-shape", "lr"],
)
def test_bad_arguments_are_named(change, match):
    params, grads, s, _ = problem(torch.device("cpu"), 3, torch.float16)
    args = dict(
        params=params, grads=list(grads), workspace=torch.empty(s["w0"].numel()), lr=torch.tensor(0.1)
    )
    change(args)
    with pytest.raises(RuntimeError, match=match):
        _ops.step_(args["params"], args["grads"], args["workspace"], *s.values(), args["lr"], 0.9, 0.0, 0.0,
                   False, "torch")  # fmt: skip


# ---- twa::project_grads: the gradient projection of step_, alone (the sharded step's first half)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_project_grads_matches_the_fp64_oracle(backend, dtype, device):
    runs_here(backend, device)
    params, grads, s, P = problem(device, 5, dtype)
    before = [p.clone() for p in params]
    workspace = torch.empty(P.shape[1], device=device)
    out = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend)
    g = flat_grads(params, grads)
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert_within(out.cpu(), P @ g, P.abs() @ g.abs(), TOL[dtype], "P^T g")
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)  # the parameters give the layout and are not written


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_grads_opcheck(backend, device):
    runs_here(backend, device)
    params, grads, s, _ = problem(device, 3, torch.float16)
    workspace = torch.empty(s["w0"].numel(), device=device)
    args = (params, grads, workspace, s["basis"], s["scales"])
    torch.library.opcheck(torch.ops.twa.project_grads.default, args, {"backend": backend})


def test_project_grads_names_bad_arguments():
    params, grads, s, _ = problem(torch.device("cpu"), 3, torch.float16)
    workspace = torch.empty(s["w0"].numel())
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        _ops.project_grads(params, [torch.zeros(3), *grads[1:]], workspace, s["basis"], s["scales"], "torch")
    with pytest.raises(RuntimeError, match="workspace must have shape"):
        _ops.project_grads(params, grads, torch.empty(3), s["basis"], s["scales"], "torch")
    with pytest.raises(RuntimeError, match="params hold"):
        _ops.project_grads(params[:-1], grads[:-1], workspace, s["basis"], s["scales"], "torch")
