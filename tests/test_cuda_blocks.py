"""Per-block coordinates on the CUDA backend (csrc/step.cu), through ``twa_kernels._cuda``: the
write pass with a coefficient row per parameter (``write_params_``), the projection per row
(``project_grads`` with segments), the coordinate step of every block (``block_step_``) and the
three fused (``step_blocks_``), against fp64 oracles written from the math at awkward sizes:
fp32, bf16, fp16 and int8 bases, parameters and grads of mixed dtypes (and missing grads),
rows of no parameter, many splits and K tiles, non-finite gradients. Needs a CUDA device (the
extension is built on first use)."""

import pytest
import torch
from conftest import TOL
from oracle import assert_within

from twa_kernels import ops, reference
from twa_kernels._param_table import plan_for

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a CUDA device"),
    # the "offset" layouts' rows are read with narrow loads on purpose
    pytest.mark.filterwarnings("ignore:twa_kernels. backend='cuda' reads this basis with narrow loads"),
]

F32, BF16, F16, I8 = torch.float32, torch.bfloat16, torch.float16, torch.int8


@pytest.fixture(scope="module")
def cuda():
    from twa_kernels import _cuda

    _cuda.load()  # a build failure is an error, not a skip
    return _cuda


def make(shapes, param_dtypes, grad_dtypes, K, dtype, layout="aligned", seed=0):
    """Parameters (each of its dtype) with grads (None where grad_dtypes says None), a basis of
    ``dtype`` with its scales (int8: block scales fp32 [K, ceil(D / 64)], a column slice of a
    wider tensor), w0, and P fp64 [K, D] of the stored values. ``layout``: "aligned" rows from
    ``empty_basis``; "offset" rows one element past a 16-byte boundary (masked loads)."""
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
    if layout == "aligned":
        basis = ops.empty_basis(K, D, dtype, device)
    else:
        basis = ops.empty_basis(K, D + 1, dtype, device)[:, 1:]
    if dtype == I8:
        basis.copy_(torch.randint(-127, 128, (K, D), generator=g, device=device, dtype=I8))
        blocks = -(-D // 64)
        wide = torch.full((K, blocks + 3), float("nan"), device=device)
        wide[:, :blocks] = torch.rand(K, blocks, generator=g, device=device) / 127 + 1e-5
        scales = wide[:, :blocks]
        P = basis.double() * scales.double().repeat_interleave(64, dim=1)[:, :D]
    else:
        basis.copy_(torch.randn(K, D, generator=g, device=device).to(dtype))
        scales = torch.rand(K, generator=g, device=device) / D**0.5 + 1e-3
        P = basis.double() * scales.double()[:, None]
    w0 = torch.randn(D, generator=g, device=device)
    return params, grads, basis, scales, w0, P


def pieces(params):
    """Each parameter's column range of the flat vector."""
    out, at = [], 0
    for p in params:
        out.append((at, at + p.numel()))
        at += p.numel()
    return out


def flat_grads(params, grads):
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for p, g in pairs])


def tol_for(dtype):
    return TOL[I8] if dtype == I8 else TOL[F32]


# Parameter lists at awkward sizes: (shapes, param dtypes, grad dtypes, segments, rows of coef).
CASES = {
    # one value, one row
    "D1": ([(1,)], [F32], [F32], [0], 1),
    # flat offsets not multiples of 16, mixed dtypes, a missing grad; rows 1 and 3 have no
    # parameter, row 0 none either (segments start at 1); a row past the last segment
    "offsets-empty-rows": (
        [(7,), (517,), (3, 5), (1024,), (1,), (33,)],
        [F32, BF16, F16, F32, F32, F16],
        [F32, F32, None, F16, BF16, F32],
        [1, 2, 2, 4, 4, 4],
        6,
    ),
    # aligned offsets: whole blocks in 16-byte loads; a zero-size parameter
    "aligned": (
        [(512,), (1024,), (0,), (512,), (4099,)],
        [F32, F16, F32, BF16, F32],
        [BF16, F16, F32, F32, F32],
        [0, 1, 1, 1, 2],
        3,
    ),
    # 2^20 + 517 values over many splits: rows of runs that start and end inside warps' ranges
    "many-splits": (
        [(300_001,), (1,), (200_000,), (517,), (400_000,), (148_059,)],
        [F32, F16, BF16, F32, F16, F32],
        [BF16, F32, F16, F32, None, F32],
        [0, 0, 1, 2, 2, 3],
        4,
    ),
    # one row per parameter, every parameter its own run
    "per-tensor": (
        [(64,), (64,), (3, 3, 3, 3), (2048,), (10,), (512,), (700,)],
        [F32, F32, F16, BF16, F32, F32, F16],
        [F32, F32, F16, BF16, F32, F32, F16],
        [0, 1, 2, 3, 4, 5, 6],
        7,
    ),
}
DTYPES = [F32, BF16, F16, I8]
KS = {"D1": [1], "offsets-empty-rows": [3, 37], "aligned": [37], "many-splits": [40], "per-tensor": [5, 301]}
PARAMS = [(c, K) for c in CASES for K in KS[c]]
# Every basis dtype with rows from empty_basis; fp16 and int8 also with rows off 16 bytes.
LAYOUTS = [
    (F32, "aligned"),
    (BF16, "aligned"),
    (F16, "aligned"),
    (I8, "aligned"),
    (F16, "offset"),
    (I8, "offset"),
]


def rows_oracle(params, P, vectors, segments, rows):
    """Row l: sum over the parameters i of row l of P_i^T v_i, and its bound sum |P_i|^T |v_i|."""
    K = P.shape[0]
    out = torch.zeros(rows, K, dtype=torch.float64, device=P.device)
    scale = torch.zeros_like(out)
    for (a, b), seg in zip(pieces(params), segments, strict=True):
        out[seg] += P[:, a:b] @ vectors[a:b]
        scale[seg] += P[:, a:b].abs() @ vectors[a:b].abs()
    return out, scale


def check_params(params, w0, P, coef, segments, what, basis_dtype):
    """Each parameter against w0_i + P_i coef[row of i] in fp64, within its dtype's rounding."""
    coef = coef.double()
    for i, ((a, b), p) in enumerate(zip(pieces(params), params, strict=True)):
        row = coef[0 if segments is None else segments[i]] if coef.dim() == 2 else coef
        expected = w0[a:b].double() + row @ P[:, a:b]
        bound = w0[a:b].double().abs() + row.abs() @ P[:, a:b].abs()
        tol = TOL[p.dtype] if p.dtype != F32 else tol_for(basis_dtype)
        assert_within(p.double().flatten(), expected, bound, tol, f"{what}: params[{i}]")


# ---- write_params_ -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, layout", LAYOUTS, ids=[f"{d}-{lay}".replace("torch.", "") for d, lay in LAYOUTS]
)
@pytest.mark.parametrize("case, K", PARAMS, ids=[f"{c}-K{K}" for c, K in PARAMS])
def test_write_params_matches_the_fp64_oracle(cuda, case, K, dtype, layout):
    """Parameter i <- w0_i + P_i coef[segments[i]] in its dtype; the rows of no parameter leak
    nowhere (they hold huge values); without segments, one coefficient vector for all."""
    shapes, param_dtypes, grad_dtypes, segments, rows = CASES[case]
    params, _, basis, scales, w0, P = make(shapes, param_dtypes, grad_dtypes, K, dtype, layout)
    coef = torch.randn(rows, K, device="cuda")
    for r in range(rows):
        if r not in segments:
            coef[r] = 1e30
    cuda.write_params_(params, None, w0, basis, scales, coef, segments)
    check_params(params, w0, P, coef, segments, "segments", dtype)
    cuda.write_params_(params, None, w0, basis, scales, coef[segments[0]].contiguous(), None)
    check_params(params, w0, P, coef[segments[0]], None, "one vector", dtype)


def test_write_params_agrees_with_the_reference(cuda):
    shapes, param_dtypes, grad_dtypes, segments, rows = CASES["offsets-empty-rows"]
    params, _, basis, scales, w0, _ = make(shapes, param_dtypes, grad_dtypes, 37, F16)
    expected = [p.clone() for p in params]
    coef = torch.randn(rows, 37, device="cuda")
    workspace = torch.empty(w0.numel(), device="cuda")
    reference.write_params_(expected, workspace, w0, basis, scales, coef, segments)
    cuda.write_params_(params, None, w0, basis, scales, coef, segments)
    for i, (p, e) in enumerate(zip(params, expected, strict=True)):
        atol, rtol = TOL[p.dtype]
        torch.testing.assert_close(p.float(), e.float(), atol=atol * 10, rtol=rtol, msg=f"params[{i}]")


# ---- project_grads with segments --------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, layout", LAYOUTS, ids=[f"{d}-{lay}".replace("torch.", "") for d, lay in LAYOUTS]
)
@pytest.mark.parametrize("case, K", PARAMS, ids=[f"{c}-K{K}" for c, K in PARAMS])
def test_project_grads_per_row_matches_the_fp64_oracle(cuda, case, K, dtype, layout):
    """Row l = sum of P_i^T g_i over the parameters of row l (0 for a row of none, missing grads
    count as zeros); deterministic; rows [segments[-1] + 1, K]."""
    shapes, param_dtypes, grad_dtypes, segments, _ = CASES[case]
    params, grads, basis, scales, _, P = make(shapes, param_dtypes, grad_dtypes, K, dtype, layout)
    out = cuda.project_grads(params, grads, None, basis, scales, segments)
    again = cuda.project_grads(params, grads, None, basis, scales, segments)
    rows = segments[-1] + 1
    assert out.shape == (rows, K) and out.dtype == F32
    assert torch.equal(out, again), "the per-row projection is not deterministic"
    expected, scale = rows_oracle(params, P, flat_grads(params, grads), segments, rows)
    assert_within(out, expected, scale, tol_for(dtype), "P_l^T g_l")
    for r in range(rows):
        if r not in segments:
            assert torch.equal(out[r], torch.zeros_like(out[r])), f"row {r} has no parameter"


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_grads_one_row_agrees_with_the_plain_projection(cuda, dtype):
    shapes, param_dtypes, grad_dtypes, _, _ = CASES["many-splits"]
    params, grads, basis, scales, _, P = make(shapes, param_dtypes, grad_dtypes, 40, dtype)
    one = cuda.project_grads(params, grads, None, basis, scales, [0] * len(params))
    plain = cuda.project_grads(params, grads, None, basis, scales)
    g = flat_grads(params, grads)
    assert one.shape == (1, 40)
    assert_within(one[0], plain.double(), P.abs() @ g.abs(), tol_for(dtype), "one row vs plain")


def test_project_grads_agrees_with_the_reference(cuda):
    shapes, param_dtypes, grad_dtypes, segments, _ = CASES["offsets-empty-rows"]
    params, grads, basis, scales, _, P = make(shapes, param_dtypes, grad_dtypes, 37, BF16)
    out = cuda.project_grads(params, grads, None, basis, scales, segments)
    flat = flat_grads(params, grads).float()
    ranges = reference.segment_ranges([p.numel() for p in params], segments, segments[-1] + 1)
    expected = reference.project_blocks(basis, scales, flat, ranges)
    _, scale = rows_oracle(params, P, flat.double(), segments, segments[-1] + 1)
    assert_within(out, expected.double(), scale, (1e-5, 1e-4), "vs reference.project_blocks")


# ---- block_step_ -----------------------------------------------------------------------------------


def block_state(L, K, seed=0, scale=1.0):
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(seed)
    A = torch.randn(L, K, K, generator=g, device=device) / K**0.5
    return dict(
        alpha=torch.randn(L, K, generator=g, device=device),
        buf1=torch.randn(L, K, generator=g, device=device) * 0.1,
        buf2=torch.rand(L, K, generator=g, device=device) * 0.01,
        counters=torch.zeros(2, dtype=torch.int64, device=device),
        coord_grad=torch.randn(L, K, generator=g, device=device) * scale,
        gram=A @ A.transpose(1, 2),
        pw0=torch.randn(L, K, generator=g, device=device),
        inv_norms=torch.rand(L, K, generator=g, device=device) + 0.5,
        coef=torch.full((L, K), float("nan"), device=device),
    )


def block_step_oracle(s, lr, rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps):
    """The per-block step in fp64 from the math (the state dict updated in place)."""
    c = s["coord_grad"].double() * s["inv_norms"].double()
    a = s["alpha"].double()
    r = s["pw0"].double() + (s["gram"].double() @ a[..., None])[..., 0]
    finite = bool(torch.isfinite(c.float()).all())
    if finite:
        if rule == "sgd":
            d = c + weight_decay * r
            update = d
            if momentum != 0:
                buf1 = s["buf1"].double()
                buf = d if s["counters"][0] == 0 else momentum * buf1 + (1 - dampening) * d
                s["buf1"] = buf.float()
                update = d + momentum * buf if nesterov else buf
            a = a - lr * update
        else:
            t = int(s["counters"][0]) + 1
            decayed = a - lr * weight_decay * r
            m = s["buf1"].double() + (1 - beta1) * (c - s["buf1"].double())
            v = beta2 * s["buf2"].double() + (1 - beta2) * c * c
            a = decayed - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            s["buf1"], s["buf2"] = m.float(), v.float()
        s["alpha"] = a.float()
        s["counters"] = s["counters"] + torch.tensor([1, 0], device=a.device)
    else:
        s["counters"] = s["counters"] + torch.tensor([0, 1], device=a.device)
    s["coef"] = (s["alpha"].double() * s["inv_norms"].double()).float()
    return finite


HYPER = {
    "sgd-plain": ("sgd", 0.0, 0.0, 0.0, False),
    "sgd-momentum-wd": ("sgd", 0.9, 0.1, 1e-2, False),
    "sgd-nesterov": ("sgd", 0.9, 0.0, 5e-3, True),
    "adamw": ("adamw", 0.0, 0.0, 1e-2, False),
    "adamw-no-decay": ("adamw", 0.0, 0.0, 0.0, False),
}


@pytest.mark.parametrize("L, K", [(1, 1), (7, 33), (300, 100), (2, 301)])
@pytest.mark.parametrize("hyper", HYPER, ids=list(HYPER))
def test_block_step_matches_the_fp64_oracle(cuda, hyper, L, K):
    """Three steps (the first of SGD's momentum and AdamW's bias corrections included), each
    against fp64 from the math; coef = alpha * inv_norms after each."""
    rule, momentum, dampening, wd, nesterov = HYPER[hyper]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    s = block_state(L, K)
    o = {k: v.clone() for k, v in s.items()}
    lr = torch.tensor(0.05, device="cuda")
    for step in range(3):
        cuda.block_step_(*s.values(), lr, rule, momentum, dampening, wd, nesterov, beta1, beta2, eps)
        block_step_oracle(o, 0.05, rule, momentum, dampening, wd, nesterov, beta1, beta2, eps)
        assert s["counters"].tolist() == [step + 1, 0]
        for key in ("alpha", "buf1", "buf2", "coef"):
            torch.testing.assert_close(s[key], o[key], atol=2e-5, rtol=2e-5, msg=f"{key} after step {step}")
        # the next step's gradient
        s["coord_grad"].copy_(torch.randn_like(s["coord_grad"]))
        o["coord_grad"] = s["coord_grad"].clone()


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("bad", ["inf-grad", "nan-grad", "overflow"])
def test_block_step_skips_when_any_coordinate_is_not_finite(cuda, rule, bad):
    """One non-finite c anywhere (in the last block: every block of threads must see it) leaves
    alpha and the buffers as they were and counts a skipped step; coef is still alpha * inv_norms."""
    L, K = 200, 17
    s = block_state(L, K)
    if bad == "inf-grad":
        s["coord_grad"][-1, 3] = float("inf")
    elif bad == "nan-grad":
        s["coord_grad"][L // 2, 0] = float("nan")
    else:  # finite operands whose product overflows
        s["coord_grad"][-1, -1] = 3e38
        s["inv_norms"][-1, -1] = 10.0
    s["counters"][0] = 4
    before = {k: v.clone() for k, v in s.items()}
    cuda.block_step_(
        *s.values(), torch.tensor(0.1, device="cuda"), rule, 0.9, 0.0, 1e-2, False, 0.9, 0.999, 1e-8
    )
    assert s["counters"].tolist() == [4, 1]
    for key in ("alpha", "buf1", "buf2"):
        assert torch.equal(s[key], before[key]), key
    torch.testing.assert_close(s["coef"], s["alpha"] * s["inv_norms"], atol=0, rtol=0)


def test_block_step_agrees_with_the_reference(cuda):
    """Where ``reference.block_step_`` exists: the same steps within fp32 rounding."""
    ref = getattr(reference, "block_step_", None)
    if ref is None:
        pytest.skip("reference.block_step_ is not there")
    lr = torch.tensor(0.05, device="cuda")
    for rule, momentum, dampening, wd, nesterov in HYPER.values():
        s = block_state(9, 21, seed=3)
        r = {k: v.clone() for k, v in s.items()}
        for _ in range(2):
            cuda.block_step_(*s.values(), lr, rule, momentum, dampening, wd, nesterov, 0.9, 0.999, 1e-8)
            ref(*r.values(), lr, rule, momentum, dampening, wd, nesterov, 0.9, 0.999, 1e-8)
        assert s["counters"].tolist() == r["counters"].tolist()
        for key in ("alpha", "buf1", "buf2", "coef"):
            torch.testing.assert_close(s[key], r[key], atol=2e-5, rtol=2e-5, msg=f"{rule}: {key}")


# ---- step_blocks_: the three fused -------------------------------------------------------------


def blocks_problem(case, K, dtype, layout="aligned", seed=0):
    shapes, param_dtypes, grad_dtypes, segments, rows = CASES[case]
    params, grads, basis, scales, w0, P = make(shapes, param_dtypes, grad_dtypes, K, dtype, layout, seed)
    s = block_state(rows, K, seed=seed)
    del s["coord_grad"]
    return params, grads, basis, scales, w0, P, segments, s


def hyper_args(rule):
    """rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps."""
    return (rule, 0.9 if rule == "sgd" else 0.0, 0.0, 1e-2, False, 0.9, 0.999, 1e-8)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, K", [("offsets-empty-rows", 37), ("many-splits", 40), ("per-tensor", 301)])
def test_step_blocks_is_the_three_calls(cuda, case, K, dtype, rule):
    """The fused step gives the bits of project_grads (segments), block_step_ and write_params_
    called in turn (the same kernels), and the parameters the fp64 oracle's."""
    params, grads, basis, scales, w0, P, segments, s = blocks_problem(case, K, dtype)
    rows = s["alpha"].shape[0]
    lr = torch.tensor(0.05, device="cuda")
    hyper = hyper_args(rule)
    params_b = [p.clone() for p in params]
    s_b = {k: v.clone() for k, v in s.items()}

    cuda.step_blocks_(params, grads, None, w0, basis, scales, *s.values(), segments, lr, *hyper)

    c = cuda.project_grads(params_b, grads, None, basis, scales, segments)
    coord = torch.zeros(rows, K, device="cuda")
    coord[: c.shape[0]] = c
    st = dict(s_b)
    st["coord_grad"] = coord
    order = ["alpha", "buf1", "buf2", "counters", "coord_grad", "gram", "pw0", "inv_norms", "coef"]
    cuda.block_step_(*(st[k] for k in order), lr, *hyper)
    cuda.write_params_(params_b, None, w0, basis, scales, s_b["coef"], segments)

    assert s["counters"].tolist() == s_b["counters"].tolist() == [1, 0]
    for key in ("alpha", "buf1", "buf2", "coef"):
        assert torch.equal(s[key], s_b[key]), key
    for i, (p, q) in enumerate(zip(params, params_b, strict=True)):
        assert torch.equal(p, q), f"params[{i}]"
    check_params(params, w0, P, s["coef"], segments, "fused", dtype)


def test_step_blocks_skips_nonfinite_gradients(cuda):
    params, grads, basis, scales, w0, P, segments, s = blocks_problem("offsets-empty-rows", 37, F16)
    grads[3][5] = float("inf")
    before = {k: v.clone() for k, v in s.items()}
    lr = torch.tensor(0.05, device="cuda")
    cuda.step_blocks_(params, grads, None, w0, basis, scales, *s.values(), segments, lr, *hyper_args("sgd"))
    assert s["counters"].tolist() == [0, 1]
    for key in ("alpha", "buf1", "buf2"):
        assert torch.equal(s[key], before[key]), key
    torch.testing.assert_close(s["coef"], s["alpha"] * s["inv_norms"], atol=0, rtol=0)
    check_params(params, w0, P, s["coef"], segments, "skipped step", F16)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_step_blocks_cuda_graph_replays_match_eager_steps(cuda, rule):
    """One eager step, then the step captured once and replayed with gradients written in place
    and a new lr in its tensor: the same bits as eager steps."""
    n, K = 4, 37
    hyper = hyper_args(rule)
    new_grads = [blocks_problem("offsets-empty-rows", K, F16, seed=10 + k)[1] for k in range(n)]

    def setup():
        params, grads, basis, scales, w0, _, segments, s = blocks_problem("offsets-empty-rows", K, F16)
        return params, grads, basis, scales, w0, segments, s, torch.tensor(0.1, device="cuda")

    def load(grads, k):
        for g, new in zip(grads, new_grads[k], strict=True):
            if g is not None:
                g.copy_(new)

    params_e, grads_e, basis_e, scales_e, w0_e, segments, s_e, lr_e = setup()
    eager = []
    for k in range(n):
        load(grads_e, k)
        cuda.step_blocks_(
            params_e, grads_e, None, w0_e, basis_e, scales_e, *s_e.values(), segments, lr_e, *hyper
        )
        lr_e.mul_(0.5)
        eager.append(([p.clone() for p in params_e], s_e["alpha"].clone()))

    params, grads, basis, scales, w0, segments, s, lr = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load(grads, 0)
        cuda.step_blocks_(params, grads, None, w0, basis, scales, *s.values(), segments, lr, *hyper)
        lr.mul_(0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.step_blocks_(params, grads, None, w0, basis, scales, *s.values(), segments, lr, *hyper)
    for k in range(1, n):
        load(grads, k)
        graph.replay()
        lr.mul_(0.5)
        weights, alpha = eager[k]
        assert torch.equal(s["alpha"], alpha), f"alpha after step {k}"
        for i, (p, w) in enumerate(zip(params, weights, strict=True)):
            assert torch.equal(p, w), f"params[{i}] after step {k}"
    assert s["counters"].tolist() == s_e["counters"].tolist() == [n, 0]


def test_step_blocks_launches_at_most_4_kernels_without_host_sync(cuda):
    from torch.profiler import ProfilerActivity, profile

    params, grads, basis, scales, w0, _, segments, s = blocks_problem("many-splits", 40, F16)
    args = (params, grads, None, w0, basis, scales, *s.values(), segments, torch.tensor(0.1, device="cuda"),
            *hyper_args("adamw"))  # fmt: skip
    cuda.step_blocks_(*args)  # first call: builds, copies the tables
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            cuda.step_blocks_(*args)
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


# ---- messages ---------------------------------------------------------------------------------------


def test_bad_arguments_are_named(cuda):
    params, grads, basis, scales, w0, _, segments, s = blocks_problem("offsets-empty-rows", 5, F16)
    ops_ = torch.ops.twa_cuda
    plan = plan_for(params, basis.device)
    ptab = plan.param_table(params)
    seg = plan.segment_table(segments)
    coef = s["coef"]
    with pytest.raises(RuntimeError, match=r"twa_cuda::step_write_: with segments, coef must be float32"):
        ops_.step_write_(ptab, plan.btab, w0, basis, scales, coef[0], seg)
    with pytest.raises(RuntimeError, match=r"twa_cuda::step_write_: coef must have shape \[5\]"):
        ops_.step_write_(ptab, plan.btab, w0, basis, scales, coef, None)
    with pytest.raises(RuntimeError, match=r"twa_cuda::step_write_: segments must have shape \[6\]"):
        ops_.step_write_(ptab, plan.btab, w0, basis, scales, coef, seg[:-1])
    with pytest.raises(RuntimeError, match=r"twa_cuda::step_write_: segments must be Long"):
        ops_.step_write_(ptab, plan.btab, w0, basis, scales, coef, seg.int())
    with pytest.raises(RuntimeError, match=r"twa_cuda::step_write_: w0 must have shape"):
        ops_.step_write_(ptab, plan.btab, w0[1:], basis, scales, coef, seg)
    with pytest.raises(RuntimeError, match="twa_cuda::step_write_ runs on CUDA tensors only"):
        ops_.step_write_(ptab.cpu(), plan.btab.cpu(), w0.cpu(), basis.cpu(), scales.cpu(), coef.cpu(), None)

    rows = segments[-1] + 1
    (n,) = ops_.step_blocks_sizes(basis, plan.nblk, rows)
    part = torch.empty(n, 5, device="cuda")
    starts = torch.empty(rows + 1, dtype=torch.int32, device="cuda")
    out = torch.empty(rows, 5, device="cuda")
    ptab_g, _ = plan.table(params, grads)
    base = dict(ptab=ptab_g, btab=plan.btab, basis=basis, scales=scales, segments=seg, partials=part,
                starts=starts, out=out)  # fmt: skip
    for change, match in [
        (dict(partials=torch.empty(n + 1, 5, device="cuda")), "partials must be a contiguous float32"),
        (dict(starts=starts[:-1]), rf"starts must have shape \[{rows + 1}\]"),
        (dict(starts=starts.long()), "starts must be Int"),
        (dict(out=torch.empty(rows, 4, device="cuda")), r"out must be a contiguous float32 \[\d+, 5\]"),
        (dict(segments=seg.cpu()), "segments is on cpu"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops_.step_project_blocks_(**{**base, **change})

    lr = torch.tensor(0.1, device="cuda")
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    coord = torch.zeros_like(s["alpha"])
    good = dict(alpha=s["alpha"], buf1=s["buf1"], buf2=s["buf2"], counters=s["counters"], coord_grad=coord,
                gram=s["gram"], pw0=s["pw0"], inv_norms=s["inv_norms"], coef=coef, lr=lr, ticket=ticket,
                rule="adamw", momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, beta1=0.9,
                beta2=0.999, eps=1e-8)  # fmt: skip
    for change, match in [
        (dict(rule="adam"), 'rule must be "sgd" or "adamw", got "adam"'),
        (dict(buf2=torch.zeros(0, device="cuda")), r"buf2 must be a contiguous float32 \[6, 5\]"),
        (dict(gram=s["gram"][:, :, :4].contiguous()), r"gram must be a contiguous float32 \[6, 5, 5\]"),
        (dict(ticket=ticket.long()), "ticket must be Int"),
        (dict(lr=lr.double()), "lr must be a 0-dim float32"),
        (dict(inv_norms=s["inv_norms"][:, :4]), r"inv_norms must be a contiguous float32 \[6, 5\]"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops_.block_step_(**{**good, **change})
    # SGD without momentum reads neither buffer
    ops_.block_step_(**{**good, "rule": "sgd", "buf1": torch.zeros(0, device="cuda"),
                        "buf2": torch.zeros(0, device="cuda")})  # fmt: skip
    assert ticket.item() == 0 and s["counters"].tolist() == [1, 0]

    for bad, match in [
        ([0, 0, 1], "segments has 3 entries"),
        ([1, 0, 2, 2, 2, 2], "non-decreasing"),
        ([-1, 0, 0, 0, 0, 0], "non-negative"),
    ]:
        with pytest.raises(ValueError, match=match):
            cuda.project_grads(params, grads, None, basis, scales, bad)
    with pytest.raises(RuntimeError, match="segments reach row 9, the coefficients have 6 rows"):
        cuda.write_params_(params, None, w0, basis, scales, coef, [0, 1, 2, 3, 4, 9])
