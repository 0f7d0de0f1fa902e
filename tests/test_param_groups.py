"""TWA with torch-style parameter groups: the usual decay / no-decay split (any order), per-group
weight decay exact against a plain restatement, shared hyperparameters enforced, the groups'
coverage of the subspace checked, state dicts."""

import copy

import pytest
import torch
from oracle import columns
from test_optim import make_data, sampled  # noqa: F401  (fixture)
from torch.nn import functional as F

from twa_kernels import TWA, Subspace

HYPER = dict(lr=0.2, momentum=0.9)
DECAY, NO_DECAY = 5e-2, 0.0  # large enough that the split shows in 20 steps


def split(model):
    """Hugging Face's split: weights decay, biases and norm weights (1-D tensors) do not; the
    no-decay group first, so the groups are not in the subspace's order."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": no_decay, "weight_decay": NO_DECAY}, {"params": decay, "weight_decay": DECAY}]


def space_of(model, samples, dtype=torch.float32):
    space = Subspace(model, max_rank=len(samples), dtype=dtype)
    for s in samples:
        space.add(s)
    return space


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def restated(model, P, w0, decay_mask, batches, lr, momentum):
    """SGD on one coordinate vector with ``d = P^T g + sum_g wd_g P_g^T w_g`` (fp64)."""
    alpha = torch.zeros(P.shape[0], dtype=torch.float64)
    buf = None
    params = list(model.parameters())
    wd = torch.where(decay_mask, DECAY, NO_DECAY).double()

    def write():
        w, at = w0 + alpha @ P, 0
        with torch.no_grad():
            for p in params:
                p.copy_(w[at : at + p.numel()].view_as(p))
                at += p.numel()
        return w

    w = write()
    for x, y in batches:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x.double()), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        d = P @ g + P @ (wd * w)
        buf = d if buf is None else momentum * buf + d
        alpha -= lr * buf
        w = write()
    return w


def test_per_group_weight_decay_matches_the_restatement(sampled):  # noqa: F811
    model, samples = sampled
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model).double()
    space = space_of(ours, samples)
    opt = TWA(split(ours), space, **HYPER)
    batches = make_data(20, generator=torch.Generator().manual_seed(4))
    train(ours, opt, batches)
    mask = torch.cat([torch.full((p.numel(),), p.dim() > 1) for p in model.parameters()])
    P, w0 = columns(*space.columns), space.mean.double()
    expected = restated(theirs, P, w0, mask, batches, **HYPER)
    got = torch.cat([p.detach().reshape(-1).double() for p in ours.parameters()])
    no_split = restated(copy.deepcopy(model).double(), P, w0, torch.ones_like(mask), batches, **HYPER)
    assert (got - expected).norm() <= 1e-5 * expected.norm()
    assert (no_split - expected).norm() > 1e-3 * (expected - w0).norm(), "the split must matter"


def test_groups_with_one_weight_decay_take_the_same_steps_as_one_group(sampled):  # noqa: F811
    model, samples = sampled
    runs = []
    for grouped in (False, True):
        m = copy.deepcopy(model)
        params = split(m) if grouped else m.parameters()
        if grouped:
            for g in params:
                g["weight_decay"] = 1e-3
        opt = TWA(params, space_of(m, samples), weight_decay=1e-3, **HYPER)
        train(m, opt, make_data(5, generator=torch.Generator().manual_seed(4)))
        runs.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert torch.equal(*runs)


def test_groups_resume_bit_for_bit(sampled):  # noqa: F811
    model, samples = sampled
    m = copy.deepcopy(model)
    opt = TWA(split(m), space_of(m, samples), **HYPER)
    train(m, opt, make_data(3, generator=torch.Generator().manual_seed(4)))
    saved = copy.deepcopy((m.state_dict(), opt.state_dict()))
    m2 = copy.deepcopy(model)
    opt2 = TWA(split(m2), space_of(m2, samples), **HYPER)
    m2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    more = make_data(3, generator=torch.Generator().manual_seed(8))
    train(m, opt, more)
    train(m2, opt2, more)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    one_group = TWA(copy.deepcopy(model).parameters(), space_of(copy.deepcopy(model), samples), **HYPER)
    with pytest.raises(ValueError, match="parameter groups of"):
        one_group.load_state_dict(saved[1])


def test_groups_must_share_lr_momentum_and_nesterov(sampled):  # noqa: F811
    model, samples = sampled
    m = copy.deepcopy(model)
    groups = split(m)
    groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"param groups 0 and 1 have lr=0.2 and 0.5"):
        TWA(groups, space_of(m, samples), **HYPER)
    opt = TWA(split(m), space_of(m, samples), **HYPER)
    opt.param_groups[1]["momentum"] = 0.5  # a scheduler or a user changing one group only
    x, y = make_data(1)[0]
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match=r"param groups 0 and 1 have momentum=0.9 and 0.5"):
        opt.step()


def test_groups_must_cover_the_subspace_once(sampled):  # noqa: F811
    model, samples = sampled
    m = copy.deepcopy(model)
    space = space_of(m, samples)
    groups = split(m)
    with pytest.raises(ValueError, match=r"'0.weight' \(and \d+ more\) is in no param group"):
        TWA(groups[:1], space, **HYPER)
    twice = [groups[0], {"params": groups[0]["params"][:1]}, groups[1]]
    with pytest.raises(ValueError, match="is in param groups 0 and 1"):
        TWA(twice, space, **HYPER)
    with pytest.raises(TypeError, match="param group 0 must be a dict with a 'params' entry"):
        TWA([{"weight_decay": 0.1}], space, **HYPER)


def test_hugging_face_style_construction(sampled):  # noqa: F811
    """``optimizer_cls_and_kwargs=(TWA, {"subspace": space, "lr": ...})``: the Trainer calls
    ``TWA(grouped_parameters, **kwargs)`` with its decay / no-decay groups."""
    model, samples = sampled
    m = copy.deepcopy(model)
    kwargs = {"subspace": space_of(m, samples), "lr": 0.1, "momentum": 0.9}
    opt = TWA(split(m), **kwargs)
    train(m, opt, make_data(2))
    assert opt.steps == 2 and len(opt.param_groups) == 2
