"""The ``twa::step_`` op (the whole TWA step over a parameter list) and ``twa::project_grads``
(its gradient projection alone, the sharded step's first half) as ops: the same result on every
backend, their contract (opcheck), torch.compile, and the checks of their arguments."""

import pytest
import torch
from conftest import STORAGE_DTYPES, TOL
from oracle import QMAX, assert_within, columns, quantise_row

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
    basis, scales = stored(Q.T, dtype, g)
    P = columns(basis, scales)
    state = dict(
        w0=torch.randn(D, generator=g).to(device),
        basis=basis.to(device),
        scales=scales.to(device),
        alpha=torch.zeros(K, device=device),
        momentum_buffer=torch.zeros(K, device=device),
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        gram=(P @ P.T).float().to(device),
        pw0=torch.zeros(K, device=device),
    )
    return params, grads, state, P


def stored(rows, dtype, g):
    """fp64 ``rows`` [K, D] as a stored basis and its fp32 scales: float rows divided by random
    row scales in [0.5, 1.5); int8 rows quantised per block of 64 values (as orthogonalize_
    stores them)."""
    if dtype == torch.int8:
        blocks = [quantise_row(r) for r in rows]
        return torch.stack([q for q, _ in blocks]), torch.stack([a / QMAX for _, a in blocks]).float()
    scales = torch.rand(rows.shape[0], generator=g, dtype=torch.float64) + 0.5
    return (rows / scales[:, None]).to(dtype), scales.float()


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_backend_takes_the_reference_steps(backend, dtype, device):
    """Five steps with momentum, decay and a skipped non-finite one, against the reference."""
    runs_here(backend, device)
    results = {}
    for b in ("torch", backend):
        params, grads, s, _ = problem(device, 4, dtype, seed=1)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, dtype, device):
    runs_here(backend, device)
    params, grads, s, _ = problem(device, 3, dtype)
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
    out = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend=backend)
    g = flat_grads(params, grads)
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert_within(out.cpu(), P @ g, P.abs() @ g.abs(), TOL[dtype], "P^T g")
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)  # the parameters give the layout and are not written


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_project_grads_opcheck(backend, dtype, device):
    runs_here(backend, device)
    params, grads, s, _ = problem(device, 3, dtype)
    workspace = torch.empty(s["w0"].numel(), device=device)
    args = (params, grads, workspace, s["basis"], s["scales"])
    torch.library.opcheck(torch.ops.twa.project_grads.default, args, {"backend": backend})


def test_project_grads_names_bad_arguments():
    params, grads, s, _ = problem(torch.device("cpu"), 3, torch.float16)
    workspace = torch.empty(s["w0"].numel())
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        _ops.project_grads(
            params, [torch.zeros(3), *grads[1:]], workspace, s["basis"], s["scales"], backend="torch"
        )
    with pytest.raises(RuntimeError, match="workspace must have shape"):
        _ops.project_grads(params, grads, torch.empty(3), s["basis"], s["scales"], backend="torch")
    with pytest.raises(RuntimeError, match="params hold"):
        _ops.project_grads(params[:-1], grads[:-1], workspace, s["basis"], s["scales"], backend="torch")


# ---- the fused steps (Triton, CUDA): awkward sizes, determinism, CUDA graphs, launches, syncs

FUSED = ["triton", "cuda"]
# (shape, dtype, grad, storage offset in values). Flat offsets 0, 1024, 2048, 2055, 3095, 3104,
# 5204: whole 16-byte aligned blocks (0, 1024), a parameter without grad, a parameter at an
# address 4 bytes past a 16-byte boundary, a strided grad (copied to be contiguous), flat
# offsets that are not multiples of 16 (masked scalar path), partial last blocks.
AWKWARD = [
    ((1024,), torch.float32, "grad", 0),
    ((16, 64), torch.bfloat16, "grad", 0),
    ((7,), torch.float16, None, 0),
    ((1040,), torch.float32, "grad", 1),
    ((9,), torch.bfloat16, "strided", 0),
    ((3, 700), torch.float16, "grad", 0),
    ((513,), torch.float32, "grad", 0),
]
# Basis layouts (oracle.basis_in_layout): rows 128-byte aligned (16-byte loads), and rows that
# do not share an alignment phase (scalar loads only).
BASIS_LAYOUTS = ["padded", "odd-slice"]


def awkward_problem(device, K, dtype, layout="padded", seed=0):
    """``(params, grads, state, P)`` over AWKWARD; P the fp64 columns of the stored basis."""
    from oracle import basis_in_layout

    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape, pdtype, grad, offset in AWKWARD:
        n = torch.Size(shape).numel()
        p = torch.empty(n + offset, dtype=pdtype, device=device)[offset:].view(shape)
        p.copy_(torch.randn(shape, generator=g))
        params.append(p)
        if grad is None:
            grads.append(None)
        elif grad == "strided":
            grads.append(torch.randn(*shape, 2, generator=g).to(device=device, dtype=pdtype)[..., 0])
        else:
            grads.append(torch.randn(shape, generator=g).to(device=device, dtype=pdtype))
    D = sum(p.numel() for p in params)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    rows, scales = stored(Q.T, dtype, g)
    basis, _ = basis_in_layout(K, D, dtype, device, layout)
    basis.copy_(rows)
    P = columns(rows, scales)
    state = dict(
        w0=torch.randn(D, generator=g).to(device),
        basis=basis,
        scales=scales.to(device),
        alpha=torch.zeros(K, device=device),
        momentum_buffer=torch.zeros(K, device=device),
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        gram=(P @ P.T).float().to(device),
    )
    state["pw0"] = (P @ state["w0"].double().cpu()).float().to(device)
    return params, grads, state, P


def fused_here(backend, device, K):
    """Skip what cannot run here; under Triton's interpreter only the small ranks run."""
    runs_here(backend, device)
    if device.type == "cpu" and K > 8:
        pytest.skip("K > 8 at these sizes: CUDA tensors only (minutes under Triton's interpreter)")


def run_steps(backend, device, K, dtype, layout, n, hyper, seed=0):
    """n steps (the second one skipped for a NaN gradient); ``(params, state)`` after them."""
    params, grads, s, _ = awkward_problem(device, K, dtype, layout, seed)
    workspace = torch.empty(s["w0"].numel(), device=device)
    for k in range(n):
        gk = list(grads)
        if k == 1:
            gk[0] = grads[0].clone()
            gk[0].view(-1)[5] = float("nan")
        ops.step_(params, gk, workspace, *s.values(), *hyper, backend=backend)
    return params, s


@pytest.mark.parametrize("layout", BASIS_LAYOUTS)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("K", [1, 8, 301])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_at_awkward_sizes_matches_the_fp64_oracle(backend, K, dtype, layout, device):
    """One step from alpha = 0 (no momentum, no decay): alpha = -lr P^T g, w = w0 + P alpha, in
    every parameter dtype, with aligned and masked blocks, a missing and a strided grad."""
    fused_here(backend, device, K)
    params, grads, s, P = awkward_problem(device, K, dtype, layout)
    lr = 0.25
    workspace = torch.empty(P.shape[1], device=device)
    coord = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend=backend)
    ops.step_(params, grads, workspace, *s.values(), lr, backend=backend)
    g = flat_grads(params, grads)
    c = P @ g
    assert_within(coord.cpu(), c, P.abs() @ g.abs(), TOL[dtype], "project_grads")
    alpha = -lr * c
    assert s["counters"].tolist() == [1, 0]
    assert_within(s["alpha"].cpu(), alpha, lr * (P.abs() @ g.abs()), TOL[dtype], "alpha")
    # w from the alpha the step took (its own rounding is checked above).
    a = s["alpha"].double().cpu()
    w = s["w0"].double().cpu() + a @ P
    bound = s["w0"].double().cpu().abs() + a.abs() @ P.abs()
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        tol = TOL[p.dtype] if p.dtype != torch.float32 else TOL[dtype]
        assert_within(p.double().cpu().flatten(), w[offset : offset + n], bound[offset : offset + n], tol,
                      f"params[{i}]")  # fmt: skip
        offset += n


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("K", [1, 8, 301])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_at_awkward_sizes_takes_the_reference_steps(backend, K, dtype, device):
    """Four steps with momentum, decay and nesterov (one skipped: a NaN gradient) against the
    torch backend, in every parameter dtype."""
    fused_here(backend, device, K)
    hyper = (0.1, 0.9, 0.0, 1e-2, True)
    p_ref, s_ref = run_steps("torch", device, K, dtype, "padded", 4, hyper)
    p, s = run_steps(backend, device, K, dtype, "padded", 4, hyper)
    assert s["counters"].tolist() == s_ref["counters"].tolist() == [3, 1]
    torch.testing.assert_close(s["alpha"], s_ref["alpha"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s["momentum_buffer"], s_ref["momentum_buffer"], atol=1e-6, rtol=1e-5)
    for i, (x, y) in enumerate(zip(p, p_ref, strict=True)):
        torch.testing.assert_close(x, y, atol=TOL[x.dtype][0], rtol=TOL[x.dtype][1], msg=f"params[{i}]")


@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_is_deterministic(backend, device):
    """The same inputs give the same bits: no floating-point atomics, a fixed summation order."""
    K = 37 if device.type == "cuda" else 5
    fused_here(backend, device, K)
    hyper = (0.1, 0.9, 0.0, 1e-2, False)
    runs = [run_steps(backend, device, K, torch.float16, "padded", 3, hyper) for _ in range(2)]
    (p1, s1), (p2, s2) = runs
    assert torch.equal(s1["alpha"], s2["alpha"]) and torch.equal(s1["momentum_buffer"], s2["momentum_buffer"])
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    params, grads, s, P = awkward_problem(device, K, torch.float16)
    workspace = torch.empty(P.shape[1], device=device)
    c1 = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend=backend)
    c2 = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], backend=backend)
    assert torch.equal(c1, c2)


def cuda_only(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    runs_here(backend, torch.device("cuda"))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_cuda_graph_replays_match_eager_steps(backend):
    """One eager step, then the step captured once and replayed with gradients written in place
    (and a new lr written into its tensor): the same bits as eager steps."""
    cuda_only(backend)
    device, K, n = torch.device("cuda"), 37, 4
    hyper = (0.9, 0.0, 1e-2, False)
    new_grads = [awkward_problem(device, K, torch.float16, seed=10 + k)[1] for k in range(n)]

    def setup():
        params, grads, s, _ = awkward_problem(device, K, torch.float16)
        grads = [None if g is None else g.contiguous() for g in grads]  # static grads
        return params, grads, s, torch.empty(s["w0"].numel(), device=device), torch.tensor(0.1, device=device)

    def load(grads, k):
        for g, new in zip(grads, new_grads[k], strict=True):
            if g is not None:
                g.copy_(new)

    params_e, grads_e, s_e, ws_e, lr_e = setup()
    eager = []
    for k in range(n):
        load(grads_e, k)
        ops.step_(params_e, grads_e, ws_e, *s_e.values(), lr_e, *hyper, backend=backend)
        lr_e.mul_(0.5)
        eager.append(([p.clone() for p in params_e], s_e["alpha"].clone()))

    params, grads, s, ws, lr = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load(grads, 0)
        ops.step_(params, grads, ws, *s.values(), lr, *hyper, backend=backend)
        lr.mul_(0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.step_(params, grads, ws, *s.values(), lr, *hyper, backend=backend)
    for k in range(1, n):
        load(grads, k)
        graph.replay()
        lr.mul_(0.5)
        weights, alpha = eager[k]
        assert torch.equal(s["alpha"], alpha), f"alpha after step {k}"
        for i, (p, w) in enumerate(zip(params, weights, strict=True)):
            assert torch.equal(p, w), f"params[{i}] after step {k}"
    assert s["counters"].tolist() == s_e["counters"].tolist() == [n, 0]


@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_launches_at_most_4_kernels_without_host_sync(backend):
    cuda_only(backend)
    from torch.profiler import ProfilerActivity, profile

    device, K = torch.device("cuda"), 37
    params, grads, s, _ = awkward_problem(device, K, torch.float16)
    grads = [None if g is None else g.contiguous() for g in grads]  # the parameter table is reused
    args = (params, grads, torch.empty(s["w0"].numel(), device=device), *s.values(),
            torch.tensor(0.1, device=device), 0.9, 0.0, 1e-2, False)  # fmt: skip
    ops.step_(*args, backend=backend)  # first call: builds, autotunes, copies the table
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            ops.step_(*args, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    kernels = [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    assert 1 <= len(kernels) <= 4, kernels
    assert s["counters"].tolist() == [2, 0]


# ---- write_params_: the step's last pass alone, one coefficient vector or one per row --------

SEGMENTS = {"one": None, "per-block": [0, 0, 1, 2], "empty-row": [0, 2, 2, 2]}


@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_params_matches_the_fp64_oracle(backend, dtype, segments, device):
    """Each parameter ``w0_i + P_i coef[row of i]``, rounded to its dtype (row 1 of "empty-row"
    belongs to no parameter: its values must not leak anywhere)."""
    runs_here(backend, device)
    K = 5
    params, _, s, P = problem(device, K, dtype)
    coef = torch.randn(3, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    given = coef[0] if segments is None else coef
    workspace = torch.empty(s["w0"].numel(), device=device)
    ops.write_params_(params, workspace, s["w0"], s["basis"], s["scales"], given.float().to(device), segments,
                      backend=backend)  # fmt: skip
    w0, offset = s["w0"].double().cpu(), 0
    for i, p in enumerate(params):
        n = p.numel()
        row = coef[0 if segments is None else segments[i]]
        expected = (w0[offset : offset + n] + row @ P[:, offset : offset + n]).view(p.shape)
        atol, rtol = TOL[p.dtype] if p.dtype != torch.float32 else TOL[dtype]
        torch.testing.assert_close(p.double().cpu(), expected, atol=atol, rtol=rtol, msg=f"params[{i}]")
        offset += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_params_opcheck(backend, device):
    runs_here(backend, device)
    params, _, s, _ = problem(device, 3, torch.float16)
    workspace = torch.empty(s["w0"].numel(), device=device)
    coef = torch.randn(2, 3, device=device)
    args = (params, workspace, s["w0"], s["basis"], s["scales"], coef, [0, 1, 1, 1])
    torch.library.opcheck(torch.ops.twa.write_params_.default, args, {"backend": backend})


@pytest.mark.parametrize(
    ("coef_shape", "segments", "message"),
    [
        ((2, 3), [0, 1, 0, 1], "segments\\[2\\] = 0: segments must be non-decreasing"),
        ((2, 3), [0, 1, 2, 2], "segments\\[2\\] = 2"),
        ((2, 3), [0, 1], "segments has 2 entries, params 4"),
        ((2, 4), [0, 0, 1, 1], "coef must be a contiguous fp32 \\[rows, K=3\\]"),
        ((2, 3), None, "coef"),
    ],
)
def test_write_params_refuses_bad_segments(coef_shape, segments, message):
    params, _, s, _ = problem(torch.device("cpu"), 3, torch.float16)
    workspace = torch.empty(s["w0"].numel())
    with pytest.raises((ValueError, RuntimeError), match=message):
        ops.write_params_(params, workspace, s["w0"], s["basis"], s["scales"], torch.zeros(coef_shape),
                          segments)  # fmt: skip
