"""The fused Triton TWA step against the generic path, and its launch count.

The generic path (``_steps.LocalStep(...).step(..., backend="torch")``) gathers the gradients into a
flat fp32 buffer, runs the plain-PyTorch ops and copies the weights back; the fused step reads
``.grad`` and writes the parameters in place through a pointer table. Both must take the same
steps, skip the same non-finite steps, and leave the parameters with the same values.
"""

import os

import pytest
import torch
from conftest import DEVICES, STORAGE_DTYPES, TOL, only_config

triton = pytest.importorskip("triton")

from oracle import assert_within, columns, make_basis  # noqa: E402

from twa_kernels import _param_table as param_table  # noqa: E402
from twa_kernels import _steps, ops, reference  # noqa: E402
from twa_kernels._params import ParamLayout  # noqa: E402
from twa_kernels._triton import step as fused  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning",
    # inf/NaN gradient lanes times the zeros of masked-off basis rows, never stored.
    "ignore:invalid value encountered:RuntimeWarning",
)

# Mixed dtypes; a 1-element parameter; 600 values (two blocks of 512); a 3-D tensor; one more
# parameter whose grad stays None (zero gradient).
SHAPES = [(7, 3), (1,), (600,), (5,), (2, 2, 2), (4,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
NO_GRAD = 3
# Parameters 0, 1 and 5 start at flat offsets 0, 1024 and 3104 (multiples of 16) and hold whole
# blocks of 512: those blocks take the kernels' aligned path (16-byte loads on a GPU), in each
# parameter dtype; 3104 + 2048 starts a partial block, which takes the masked path, as do the
# parameters at 2048 (too short) and 2055, 3095 (offsets not multiples of 16).
ALIGNED_SHAPES = [(1024,), (16, 64), (7,), (1040,), (9,), (3, 700)]
ALIGNED_FLAGS = [1, 1, 1, 0, 0, 1]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before import")
    return torch.device(request.param)


def make_params(device, shapes=SHAPES, dtypes=DTYPES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen).to(device=device, dtype=d) for s, d in zip(shapes, dtypes, strict=True)
    ]


def subspace(D, K, dtype, device):
    basis = ops.empty_basis(K, D, dtype, device)  # rows 128-byte aligned, as Subspace keeps them
    if dtype == torch.int8:
        rows, scales = make_basis(K, D, dtype)  # unit rows, one scale per 64 values
        basis.copy_(rows)
        scales = scales.to(device)
    else:
        basis.copy_((torch.randn(K, D, device=device) * 1000).to(dtype))
        scales = torch.rand(K, device=device) * 1e-4
    w0 = torch.randn(D, device=device)
    gram = reference.gram(basis, scales).float()
    pw0 = reference.project(basis, scales, w0)
    return w0, basis, scales, gram, pw0


def set_grads(params, step, device):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        if i == NO_GRAD:
            p.grad = None
            continue
        g = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
        if step == 3 and p.grad is not None:
            p.grad.copy_(g)  # same storage as the step before: the pointer table is reused
        else:
            p.grad = g
    if step == 2:
        params[1].grad.view(-1)[0] = float("inf")  # this step must be skipped


HYPER = [
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
]


def as_hyper(hyper, device):
    """The step's ``Hyper`` for one of the dicts above (lr as a 0-dim fp32 device tensor)."""
    return _steps.Hyper(
        torch.tensor(hyper["lr"], device=device),
        *(hyper[k] for k in ("momentum", "dampening", "weight_decay", "nesterov")),
    )


@pytest.mark.parametrize("shapes", [SHAPES, ALIGNED_SHAPES], ids=["small", "aligned"])
@pytest.mark.parametrize("hyper", HYPER, ids=["momentum-wd", "nesterov"])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_fused_step_matches_generic_path(device, dtype, hyper, shapes):
    assert_fused_matches_generic(device, dtype, hyper, shapes, K=3)


STEP_KERNEL_CONFIGS = [
    *((fused._step_project_kernel, c) for c in fused._PROJECT_CONFIGS),
    *((fused._step_write_kernel, c) for c in fused._WRITE_CONFIGS),
]
STEP_INT8_KERNEL_CONFIGS = [
    *((fused._step_project_int8_kernel, c) for c in fused._PROJECT_CONFIGS_Q),
    *((fused._step_write_int8_kernel, c) for c in fused._WRITE_CONFIGS_Q),
]
CONFIG_CASES = [
    *((i, d) for i in range(len(STEP_KERNEL_CONFIGS)) for d in STORAGE_DTYPES if d != torch.int8),
    *((i, torch.int8) for i in range(len(STEP_INT8_KERNEL_CONFIGS))),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotune candidates run on a GPU only")
@pytest.mark.parametrize(("index", "dtype"), CONFIG_CASES)
def test_every_fused_step_config_matches_fp64_oracle(index, dtype):
    """Each candidate of the two step kernels (tile height, warps, programs per SM) on its own,
    with K tiles of 4-32 rows over K = 37, aligned and masked blocks, in every parameter dtype;
    the int8 kernels' candidates with an int8 basis."""
    configs = STEP_INT8_KERNEL_CONFIGS if dtype == torch.int8 else STEP_KERNEL_CONFIGS
    kernel, config = configs[index]
    with only_config(kernel, config):
        assert_one_step_matches_fp64(torch.device("cuda"), dtype, ALIGNED_SHAPES, DTYPES, K=37)


def assert_fused_matches_generic(device, dtype, hyper, shapes, K):
    """Five steps (one skipped for an inf gradient) of the fused and the generic step agree."""
    D = sum(torch.Size(s).numel() for s in shapes)
    w0, basis, scales, gram, pw0 = subspace(D, K, dtype, device)
    runs = {}
    for backend in ["torch", "triton"]:
        params = make_params(device, shapes)
        step_object = _steps.LocalStep(ParamLayout.of(params), torch.device(device))
        alpha = torch.zeros(K, device=device)
        buf = torch.zeros(K, device=device)
        counters = torch.zeros(2, dtype=torch.int64, device=device)
        for step in range(5):
            set_grads(params, step, device)
            step_object.step(
                params, w0, basis, scales, alpha, buf, counters, gram, pw0, as_hyper(hyper, device), backend
            )
        runs[backend] = (alpha, buf, counters, params)
    (a_ref, b_ref, c_ref, p_ref), (a, b, c, p) = runs["torch"], runs["triton"]
    assert c.tolist() == c_ref.tolist() == [4, 1]
    # Same fp32 math in another summation order (blocks of 512 vs chunks of 256 columns).
    torch.testing.assert_close(a, a_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5)
    for i, (x, y) in enumerate(zip(p, p_ref, strict=True)):
        # Both round the fp32 weights once to the parameter's dtype; the fp32 sums may differ
        # in the last bit, which can move a half-precision result by one unit (TOL[dtype]).
        atol, rtol = TOL[x.dtype]
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=f"parameter {i}")


def test_fused_step_table_marks_aligned_parameters(device):
    """The aligned path is taken exactly where offsets and addresses allow it."""
    params = make_params(device, ALIGNED_SHAPES)
    set_grads(params, 0, device)
    plan = param_table.plan_for(params, device)
    ptab, _ = plan.table(params, [p.grad for p in params])
    assert ptab[:, 6].tolist() == ALIGNED_FLAGS
    # A grad that is not 16-byte aligned turns its parameter's aligned path off.
    params[0].grad = torch.zeros(1025, device=device)[1:]
    ptab, _ = plan.table(params, [p.grad for p in params])
    assert ptab[:, 6].tolist() == [0] + ALIGNED_FLAGS[1:]


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_fused_step_matches_fp64_oracle(device, dtype):
    assert_one_step_matches_fp64(
        device, dtype, [(13,), (7, 3), (1,)], [torch.float32, torch.bfloat16, torch.float16], K=301
    )


def assert_one_step_matches_fp64(device, dtype, shapes, dtypes, K):
    """One step from alpha = 0 without momentum: alpha = -lr * P^T g, w = w0 + P alpha, fp64."""
    params = make_params(device, shapes, dtypes)
    D = sum(p.numel() for p in params)
    w0, basis, scales, gram, pw0 = subspace(D, K, dtype, device)
    for p in params:
        p.grad = torch.randn(p.shape, device=device).to(p.dtype)
    g = torch.cat([p.grad.double().flatten() for p in params])
    alpha = torch.zeros(K, device=device)
    buf = torch.zeros(K, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    lr = 0.5
    fused.fused_twa_step(
        params, w0, basis, scales, alpha, buf, counters, gram,
        pw0, _steps.Hyper(torch.tensor(lr, device=device), 0.0, 0.0, 0.0, False),
    )  # fmt: skip
    P = columns(basis, scales)
    # fp32 accumulation of exact products, relative to sum_d |P_kd g_d| (the terms cancel).
    assert_within(alpha, -lr * (P @ g), lr * (P.abs() @ g.abs()), TOL[torch.float32], "alpha")
    w_ref = w0.double() + P.T @ alpha.double()
    got = torch.cat([p.double().flatten() for p in params])
    off = 0
    for p in params:
        n = p.numel()
        atol, rtol = TOL[p.dtype]
        torch.testing.assert_close(got[off : off + n], w_ref[off : off + n], atol=atol, rtol=rtol)
        off += n
    assert counters.tolist() == [1, 0]


def test_deterministic_algorithms_pin_the_first_config(device, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) no kernel consults the autotuner (whose
    timing-dependent choice could change the summation order between processes)."""
    from triton.runtime import autotuner

    def consulted(*args, **kwargs):
        raise AssertionError("the autotuner was consulted")

    monkeypatch.setattr(autotuner.Autotuner, "run", consulted)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert_one_step_matches_fp64(device, torch.float16, ALIGNED_SHAPES, DTYPES, K=37)
        basis, scales = ops.empty_basis(37, 1000, torch.float16, device), torch.rand(37, device=device)
        basis.copy_(torch.randn(37, 1000, device=device).half())
        x = torch.randn(2, 1000, device=device)
        c = ops.project(basis, scales, x, backend="triton")
        c1 = ops.project(basis, scales, x[0], backend="triton")
        out = torch.empty(1000, device=device)
        ops.reconstruct_(out, x[0], basis, scales, c1, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    P = basis.double() * scales.double()[:, None]
    # fp32 sums of 1000 products of size ~1 (results ~30): errors ~1e-5, far inside these bounds,
    # which only need to tell a right result from a wrong one (the oracle tests bound them).
    torch.testing.assert_close(c.double(), x.double() @ P.T, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.double(), x[0].double() + P.T @ c1.double(), atol=1e-3, rtol=1e-4)


def test_fused_step_skips_nonfinite_bit_for_bit(device):
    params = make_params(device)
    D = sum(p.numel() for p in params)
    w0, basis, scales, gram, pw0 = subspace(D, 4, torch.float16, device)
    alpha, buf = torch.randn(4, device=device), torch.randn(4, device=device)
    counters = torch.tensor([2, 0], device=device)
    kw = _steps.Hyper(torch.tensor(0.1, device=device), 0.9, 0.0, 1e-2, True)
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0, 0] = float("nan")
    fused.fused_twa_step(params, w0, basis, scales, alpha, buf, counters, gram, pw0, kw)
    after_one = [p.clone() for p in params]
    a0, b0 = alpha.clone(), buf.clone()
    params[2].grad[5] = float("-inf")
    fused.fused_twa_step(params, w0, basis, scales, alpha, buf, counters, gram, pw0, kw)
    assert counters.tolist() == [2, 2]
    assert torch.equal(alpha, a0) and torch.equal(buf, b0)
    assert all(torch.equal(p, q) for p, q in zip(params, after_one, strict=True))


def _count_launches(monkeypatch):
    """Wrap every way a Triton kernel runs (compiled or interpreted) with a counter."""
    calls = []
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        original = cls.run

        def counted(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                calls.append(getattr(self, "__name__", "?"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", counted)
    return calls


def launches_of_a_second_call(step, device, monkeypatch) -> list[str]:
    """The kernels ``step()`` launches when called again (the first call autotunes, on a GPU
    benchmarking several configs); it must not call torch.cat nor (on CUDA) sync the host."""
    step()
    calls = _count_launches(monkeypatch)
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat in the step"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        step()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(torch, "cat", cat)
    return calls


def test_fused_step_launches_at_most_4_kernels(device, monkeypatch):
    n = 12
    shapes = [(3 + i,) if i % 3 else (2, 1 + i) for i in range(n)]
    dtypes = [DTYPES[i % 3] for i in range(n)]
    params = make_params(device, shapes, dtypes)
    D = sum(p.numel() for p in params)
    K = 5
    w0, basis, scales, gram, pw0 = subspace(D, K, torch.float16, device)
    alpha, buf = torch.zeros(K, device=device), torch.zeros(K, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    kw = _steps.Hyper(torch.tensor(0.1, device=device), 0.9, 0.0, 1e-2, False)

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        fused.fused_twa_step(params, w0, basis, scales, alpha, buf, counters, gram, pw0, kw)

    calls = launches_of_a_second_call(step, device, monkeypatch)
    assert 1 <= len(calls) <= 4, calls
    assert counters.tolist() == [2, 0]


def test_fused_step_through_twa_optimizer(device):
    # The public path: Subspace.add (orthogonalize_) and TWA.step with backend="triton" against
    # backend="torch", on a small MLP over 5 steps.
    from twa_kernels.optim import TWA
    from twa_kernels.subspace import Subspace

    final = {}
    for backend in ["torch", "triton"]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(
            device
        )
        space = Subspace(model.parameters(), max_rank=4, dtype=torch.float16, backend=backend)
        for _ in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            space.add()
        opt = TWA(model.parameters(), space, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        x, y = torch.randn(32, 8, device=device), torch.randint(0, 3, (32,), device=device)
        for _ in range(5):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        final[backend] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(final["triton"], final["torch"], strict=True):
        # fp32 weights near 1 after 5 steps of fp32 arithmetic in two summation orders.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize(
    ("lr_kind", "rule"), [("float", "sgd"), ("tensor", "sgd"), ("tensor", "adamw-tensor")]
)
def test_twa_step_cuda_graph_capture(lr_kind, rule):
    # TWA(backend="triton").step() captured once in a CUDA graph and replayed with gradients
    # written in place must give the same bits as eager steps with the same gradients; the eager
    # steps must not synchronise with the host. With a tensor lr an LR scheduler runs between
    # steps: the replays read the lr it wrote into the tensor. "adamw-tensor": TWAAdamW with
    # per-tensor coefficients, the fused per-block step.
    from twa_kernels.optim import TWA, TWAAdamW
    from twa_kernels.subspace import Subspace

    device = torch.device("cuda")
    n_steps = 5

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        model = model.to(device)
        space = Subspace(model.parameters(), max_rank=4, dtype=torch.float16, backend="triton")
        for _ in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            space.add()
        lr = torch.tensor(0.1, device=device) if lr_kind == "tensor" else 0.1
        if rule == "sgd":
            opt = TWA(model.parameters(), space, lr=lr, momentum=0.9, weight_decay=1e-3, backend="triton")
        else:
            opt = TWAAdamW(model.parameters(), space, lr=lr, weight_decay=1e-3, granularity="tensor",
                           backend="triton")  # fmt: skip
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # static grads: the graph reads these addresses
        return model, opt

    def next_lr(opt):
        if lr_kind == "tensor":
            opt.param_groups[0]["lr"].mul_(0.5)  # in place, as LR schedulers update a tensor lr

    gen = torch.Generator(device=device).manual_seed(1)
    model, _ = build()
    grads = [
        [torch.randn(p.shape, generator=gen, device=device) for p in model.parameters()]
        for _ in range(n_steps)
    ]

    def load_grads(model, opt, i):
        opt.zero_grad(set_to_none=False)
        for p, g in zip(model.parameters(), grads[i], strict=True):
            p.grad.add_(g)  # in place, as backward accumulates

    # Eager: the first step autotunes (it may synchronise); the rest must not.
    model_e, opt_e = build()
    eager = []
    for i in range(n_steps):
        if i > 0:
            torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            load_grads(model_e, opt_e, i)
            opt_e.step()
            next_lr(opt_e)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        eager.append(([p.detach().clone() for p in model_e.parameters()], opt_e.alpha.clone()))

    # Graph: step 0 eagerly on a side stream (warm-up, as torch.cuda.graph requires), then
    # capture (records, runs nothing) and replay for steps 1..n-1.
    model_g, opt_g = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load_grads(model_g, opt_g, 0)
        opt_g.step()
        next_lr(opt_g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for i in range(1, n_steps):
        load_grads(model_g, opt_g, i)
        graph.replay()
        next_lr(opt_g)
        weights, alpha = eager[i]
        assert torch.equal(opt_g.alpha, alpha), f"alpha after step {i}"
        for j, (p, w) in enumerate(zip(model_g.parameters(), weights, strict=True)):
            assert torch.equal(p, w), f"parameter {j} after step {i}"
    assert opt_g.steps == opt_e.steps == n_steps

    # Reallocated grads would leave the graph reading the old addresses: capture refuses.
    for p in model_g.parameters():
        p.grad = torch.zeros_like(p)
    with (
        pytest.raises(RuntimeError, match="capture needs the parameter table"),
        torch.cuda.graph(torch.cuda.CUDAGraph()),
    ):
        opt_g.step()


def test_plans_read_by_a_graph_are_never_evicted(monkeypatch):
    # A captured graph holds the addresses of its plan's tables and workspaces: the plan cache
    # may drop other plans, never that one. (Capture itself is marked as it would be.)
    from collections import OrderedDict

    monkeypatch.setattr(param_table, "_plans", OrderedDict())
    dev = torch.device("cpu")
    lists = [[torch.zeros(3 + i)] for i in range(param_table.MAX_PLANS + 3)]
    first = param_table.plan_for(lists[0], dev)
    first.captured.append(torch.zeros(param_table.FIELDS, dtype=torch.int64))
    for params in lists[1:]:
        param_table.plan_for(params, dev)
    plans = list(param_table._plans.values())
    assert first in plans and len(plans) == param_table.MAX_PLANS
    assert plans[-1] is param_table.plan_for(lists[-1], dev)  # the newest plan is cached too


def test_plan_workspaces_keep_their_address_and_zero_only_when_made():
    # Captured graphs read workspaces at fixed addresses; the CUDA step's tickets must start at
    # zero once, then keep what its kernels leave there (zero again after every step).
    plan = param_table.Plan([torch.zeros(3)], torch.device("cpu"))
    tickets = plan.workspace("tickets", (4,), zero=True)
    assert tickets.tolist() == [0.0] * 4
    tickets.fill_(7.0)
    again = plan.workspace("tickets", (4,), zero=True)
    assert again.data_ptr() == tickets.data_ptr() and again.tolist() == [7.0] * 4
    assert plan.workspace("tickets", (5,), zero=True).tolist() == [0.0] * 5  # another shape: new
