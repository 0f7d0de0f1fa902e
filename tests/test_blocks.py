"""Per-block coefficients: D cut into blocks of consecutive tensors, each with its own
coefficient vector. The blocks a granularity gives, and the plain-PyTorch projection,
reconstruction and Gram matrices per block against fp64 oracles."""

import copy

import pytest
import torch
from conftest import STORAGE_DTYPES, TOL
from oracle import assert_within, columns, random_basis
from test_optim import make_data
from torch import nn
from torch.nn import functional as F

from twa_kernels import TWA, Subspace, TWAAdamW, _backend, reference
from twa_kernels._params import ParamLayout, coefficient_blocks

# 12, 5, 8, 7 and 1 values at flat offsets 0, 12, 17, 25, 32 (D = 33).
LAYOUT = ParamLayout.of([torch.empty(s) for s in [(3, 4), (5,), (2, 2, 2), (7,), (1,)]])


@pytest.mark.parametrize(
    ("granularity", "blocks"),
    [
        ("model", [(0, 33)]),
        ("tensor", [(0, 12), (12, 17), (17, 25), (25, 32), (32, 33)]),
        (1, [(0, 12), (12, 17), (17, 25), (25, 32), (32, 33)]),
        # 12 >= 8 closes a block; 5 does not, 5 + 8 does; 7 does not, 7 + 1 does.
        (8, [(0, 12), (12, 25), (25, 33)]),
        # 12 + 5 + 8 = 25 >= 20; the last 8 values stay a smaller block of their own.
        (20, [(0, 25), (25, 33)]),
        (10**9, [(0, 33)]),
    ],
)
def test_granularity_gives_blocks_of_consecutive_tensors(granularity, blocks):
    assert coefficient_blocks(LAYOUT, granularity) == blocks


@pytest.mark.parametrize(
    ("granularity", "error", "match"),
    [
        ("layer", ValueError, "'model', 'tensor' or an int >= 1, got 'layer'"),
        (0, ValueError, "must be >= 1, got 0"),
        (-3, ValueError, "must be >= 1, got -3"),
        (True, TypeError, "got True"),
        (2.5, TypeError, "got 2.5"),
        (None, TypeError, "got None"),
    ],
)
def test_bad_granularity_is_named(granularity, error, match):
    with pytest.raises(error, match=match):
        coefficient_blocks(LAYOUT, granularity)


def awkward_blocks(D):
    """Blocks of 1 value, of a prime count, and ones crossing the 256-column chunks."""
    cuts = sorted({0, 1, 2, min(D, 259), min(D, 600), D})
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 columns: blocks start and end inside chunks and span several."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize(("K", "D"), [(1, 1), (3, 1009), (37, 600)])
def test_block_ops_match_the_fp64_oracle(small_chunks, dtype, K, D):
    basis, scales = random_basis(K, D, dtype, "cpu", "padded")
    P = columns(basis, scales)  # fp64 [K, D]
    blocks = awkward_blocks(D)
    x = torch.randn(D)
    got = reference.project_blocks(basis, scales, x, blocks)
    for i, (a, b) in enumerate(blocks):
        Pl, xl = P[:, a:b], x[a:b].double()
        assert_within(got[i], Pl @ xl, Pl.abs() @ xl.abs(), TOL[torch.float32], f"block {i}")
        G = reference.gram_blocks(basis, scales, blocks)[i]
        torch.testing.assert_close(G, Pl @ Pl.T, rtol=1e-12, atol=1e-12 * float((Pl @ Pl.T).abs().max()))
    coef = torch.randn(len(blocks), K)
    w0 = torch.randn(D)
    out = torch.full((D,), float("nan"))
    reference.reconstruct_blocks_(out, w0, basis, scales, coef, blocks)
    for i, (a, b) in enumerate(blocks):
        Pl, c = P[:, a:b], coef[i].double()
        expected = w0[a:b].double() + c @ Pl
        bound = w0[a:b].double().abs() + c.abs() @ Pl.abs()
        assert_within(out[a:b], expected, bound, TOL[torch.float32], f"block {i}")


def test_one_block_is_the_whole_model_op():
    """One block over all of D: the same numbers as project, reconstruct_ and gram."""
    basis, scales = random_basis(5, 1000, torch.float16, "cpu")
    x, w0, alpha = torch.randn(1000), torch.randn(1000), torch.randn(5)
    blocks = [(0, 1000)]
    assert torch.equal(
        reference.project_blocks(basis, scales, x, blocks)[0], reference.project(basis, scales, x)
    )
    assert torch.equal(reference.gram_blocks(basis, scales, blocks)[0], reference.gram(basis, scales))
    a, b = torch.empty(1000), torch.empty(1000)
    reference.reconstruct_blocks_(a, w0, basis, scales, alpha[None], blocks)
    reference.reconstruct_(b, w0, basis, scales, alpha)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- TWA and TWAAdamW with per-block coefficients against a plain fp64 restatement ----------


@pytest.fixture(scope="module")
def mlp_sampled():
    """An MLP trained by SGD for 8 'epochs', one sample per epoch: its layers (fan-in 64, 32,
    16) move at different scales. No parameter has an identically zero gradient (a conv bias
    before BatchNorm has one, which fp32 autograd turns into rounding noise that Adam's
    normalisation scales up to full steps, in any AdamW)."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    samples = []
    for _ in range(8):
        for x, y in make_data(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        samples.append([p.detach().clone() for p in model.parameters()])
    return model, samples


def restated_block_twa(model, P, w0, blocks, normalise, rule, hyper, batches, lr_at=None):
    """The per-block contract in fp64, on an fp64 copy of the model: ``P_l`` = the stored columns
    on block l, divided by their norm there (zero-norm columns stay zero); ``w_l = w0_l + P_l
    a_l``; ``c_l = P_l^T g_l``; ``r_l = P_l^T w_l``; SGD (momentum, L2 ``c + wd r``) or AdamW
    (``a -= lr wd r``, then Adam with bias correction) on every ``a_l``."""
    Ps = []
    for a, b in blocks:
        M = P[:, a:b]
        if normalise:
            norms = M.norm(dim=1, keepdim=True)
            M = torch.where(norms > 0, M / torch.where(norms > 0, norms, 1.0), 0.0)
        Ps.append(M)
    A = torch.zeros(len(blocks), P.shape[0], dtype=torch.float64)
    m, v = torch.zeros_like(A), torch.zeros_like(A)
    params = list(model.parameters())

    def weights():
        return torch.cat([w0[a:b] + A[i] @ Ps[i] for i, (a, b) in enumerate(blocks)])

    def write():
        w, at = weights(), 0
        with torch.no_grad():
            for p in params:
                p.copy_(w[at : at + p.numel()].view_as(p))
                at += p.numel()

    write()
    for t, (x, y) in enumerate(batches, 1):
        hyper = dict(hyper, lr=lr_at(t)) if lr_at else hyper
        for p in params:
            p.grad = None
        F.cross_entropy(model(x.double()), y).backward()
        g, w = torch.cat([p.grad.reshape(-1) for p in params]), weights()
        for i, (a, b) in enumerate(blocks):
            c, r = Ps[i] @ g[a:b], Ps[i] @ w[a:b]
            if rule == "sgd":
                d = c + hyper["weight_decay"] * r
                m[i] = d if t == 1 else hyper["momentum"] * m[i] + d
                A[i] -= hyper["lr"] * m[i]
            else:
                (b1, b2), lr = hyper["betas"], hyper["lr"]
                A[i] -= lr * hyper["weight_decay"] * r
                m[i] = b1 * m[i] + (1 - b1) * c
                v[i] = b2 * v[i] + (1 - b2) * c * c
                A[i] -= lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + hyper["eps"])
        write()
    return weights()


SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)


RESTATED = [
    ("sgd", "tensor", torch.float32),
    ("sgd", 100, torch.float32),
    ("sgd", "tensor", torch.int8),
    ("adamw", "model", torch.float32),
    ("adamw", "tensor", torch.float32),
    ("adamw", 100, torch.float32),
]
# The fused Triton step under the interpreter takes ~30 s per case on 2 cores: both rules, a
# float and an int8 basis.
RESTATED_TRITON = [RESTATED[0], RESTATED[2], RESTATED[5]]


@pytest.mark.parametrize(
    ("rule", "granularity", "dtype", "backend"),
    [(*case, "torch") for case in RESTATED] + [(*case, "triton") for case in RESTATED_TRITON],
)
def test_per_block_twa_matches_the_fp64_restatement(mlp_sampled, rule, granularity, dtype, backend):
    """20 steps on an MLP whose tensors move at different scales: the optimizer within 1e-5
    (relative) of the fp64 restatement of the contract on the stored basis (fp32, or int8 with
    its block scales), with the reference passes and with the fused Triton per-block step."""
    if backend == "triton" and not _backend.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    model, samples = mlp_sampled
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model).double()
    space = Subspace(ours, max_rank=len(samples), dtype=dtype)
    for s in samples:
        space.add(s)
    hyper = SGD if rule == "sgd" else ADAMW
    opt = (TWA if rule == "sgd" else TWAAdamW)(ours, space, granularity=granularity, backend=backend, **hyper)
    batches = make_data(20, generator=torch.Generator().manual_seed(5))
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
    blocks = coefficient_blocks(space.layout, granularity)
    P, w0 = columns(*space.columns), space.mean.double()
    expected = restated_block_twa(theirs, P, w0, blocks, granularity != "model", rule, hyper, batches)
    got = torch.cat([p.detach().reshape(-1).double() for p in ours.parameters()])
    assert opt.alpha.shape == (len(blocks), space.rank) and opt.steps == 20
    assert (expected - w0).norm() > 1e-3 * w0.norm(), "the steps must move the weights"
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def _trained(mlp_sampled, make_opt, steps=6, seed=5):
    model, samples = mlp_sampled
    model = copy.deepcopy(model)
    space = Subspace(model, max_rank=len(samples), dtype=torch.float32)
    for s in samples:
        space.add(s)
    opt = make_opt(model, space)
    for x, y in make_data(steps, generator=torch.Generator().manual_seed(seed)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, space, opt


OPTIMIZERS = {
    "sgd-tensor": lambda m, s: TWA(m, s, granularity="tensor", **SGD),
    "adamw-100": lambda m, s: TWAAdamW(m, s, granularity=100, **ADAMW),
    "adamw-model": lambda m, s: TWAAdamW(m, s, **ADAMW),
}


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_per_block_state_dict_resumes_bit_for_bit(mlp_sampled, which):
    model, space, opt = _trained(mlp_sampled, OPTIMIZERS[which])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2, _, opt2 = _trained(mlp_sampled, OPTIMIZERS[which], steps=1, seed=9)  # elsewhere
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for m, o in ((model, opt), (model2, opt2)):
        for x, y in make_data(3, generator=torch.Generator().manual_seed(8)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_per_block_coefficients_recombine_the_samples(mlp_sampled, which):
    """``coefficients()`` [blocks, samples]: ``w[S_l] = sum_i lambda[l, i] w_i[S_l]``."""
    model, space, opt = _trained(mlp_sampled, OPTIMIZERS[which])
    _, samples = mlp_sampled
    lam = opt.coefficients()
    W = torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in samples]).double()
    w = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    blocks = coefficient_blocks(space.layout, opt.granularity)
    assert lam.shape == (len(blocks), len(samples))
    for i, (a, b) in enumerate(blocks):
        torch.testing.assert_close(lam[i] @ W[:, a:b], w[a:b], rtol=0, atol=1e-5 * float(w.abs().max()))


def test_per_block_non_finite_gradient_skips_the_step(mlp_sampled):
    model, space, opt = _trained(mlp_sampled, OPTIMIZERS["adamw-100"], steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    moments = opt._momentum_buffer.clone()
    x, y = make_data(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(opt._momentum_buffer, moments)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (dict(betas=0.9), TypeError, "betas must be a pair"),
        (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
        (dict(granularity="layer"), ValueError, "granularity must be"),
        (dict(granularity=0), ValueError, r"granularity \(values per block\) must be >= 1"),
    ],
)
def test_twa_adamw_names_bad_arguments(kwargs, error, match):
    model = torch.nn.Linear(3, 2)
    space = Subspace(model, max_rank=2)
    space.add()
    with pytest.raises(error, match=match):
        TWAAdamW(model, space, **kwargs)


def test_per_block_state_dict_of_another_granularity_is_refused(mlp_sampled):
    _, space, opt = _trained(mlp_sampled, OPTIMIZERS["sgd-tensor"], steps=1)
    other = TWA(opt.params, space, granularity=100, **SGD)
    with pytest.raises(ValueError, match="granularity='tensor', this optimizer 100"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_per_block_twa_follows_an_lr_scheduler(mlp_sampled, rule):
    """MultiStepLR (x0.1 after 4 steps, then x0.1 after 8) on per-tensor coordinates: the fp64
    restatement with the same lr per step."""
    model, samples = mlp_sampled
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model).double()
    space = Subspace(ours, max_rank=len(samples), dtype=torch.float32)
    for s in samples:
        space.add(s)
    hyper = SGD if rule == "sgd" else ADAMW
    opt = (TWA if rule == "sgd" else TWAAdamW)(ours, space, granularity="tensor", **hyper)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 8], gamma=0.1)
    batches = make_data(12, generator=torch.Generator().manual_seed(6))
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
        sched.step()
    blocks = coefficient_blocks(space.layout, "tensor")
    P, w0 = columns(*space.columns), space.mean.double()
    lr_at = lambda t: hyper["lr"] * 0.1 ** ((t > 4) + (t > 8))  # noqa: E731
    expected = restated_block_twa(theirs, P, w0, blocks, True, rule, hyper, batches, lr_at)
    got = torch.cat([p.detach().reshape(-1).double() for p in ours.parameters()])
    constant = restated_block_twa(copy.deepcopy(model).double(), P, w0, blocks, True, rule, hyper, batches)
    assert (got - expected).norm() <= 1e-5 * expected.norm()
    assert (constant - expected).norm() > 1e-3 * (expected - w0).norm(), "the schedule must matter"
