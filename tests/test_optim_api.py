"""The optimizer's user-facing API: named parameters, writing averages, what repr shows."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from twa_kernels import TWA, Subspace


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))


def sampled(model, n=4, seed=1, **kwargs):
    g = torch.Generator().manual_seed(seed)
    space = Subspace(model, max_rank=n + 1, **kwargs)
    samples = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        samples.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double())
        space.add()
    return space, torch.stack(samples)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def test_twa_and_subspace_take_named_parameters():
    model = make_model()
    space, _ = sampled(model)
    by_module = Subspace(model, max_rank=2)
    by_names = Subspace(model.named_parameters(), max_rank=2)
    assert by_names.layout == by_module.layout  # names included
    opt = TWA(model.named_parameters(), space, lr=0.1)
    assert opt.params == list(model.parameters())
    x = torch.randn(4, 5)
    F.mse_loss(model(x), torch.zeros(4, 2)).backward()
    opt.step()
    assert opt.steps == 1


def test_named_parameters_must_be_name_tensor_pairs():
    model = make_model()
    space, _ = sampled(model)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        TWA([("a", model[0].weight), ("b", 3)], space, lr=0.1)


def test_write_average_writes_the_mean_of_the_samples():
    model = make_model()
    space, W = sampled(model)
    target = make_model(5)
    space.write_average_(target)
    assert torch.equal(flat(target.parameters()), space.mean.double())
    torch.testing.assert_close(flat(target.parameters()), W.mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_write_average_writes_a_combination_of_the_samples(dtype, tol):
    model = make_model()
    space, W = sampled(model, dtype=dtype)
    coefficients = torch.tensor([0.5, -0.25, 0.0, 1.5], dtype=torch.float64)
    target = make_model(5)
    space.write_average_(list(target.parameters()), coefficients)
    expected = coefficients @ W
    # fp16: each sample's difference from the first is stored to the storage's rounding, relative
    # to the size of the differences (~0.1 x the weights here) times the coefficients' sum.
    assert (flat(target.parameters()) - expected).abs().max() <= tol * expected.abs().max()


def test_write_average_takes_twa_coefficients():
    model = make_model()
    space, W = sampled(model, dtype=torch.float32)
    opt = TWA(model, space, lr=0.2, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 5)), torch.zeros(4, 2)).backward()
        opt.step()
    target = make_model(5)
    space.write_average_(target, opt.coefficients())
    torch.testing.assert_close(flat(target.parameters()), flat(model.parameters()), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "coefficients, error, match",
    [
        (torch.ones(3, dtype=torch.float64), ValueError, r"coefficients must have shape \(4,\)"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), ValueError, "nan or inf"),
        ("mean", TypeError, "coefficients"),
    ],
)
def test_write_average_checks_its_arguments_first(coefficients, error, match):
    model = make_model()
    space, _ = sampled(model)
    target = make_model(5)
    before = flat(target.parameters())
    with pytest.raises(error, match=match):
        space.write_average_(target, coefficients)
    with pytest.raises(ValueError, match="params has 1 tensors"):
        space.write_average_([target[0].weight])
    assert torch.equal(flat(target.parameters()), before)
    with pytest.raises(ValueError, match="no sample"):
        Subspace(make_model(), max_rank=2).write_average_(target)


def test_reprs_show_rank_samples_dtype_start_and_backend():
    model = make_model()
    space, _ = sampled(model, backend="torch")
    text = repr(space)
    for part in ("rank=4/5", "samples=4", "dtype=torch.float16", "backend='torch'"):
        assert part in text, (part, text)
    opt = TWA(model, space, lr=0.1, momentum=0.9, start="current", backend="torch")
    text = repr(opt)
    for part in ("rank=4", "samples=4", "dtype=torch.float16", "start='current'", "backend='torch'",
                 "lr=0.1", "momentum=0.9"):  # fmt: skip
        assert part in text, (part, text)
