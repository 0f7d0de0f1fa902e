"""The per-block ops of the fused step (``granularity`` other than "model", ``TWAAdamW``):
``twa::project_grads`` with segments, ``twa::block_step_`` and ``twa::step_blocks_`` on every
backend against fp64 oracles and the reference, their launch count, and their contract."""

import pytest
import torch
from conftest import STORAGE_DTYPES, TOL
from oracle import assert_within
from test_fused_step_op import BACKENDS, flat_grads, problem, runs_here
from test_triton_step import launches_of_a_second_call

from twa_kernels import _ops

# problem()'s parameters hold 21, 1, 600 and 30 values: table blocks 1, 1, 2 and 1, so the
# interpreter's 4 splits of 2 blocks start a new row inside split 0 ("per-tensor") or inside
# split 1's run ("empty-row": rows 1 and 3 hold no parameter).
SEGMENTS = {"per-tensor": [0, 1, 2, 3], "pairs": [0, 0, 1, 1], "empty-row": [0, 2, 2, 4]}
ROWS = {name: seg[-1] + 1 for name, seg in SEGMENTS.items()}


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


def row_ranges(params, segments):
    ranges, at = {}, 0
    for p, seg in zip(params, segments, strict=True):
        start = ranges.get(seg, (at, at))[0]
        at += p.numel()
        ranges[seg] = (start, at)
    return ranges


@pytest.mark.parametrize("name", SEGMENTS)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_project_grads_per_row_matches_the_fp64_oracle(backend, dtype, name, device):
    runs_here(backend, device)
    segments = SEGMENTS[name]
    params, grads, s, P = problem(device, 5, dtype)
    workspace = torch.empty(s["w0"].numel(), device=device)
    got = _ops.project_grads(params, grads, workspace, s["basis"], s["scales"], segments, backend)
    g = flat_grads(params, grads)
    assert got.shape == (ROWS[name], 5)
    ranges = row_ranges(params, segments)
    for row in range(ROWS[name]):
        a, b = ranges.get(row, (0, 0))
        expected = P[:, a:b] @ g[a:b]
        scale = P[:, a:b].abs() @ g[a:b].abs()
        assert_within(got[row].cpu(), expected, scale, TOL[dtype], f"row {row}")


def block_state(device, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, K, K, generator=g, dtype=torch.float64)
    return dict(
        alpha=torch.randn(L, K, generator=g).to(device),
        buf1=torch.randn(L, K, generator=g).to(device),
        buf2=torch.rand(L, K, generator=g).to(device),
        counters=torch.tensor([3, 1], dtype=torch.int64, device=device),
        coord_grad=torch.randn(L, K, generator=g).to(device),
        gram=(A @ A.transpose(1, 2) / K).float().to(device),
        pw0=torch.randn(L, K, generator=g).to(device),
        inv_norms=(torch.rand(L, K, generator=g) + 0.5).index_fill(1, torch.tensor([0]), 0.0).to(device),
        coef=torch.empty(L, K, device=device),
    )


SGD = dict(rule="sgd", momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, beta1=0.0,
           beta2=0.0, eps=0.0)  # fmt: skip
NESTEROV = dict(SGD, dampening=0.0, nesterov=True)
ADAMW = dict(rule="adamw", momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False, beta1=0.8,
             beta2=0.95, eps=1e-6)  # fmt: skip
RULES = {"sgd": SGD, "nesterov": NESTEROV, "adamw": ADAMW}


def restated_block_step(st, lr, h):
    """One step of ``twa::block_step_`` in fp64 from its docstring's formulas (no skip)."""
    d = {k: v.double().cpu() for k, v in st.items()}
    c = d["coord_grad"] * d["inv_norms"]
    r = d["pw0"] + torch.einsum("lij,lj->li", d["gram"], d["alpha"])
    t = int(st["counters"][0]) + 1
    if h["rule"] == "sgd":
        g = c + h["weight_decay"] * r
        buf = h["momentum"] * d["buf1"] + (1 - h["dampening"]) * g
        update = g + h["momentum"] * buf if h["nesterov"] else buf
        alpha = d["alpha"] - lr * update
        return alpha, buf, d["buf2"]
    b1, b2 = h["beta1"], h["beta2"]
    m = b1 * d["buf1"] + (1 - b1) * c
    v = b2 * d["buf2"] + (1 - b2) * c * c
    alpha = d["alpha"] - lr * h["weight_decay"] * r
    alpha = alpha - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + h["eps"])
    return alpha, m, v


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("L", "K"), [(3, 5), (2, 70)])
def test_block_step_matches_the_fp64_restatement(backend, rule, L, K, device):
    """From a state with momentum (counters[0] = 3 steps taken); K = 70 spans several row and
    column tiles of the Triton step; column 0 has zero norm in every block."""
    runs_here(backend, device)
    h, lr = RULES[rule], 0.05
    st = block_state(device, L, K)
    alpha, buf1, buf2 = restated_block_step(st, lr, h)
    _ops.block_step_(*st.values(), torch.tensor(lr, device=device), *h.values(), backend)
    assert st["counters"].tolist() == [4, 1]
    torch.testing.assert_close(st["alpha"].double().cpu(), alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["buf1"].double().cpu(), buf1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["buf2"].double().cpu(), buf2, rtol=1e-5, atol=1e-6)
    expected_coef = alpha * st["inv_norms"].double().cpu()
    torch.testing.assert_close(st["coef"].double().cpu(), expected_coef, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_step_skips_a_non_finite_gradient_in_any_block(backend, device):
    runs_here(backend, device)
    st = block_state(device, 3, 4)
    st["coord_grad"][2, 3] = float("nan")
    before = {k: v.clone() for k, v in st.items()}
    _ops.block_step_(*st.values(), torch.tensor(0.1, device=device), *ADAMW.values(), backend)
    assert st["counters"].tolist() == [3, 2]
    for name in ("alpha", "buf1", "buf2"):
        assert torch.equal(st[name], before[name]), name
    assert torch.equal(st["coef"], st["alpha"] * st["inv_norms"])


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_per_block_step_takes_the_reference_steps(backend, dtype, rule, device):
    """Five steps (one skipped: a NaN gradient) of ``twa::step_blocks_`` against the reference."""
    runs_here(backend, device)
    results = {}
    for b in ("torch", backend):
        params, grads, s, _ = problem(device, 4, dtype, seed=1)
        st = block_state(device, 3, 4, seed=2)
        st["counters"].zero_()
        del st["coord_grad"]
        workspace = torch.empty(s["w0"].numel(), device=device)
        for k in range(5):
            if k == 2:
                grads[0] = grads[0].clone()
                grads[0].view(-1)[0] = float("nan")
            _ops.step_blocks_(
                params, grads, workspace, s["w0"], s["basis"], s["scales"], st["alpha"], st["buf1"],
                st["buf2"], st["counters"], st["gram"], st["pw0"], st["inv_norms"], st["coef"],
                [0, 0, 1, 2], torch.tensor(0.1, device=device), *dict(RULES[rule], rule=rule).values(), b,
            )  # fmt: skip
            if k == 2:
                grads[0].view(-1)[0] = 0.0
        results[b] = (params, st)
    (p_ref, st_ref), (p, st) = results["torch"], results[backend]
    assert st["counters"].tolist() == st_ref["counters"].tolist() == [4, 1]
    for name in ("alpha", "buf1", "coef"):
        torch.testing.assert_close(st[name], st_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    for x, y in zip(p, p_ref, strict=True):
        torch.testing.assert_close(x, y, atol=TOL[x.dtype][0], rtol=TOL[x.dtype][1])


def test_fused_per_block_step_launches_at_most_4_kernels(device, monkeypatch):
    runs_here("triton", device)
    params, grads, s, _ = problem(device, 4, torch.float16)
    st = block_state(device, 3, 4)
    del st["coord_grad"]
    lr = torch.tensor(0.1, device=device)

    def step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        _ops.step_blocks_(
            params, [p.grad for p in params], s["w0"], s["w0"], s["basis"], s["scales"], *st.values(),
            [0, 1, 1, 2], lr, *ADAMW.values(), "triton",
        )  # fmt: skip

    calls = launches_of_a_second_call(step, device, monkeypatch)
    assert 1 <= len(calls) <= 4, calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    runs_here(backend, device)
    params, grads, s, _ = problem(device, 3, torch.float16)
    workspace = torch.empty(s["w0"].numel(), device=device)
    lr = torch.tensor(0.1, device=device)
    st = block_state(device, 2, 3)
    kw = {"backend": backend}
    args = (params, grads, workspace, s["basis"], s["scales"], [0, 0, 1, 1])
    torch.library.opcheck(torch.ops.twa.project_grads.default, args, kw)
    torch.library.opcheck(torch.ops.twa.block_step_.default, (*st.values(), lr, *ADAMW.values()), kw)
    del st["coord_grad"]
    args = (params, grads, workspace, s["w0"], s["basis"], s["scales"], *st.values(), [0, 0, 1, 1], lr,
            *SGD.values())  # fmt: skip
    torch.library.opcheck(torch.ops.twa.step_blocks_.default, args, kw)


def test_block_step_names_bad_arguments():
    st = block_state(torch.device("cpu"), 2, 3)
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match="rule must be one of"):
        _ops.block_step_(*st.values(), lr, *dict(SGD, rule="adam").values())
    st["gram"] = st["gram"][:, :2]
    with pytest.raises(RuntimeError, match="gram must be a contiguous fp32 \\[2, 3, 3\\]"):
        _ops.block_step_(*st.values(), lr, *SGD.values())
