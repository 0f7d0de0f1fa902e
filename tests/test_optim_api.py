"""The optimizer's user-facing API: named parameters, writing averages, what repr shows."""

import warnings

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


# ---------------------------------------------------------------------------------------------
# lr as a tensor


def _train_with_scheduler(lr, backend, steps=6):
    model = make_model()
    space, _ = sampled(model, dtype=torch.float32, backend=backend)
    opt = TWA(model, space, lr=lr, momentum=0.9, weight_decay=1e-3, backend=backend)
    # gamma = 0.5: a scheduler computes a tensor lr in fp32 and a float lr in fp64; halving is
    # exact in both, so the lr values are the same and any difference would be the step's.
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.zeros(4, 2)).backward()
        opt.step()
        sched.step()
    return model, opt


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_lr_gives_the_same_weights_as_a_float_lr_bit_for_bit(backend):
    by_float, opt_f = _train_with_scheduler(0.3, backend)
    by_tensor, opt_t = _train_with_scheduler(torch.tensor(0.3), backend)
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)
    assert torch.equal(opt_t.alpha, opt_f.alpha)
    for a, b in zip(by_float.parameters(), by_tensor.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compiled_step_is_not_recompiled_when_a_scheduler_changes_a_tensor_lr():
    import torch._dynamo

    torch._dynamo.reset()
    model = make_model()
    space, _ = sampled(model, dtype=torch.float32, backend="torch")
    opt = TWA(model, space, lr=torch.tensor(0.3), momentum=0.9, backend="torch")
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(opt.step, backend=counting_backend)
    g = torch.Generator().manual_seed(3)
    compiled_after = []
    for i in range(8):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.zeros(4, 2)).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if i == 5:  # an edit behind the optimizer's back is still seen by the compiled step
                with torch.no_grad():
                    model[2].bias.zero_()
            step()
        assert [str(w.message)[:13] for w in caught if "TWA: " in str(w.message)] == (
            ["TWA: '2.bias'"] if i == 5 else []
        ), i
        sched.step()
        compiled_after.append(len(graphs))
    traced = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "twa.step_.default" in traced  # the whole step is one op in the graph
    # one graph for the step, compiled once for all the lr values the scheduler sets
    assert compiled_after[:5] == [compiled_after[0]] * 5, compiled_after
    assert compiled_after[6:] == [compiled_after[5]] * 2, compiled_after
    assert opt.steps == 8
    torch._dynamo.reset()
