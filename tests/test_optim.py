"""TWA optimizer: parity with the published algorithm, and what a training loop relies on."""

import copy

import pytest
import torch
from memory import largest_cpu_allocation
from torch import nn
from torch.nn import functional as F

import twa_kernels
from twa_kernels import TWA, Subspace, reference


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def make_data(n_batches, batch=32, generator=None):
    """Images whose label is the argmax of a fixed random linear 'teacher': learnable."""
    g = generator or torch.Generator().manual_seed(7)
    teacher = torch.randn(64, 4, generator=g)
    X = torch.randn(n_batches, batch, 1, 8, 8, generator=g)
    Y = (X.flatten(2) @ teacher).argmax(-1)
    return list(zip(X, Y, strict=True))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


@pytest.fixture(scope="module")
def sampled():
    """A small CNN trained by SGD for 8 'epochs', one sample per epoch (the TWA recipe)."""
    torch.manual_seed(3)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    data = make_data(6)
    samples = []
    for _ in range(8):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        samples.append([p.detach().clone() for p in model.parameters()])
    return model, samples


def published_twa(model, samples, batches, *, lr, momentum=0.0, weight_decay=0.0, schedule=None):
    """The published TWA step, restated independently in plain PyTorch.

    Basis: the raw flattened samples orthonormalised by Gram-Schmidt; start at their mean; each
    step replaces the concatenated gradient by P^T (P g) and runs torch.optim.SGD. The
    Gram-Schmidt runs twice per vector in fp64 and is stored in fp32: the published single fp32
    pass loses orthogonality as eps * cond(W)^2 (about 1e-3 on these collinear samples), which
    would measure that rounding instead of the algorithm.
    """
    W = torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in samples]).double()
    Q = []
    for w in W:
        v = w.clone()
        for _ in range(2):
            for q in Q:
                v -= (q @ v) * q
        Q.append(v / v.norm())
    P = torch.stack(Q).float()  # rows = basis vectors, as the published code stores them
    params = list(model.parameters())
    with torch.no_grad():
        mean = W.mean(0).float()
        offset = 0
        for p in params:
            p.copy_(mean[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = schedule(opt) if schedule else None
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        gp = P.T @ (P @ g)
        offset = 0
        for p in params:
            p.grad.copy_(gp[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
        if sched:
            sched.step()
        losses.append(loss.item())
    return losses


def run_twa(model, samples, batches, *, dtype, lr, momentum=0.0, weight_decay=0.0, schedule=None,
            **kwargs):  # fmt: skip
    space = Subspace(model, max_rank=len(samples), dtype=dtype)
    for s in samples:
        space.add(s)
    opt = TWA(model, space, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    sched = schedule(opt) if schedule else None
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        losses.append(loss.item())
    return losses, opt


HYPER = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)


def test_twa_matches_published_algorithm_fp32(sampled):
    model, samples = sampled
    batches = make_data(50, generator=torch.Generator().manual_seed(11))
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    run_twa(ours, samples, batches, dtype=torch.float32, **HYPER)
    published_twa(theirs, samples, batches, **HYPER)
    w_ours, w_theirs = flat_params(ours), flat_params(theirs)
    start = torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in samples]).double().mean(0)
    moved = (w_theirs - start).norm()
    assert moved > 1e-2 * w_theirs.norm(), "the test must move the weights to mean anything"
    assert (w_ours - w_theirs).norm() <= 1e-5 * w_theirs.norm()


def test_twa_loss_curve_matches_published_algorithm_fp16(sampled):
    model, samples = sampled
    batches = make_data(50, generator=torch.Generator().manual_seed(12))
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    # lr 0.2 rather than 0.5: at 0.5 (momentum 0.9) this net amplifies any 1e-4 perturbation of
    # the step to a 7.5e-3 loss difference within 50 steps, for bf16 and fp16 storage alike,
    # which measures the chaos of the trajectory rather than the storage (fp16: 1.1e-4 at 0.2).
    hyper = dict(HYPER, lr=0.2)
    loss_ours, _ = run_twa(ours, samples, batches, dtype=torch.float16, **hyper)
    loss_theirs = published_twa(theirs, samples, batches, **hyper)
    assert loss_theirs[-1] < 0.9 * loss_theirs[0], "TWA must train for the comparison to matter"
    rel = (torch.tensor(loss_ours) - torch.tensor(loss_theirs)).abs() / torch.tensor(loss_theirs)
    assert rel.max() <= 1e-3


@pytest.mark.parametrize(
    "schedule",
    [
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 8], gamma=0.1),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 20),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12),
    ],
    ids=["MultiStepLR", "LambdaLR", "OneCycleLR"],
)
def test_twa_follows_lr_schedulers(sampled, schedule):
    model, samples = sampled
    batches = make_data(12, generator=torch.Generator().manual_seed(13))
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    run_twa(ours, samples, batches, dtype=torch.float32, schedule=schedule, **HYPER)
    published_twa(theirs, samples, batches, schedule=schedule, **HYPER)
    w_ours, w_theirs = flat_params(ours), flat_params(theirs)
    assert (w_ours - w_theirs).norm() <= 1e-5 * w_theirs.norm()


def test_twa_nesterov_and_dampening_match_torch_sgd(sampled):
    """In coordinates with an exactly orthonormal basis, TWA is torch SGD on alpha."""
    model, samples = sampled
    for kwargs in (dict(momentum=0.8, nesterov=True), dict(momentum=0.8, dampening=0.3)):
        K = 3
        space = Subspace([torch.zeros(4, requires_grad=True)], max_rank=K, dtype=torch.float32)
        p = torch.zeros(4, requires_grad=True)
        for e in torch.eye(4)[:K]:
            space.add([e + torch.tensor([1.0, 0, 0, 0])] if space.num_samples else [e])
        opt = TWA([p], space, lr=0.1, weight_decay=0.01, start="current", **kwargs)
        alpha = torch.zeros(K, requires_grad=True)
        sgd = torch.optim.SGD([alpha], lr=0.1, weight_decay=0.01, **kwargs)
        basis = space.basis[:K] * space.scales[:K, None]
        for _ in range(5):
            g = torch.randn(4)
            p.grad = g.clone()
            opt.step()
            alpha.grad = basis @ g
            sgd.step()
            torch.testing.assert_close(opt.alpha, alpha.detach(), atol=1e-6, rtol=1e-6)


def test_twa_closure_returns_loss_and_steps(sampled):
    model, samples = sampled
    x, y = make_data(1)[0]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _, opt_a = run_twa(a, samples, [], dtype=torch.float32, lr=0.1)
    _, opt_b = run_twa(b, samples, [], dtype=torch.float32, lr=0.1)

    def closure():
        opt_a.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    loss = opt_a.step(closure)
    opt_b.zero_grad()
    expected = F.cross_entropy(b(x), y)
    expected.backward()
    opt_b.step()
    assert loss.item() == expected.item()
    assert torch.equal(flat_params(a), flat_params(b))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_twa_zero_grad_and_missing_grads_count_as_zero(set_to_none):
    """A parameter that receives no gradient (grad None) contributes zero to P^T g."""
    used = torch.randn(6, requires_grad=True)
    unused = torch.randn(5, requires_grad=True)
    space = Subspace([used, unused], max_rank=3, dtype=torch.float32)
    for _ in range(3):
        space.add([used.detach() + torch.randn(6), unused.detach() + torch.randn(5)])
    opt = TWA([used, unused], space, lr=0.1)
    unused.grad = torch.ones(5)  # zero_grad must clear it, to None or to zeros
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        assert (unused.grad is None) == set_to_none
        before = opt.alpha.clone()
        (used**2).sum().backward()
        g = torch.cat([used.grad, torch.zeros(5)]).double()
        P = space.basis[:3].double() * space.scales[:3, None].double()
        opt.step()
        torch.testing.assert_close(opt.alpha.double(), before - 0.1 * P @ g, atol=1e-6, rtol=0)


def test_twa_mixed_parameter_dtypes():
    w32 = torch.randn(7, requires_grad=True)
    w16 = torch.randn(9).bfloat16().requires_grad_()
    space = Subspace([w32, w16], max_rank=4)
    for _ in range(4):
        space.add([w32.detach() + 0.1 * torch.randn(7), (w16.float() + 0.1 * torch.randn(9))])
    opt = TWA([w32, w16], space, lr=0.5)
    loss = (w32**2).sum() + (w16.float() ** 3).sum()
    loss.backward()
    g = torch.cat([w32.grad.double(), w16.grad.double()])
    opt.step()
    P = space.basis[:4].double() * space.scales[:4, None].double()
    alpha = -0.5 * (P @ g)
    torch.testing.assert_close(opt.alpha.double(), alpha, atol=1e-5, rtol=1e-5)
    w = space.mean.double() + P.T @ opt.alpha.double()
    assert w16.dtype == torch.bfloat16 and w32.dtype == torch.float32
    torch.testing.assert_close(w32.detach().double(), w[:7], atol=1e-6, rtol=1e-6)
    assert torch.equal(w16.detach(), w[7:].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_twa_state_dict_resume_is_bit_identical(sampled, tmp_path, dtype):
    model, samples = sampled
    batches = make_data(12, generator=torch.Generator().manual_seed(14))
    schedule = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [8], 0.1)  # noqa: E731

    def train(model, opt, sched, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

    straight = copy.deepcopy(model)
    space = Subspace(straight, max_rank=8, dtype=dtype)
    for s in samples:
        space.add(s)
    opt = TWA(straight, space, lr=0.3, momentum=0.9, weight_decay=1e-3)
    sched = schedule(opt)
    train(straight, opt, sched, batches[:6])
    torch.save(
        {"model": straight.state_dict(), "space": space.state_dict(), "opt": opt.state_dict(),
         "sched": sched.state_dict()},
        tmp_path / "ckpt.pt",
    )  # fmt: skip
    train(straight, opt, sched, batches[6:])

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = small_cnn()  # fresh weights, overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    space2 = Subspace(resumed, max_rank=8, dtype=dtype)
    space2.load_state_dict(ckpt["space"])
    opt2 = TWA(resumed, space2, lr=0.3, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    sched2 = schedule(opt2)
    sched2.load_state_dict(ckpt["sched"])
    train(resumed, opt2, sched2, batches[6:])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_twa_step_never_synchronises_with_host(sampled, monkeypatch):
    model, samples = sampled
    model = copy.deepcopy(model)
    _, opt = run_twa(model, samples, [], dtype=torch.float16, lr=0.1, momentum=0.9,
                     weight_decay=1e-4)  # fmt: skip
    x, y = make_data(1)[0]
    F.cross_entropy(model(x), y).backward()

    def forbidden(name):
        def fail(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} reads the device inside step()")

        return fail

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert opt.steps == 2


def test_twa_step_allocates_nothing_proportional_to_D(monkeypatch):
    D = 40_000
    params = [torch.randn(30_000, requires_grad=True), torch.randn(10_000, requires_grad=True)]
    space = Subspace(params, max_rank=4)
    for _ in range(4):
        space.add([p.detach() + torch.randn_like(p) for p in params])
    opt = TWA(params, space, lr=0.1, momentum=0.9, weight_decay=1e-4)
    # Small chunks, so that a temporary proportional to D stands out from the chunk temporaries.
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 4 * 1024)
    for p in params:
        p.grad = torch.randn_like(p)
    assert largest_cpu_allocation(opt.step) <= 4 * 4 * 1024 < 4 * D // 8


def test_twa_non_finite_gradient_skips_the_step(sampled):
    model, samples = sampled
    model = copy.deepcopy(model)
    x, y = make_data(1)[0]
    _, opt = run_twa(model, samples, [], dtype=torch.float16, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    alpha = opt.alpha.clone()
    for bad in (float("inf"), float("nan")):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        next(model.parameters()).grad[0, 0, 0, 0] = bad
        opt.step()
    assert opt.skipped_steps == 2 and opt.steps == 0
    assert torch.equal(opt.alpha, alpha)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.steps == 1 and not torch.equal(opt.alpha, alpha)


@pytest.mark.parametrize(
    "dtype, tol",
    # The first sample is stored only to the storage's rounding (its direction is column 0), so
    # combinations whose coefficients do not sum to 1 carry that rounding: unit roundoff * ||w||.
    # fp32: the weights and the eight samples are fp32-rounded themselves, hence 4 units.
    [(torch.float32, 2**-22), (torch.float16, 2**-11)],
    ids=["fp32", "fp16"],
)
def test_twa_coefficients_recombine_the_samples(sampled, dtype, tol):
    model, samples = sampled
    model = copy.deepcopy(model)
    _, opt = run_twa(model, samples, make_data(10), dtype=dtype, lr=0.3, momentum=0.9)
    lam = opt.coefficients()
    W = torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in samples]).double()
    w = flat_params(model)
    assert lam.shape == (8,)
    assert (lam @ W - w).norm() <= tol * w.norm()


def test_twa_start_current_keeps_the_weights(sampled):
    model, samples = sampled
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    space = Subspace(model, max_rank=8)
    for s in samples:
        space.add(s)
    TWA(model, space, lr=0.1, start="current")
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_twa_start_mean_writes_the_mean(sampled):
    model, samples = sampled
    model = copy.deepcopy(model)
    space = Subspace(model, max_rank=8)
    for s in samples:
        space.add(s)
    TWA(model, space, lr=0.1)
    W = torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in samples]).double()
    torch.testing.assert_close(flat_params(model), W.mean(0), atol=1e-6, rtol=1e-6)


def _space(n_params=2, rank=2):
    params = [torch.randn(3 + i, requires_grad=True) for i in range(n_params)]
    space = Subspace(params, max_rank=rank + 1)
    for _ in range(rank):
        space.add([p.detach() + torch.randn_like(p) for p in params])
    return params, space


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
        (dict(lr=0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(lr=0.1, momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(lr=0.1, nesterov=True), ValueError, "nesterov=True requires momentum"),
        (dict(lr=0.1, start="last"), ValueError, "start must be one of"),
        (dict(lr=0.1, backend="tpu"), ValueError, "backend='tpu'"),
        (dict(lr="0.1"), TypeError, "lr must be a real number"),
    ],
)
def test_twa_bad_hyperparameters_name_the_argument(kwargs, error, match):
    params, space = _space()
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        TWA(params, space, **kwargs)
    for a, b in zip(before, params, strict=True):
        assert torch.equal(a, b.detach()), "a refused optimizer must not touch the weights"


def test_twa_params_that_do_not_match_the_subspace_are_refused():
    params, space = _space()
    with pytest.raises(ValueError, match="params has 1 tensors, the subspace was built for 2"):
        TWA(params[:1], space, lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(5,\), expected \(4,\)"):
        TWA([params[0], torch.randn(5, requires_grad=True)], space, lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] has dtype torch.float64"):
        TWA([params[0].double(), params[1]], space, lr=0.1)
    meta = [torch.empty(3, device="meta", requires_grad=True), params[1]]
    with pytest.raises(ValueError, match=r"params\[0\] is on meta"):
        TWA(meta, space, lr=0.1)
    with pytest.raises(ValueError, match=r"param group 0 holds a tensor of shape \(3,\) that is not one"):
        TWA([{"params": [params[0].detach().clone(), params[1]]}], space, lr=0.1)


def test_twa_empty_subspace_is_refused():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="subspace is empty"):
        TWA([p], Subspace([p], max_rank=2), lr=0.1)


def test_twa_load_state_dict_from_another_model_changes_nothing():
    params, space = _space(rank=2)
    opt = TWA(params, space, lr=0.1)
    other_params, other_space = _space(n_params=3, rank=2)
    other = TWA(other_params, other_space, lr=0.1)
    for p in other_params:
        p.grad = torch.randn_like(p)
    other.step()
    alpha = opt.alpha.clone()
    with pytest.raises(ValueError, match="different model: 3 parameters, this one has 2"):
        opt.load_state_dict(other.state_dict())
    assert torch.equal(opt.alpha, alpha)


def test_twa_refuses_to_step_after_the_subspace_changed():
    params, space = _space(rank=3)
    opt = TWA(params, space, lr=0.1)
    space.add([p.detach() + 1 for p in params])
    with pytest.raises(RuntimeError, match="subspace changed"):
        opt.step()


def test_package_imports_without_gpu_or_compiler():
    assert twa_kernels.TWA is TWA and "torch" in twa_kernels.BACKENDS
