"""What a user can do wrong, or do outside the optimizer, and what must then (not) happen.

Non-finite samples, corrupt or foreign state dicts, copies of optimizers, checkpoints of
wrapped or compiled models, steps without gradients, weights edited behind the optimizer's
back. The rule throughout: check everything first, then change; a refusal changes nothing.
"""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from twa_kernels import TWA, Subspace

# The fused Triton step (interpreted on the CPU) writes the weights through raw pointers, the
# reference path through torch copies: the step semantics below are checked on both.
BACKENDS = ["torch", "triton"]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def drift(model, scale=0.05, generator=None):
    """Move the weights a little, as an epoch of training would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def sampled_space(model, n=4, max_rank=6, seed=1, **kwargs):
    g = torch.Generator().manual_seed(seed)
    space = Subspace(model, max_rank=max_rank, **kwargs)
    for _ in range(n):
        drift(model, generator=g)
        space.add()
    return space


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def space_snapshot(space):
    """Everything that describes the subspace (its state dict) plus the live counters."""
    return space.state_dict(), (space.rank, space.num_samples, space.version, space.tol)


def assert_same_space(space, snapshot):
    state, counters = snapshot
    now, now_counters = space_snapshot(space)
    assert now_counters == counters
    assert set(now) == set(state)
    for key, value in state.items():
        if key == "coords":
            assert_same_tensors(now[key], value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(now[key], value), key
        else:
            assert now[key] == value, key


def opt_snapshot(opt):
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return group, opt.alpha.clone(), opt._momentum_buffer.clone(), opt._counters.clone()


def assert_same_opt(opt, snapshot):
    group, alpha, buf, counters = snapshot
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == group
    assert torch.equal(opt.alpha, alpha)
    assert torch.equal(opt._momentum_buffer, buf)
    assert torch.equal(opt._counters, counters)


# ---------------------------------------------------------------------------------------------
# non-finite samples


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first-sample", "later-sample"])
def test_add_refuses_a_non_finite_sample_and_changes_nothing(bad, first, backend):
    model = make_model()
    if first:
        space = Subspace(model, max_rank=4, backend=backend)
    else:
        space = sampled_space(model, n=2, max_rank=4, backend=backend)
    before = space_snapshot(space)
    with torch.no_grad():
        model[2].weight[1, 3] = bad
        model[2].bias[0] = bad
    with pytest.raises(ValueError, match=r"'2\.weight'.*(nan|inf)"):
        space.add()
    assert_same_space(space, before)
    # the subspace keeps working: a finite sample after the refusal is taken
    with torch.no_grad():
        model[2].weight[1, 3] = 0.5
        model[2].bias[0] = 0.5
    assert space.add() > 0
    assert space.num_samples == before[1][1] + 1


def test_add_names_the_value_index_without_parameter_names():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    space = Subspace(params, max_rank=2)
    with pytest.raises(ValueError, match=r"params\[1\] holds nan"):
        space.add([torch.ones(3), torch.tensor([1.0, float("nan"), 2.0, 3.0])])
    assert (space.rank, space.num_samples) == (0, 0)


def test_from_checkpoints_refuses_a_non_finite_checkpoint(tmp_path):
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    state = model.state_dict()
    state["0.bias"] = state["0.bias"].clone()
    state["0.bias"][2] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*'0\.bias' holds inf"):
        Subspace.from_checkpoints(make_model(), [tmp_path / "good.pt", tmp_path / "bad.pt"], 3)


# ---------------------------------------------------------------------------------------------
# Subspace.load_state_dict: validate, then apply


def _corrupt_space_state(name):
    model = make_model(3)
    state = sampled_space(model, n=4, seed=7).state_dict()
    n = state["anchor"].numel()
    if name == "scales-size":
        state["scales"] = state["scales"][:-1]
    elif name == "anchor-size":
        state["anchor"] = torch.zeros(n + 1)
    elif name == "mean-size":
        state["mean"] = torch.zeros(n - 1)
    elif name == "mean-nan":
        state["mean"] = state["mean"].clone()
        state["mean"][0] = float("nan")
    elif name == "basis-inf":
        state["basis"] = state["basis"].clone()
        state["basis"][1, 0] = float("inf")
    elif name == "basis-dtype":
        state["basis"] = state["basis"].float()
    elif name == "coords-truncated":
        state["coords"] = [c.clone() for c in state["coords"]]
        state["coords"][2] = state["coords"][2][:-1]
    elif name == "coords-count":
        state["coords"] = state["coords"][:-1]
    elif name == "rank-vs-coords":
        state["rank"] = state["rank"] - 1
        state["basis"], state["scales"] = state["basis"][:-1], state["scales"][:-1]
    elif name == "missing-anchor":
        del state["anchor"]
    elif name == "negative-rank":
        state["rank"] = -1
    elif name == "tol":
        state["tol"] = 2.0
    elif name == "scales-nan":
        state["scales"] = state["scales"].clone()
        state["scales"][0] = float("nan")
    elif name == "not-a-tensor":
        state["mean"] = state["mean"].tolist()
    else:
        raise AssertionError(name)
    return state


SPACE_CORRUPTIONS = [
    "scales-size", "anchor-size", "mean-size", "mean-nan", "basis-inf", "basis-dtype",
    "coords-truncated", "coords-count", "rank-vs-coords", "missing-anchor", "negative-rank",
    "tol", "scales-nan", "not-a-tensor",
]  # fmt: skip


@pytest.mark.parametrize("corruption", SPACE_CORRUPTIONS)
def test_subspace_load_state_dict_checks_everything_before_changing_anything(corruption):
    model = make_model(3)
    space = sampled_space(model, n=3, seed=2)
    opt = TWA(model, space, lr=0.1, momentum=0.9)
    train(model, opt, batches(2))
    before_space, before_opt, before_weights = space_snapshot(space), opt_snapshot(opt), weights(model)
    with pytest.raises(ValueError):
        space.load_state_dict(_corrupt_space_state(corruption))
    assert_same_space(space, before_space)
    assert_same_opt(opt, before_opt)
    assert_same_tensors(weights(model), before_weights)
    train(model, opt, batches(1))  # the optimizer built on it still steps (the basis did not change)
    assert opt.steps == 3


def test_subspace_load_state_dict_still_loads_a_good_state():
    model = make_model(3)
    good = sampled_space(model, n=4, seed=7).state_dict()
    other = Subspace(make_model(3), max_rank=6)
    other.load_state_dict(good)
    assert (other.rank, other.num_samples) == (good["rank"], good["num_samples"])


# ---------------------------------------------------------------------------------------------
# TWA.load_state_dict: validate, then apply; and the basis it belongs to


def _trained(seed=3, space_seed=2, steps=3, backend="auto"):
    model = make_model(seed)
    space = sampled_space(model, n=3, seed=space_seed, backend=backend)
    opt = TWA(model, space, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    train(model, opt, batches(steps))
    return model, space, opt


def _corrupt_opt_state(name):
    _, _, opt = _trained(steps=2)
    state = opt.state_dict()
    twa = state["twa"]
    if name == "alpha-size":
        twa["alpha"] = torch.zeros(twa["alpha"].numel() + 1)
    elif name == "alpha-nan":
        twa["alpha"] = torch.full_like(twa["alpha"], float("nan"))
    elif name == "momentum-size":
        twa["momentum_buffer"] = twa["momentum_buffer"][:-1]
    elif name == "missing-counters":
        del twa["counters"]
    elif name == "counters-dtype":
        twa["counters"] = twa["counters"].float()
    elif name == "negative-counters":
        twa["counters"] = torch.tensor([-1, 0])
    elif name == "lr":
        state["param_groups"][0]["lr"] = -1.0
    elif name == "missing-twa":
        del state["twa"]
    elif name == "two-groups":
        state["param_groups"] = state["param_groups"] * 2
    else:
        raise AssertionError(name)
    return state


OPT_CORRUPTIONS = ["alpha-size", "alpha-nan", "momentum-size", "missing-counters",
                   "counters-dtype", "negative-counters", "lr", "missing-twa", "two-groups"]  # fmt: skip


@pytest.mark.parametrize("corruption", OPT_CORRUPTIONS)
def test_twa_load_state_dict_checks_everything_before_changing_anything(corruption):
    model, _, opt = _trained(steps=3)
    opt.param_groups[0]["lr"] = 0.05  # differs from the saved lr: a half-load would show
    before_opt, before_weights = opt_snapshot(opt), weights(model)
    with pytest.raises(ValueError):
        opt.load_state_dict(_corrupt_opt_state(corruption))
    assert_same_opt(opt, before_opt)
    assert_same_tensors(weights(model), before_weights)


def test_twa_state_dict_of_another_basis_is_refused():
    """Same model, rank and sample count, other samples: loading would move the weights."""
    _, _, theirs = _trained(space_seed=2)
    model, _, mine = _trained(space_seed=9)
    assert theirs.rank == mine.rank
    before_opt, before_weights = opt_snapshot(mine), weights(model)
    with pytest.raises(ValueError, match="another basis"):
        mine.load_state_dict(theirs.state_dict())
    assert_same_opt(mine, before_opt)
    assert_same_tensors(weights(model), before_weights)


def test_twa_state_dict_loads_on_a_reloaded_subspace(tmp_path):
    model, space, opt = _trained()
    torch.save({"space": space.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2 = make_model(11)
    space2 = Subspace(model2, max_rank=6)
    space2.load_state_dict(ck["space"])
    opt2 = TWA(model2, space2, lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(ck["opt"])
    assert torch.equal(opt2.alpha, opt.alpha)
    assert_same_tensors(weights(model2), weights(model))


# ---------------------------------------------------------------------------------------------
# copies


def _roundtrip_deepcopy(pair):
    return copy.deepcopy(pair)


def _roundtrip_pickle(pair):
    return pickle.loads(pickle.dumps(pair))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", [_roundtrip_deepcopy, _roundtrip_pickle], ids=["deepcopy", "pickle"])
def test_copies_of_model_and_optimizer_continue_bit_for_bit(how, backend):
    model, space, opt = _trained(steps=3, backend=backend)
    model2, opt2 = how((model, opt))
    assert opt2.params[0] is next(model2.parameters())
    assert opt2.subspace is not space
    assert opt2.subspace._params[0] is next(model2.parameters())
    data = batches(4, seed=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "TWA: ")  # a copy is not an edit behind its back
        train(model, opt, data)
        train(model2, opt2, data)
    assert_same_tensors(weights(model2), weights(model))
    assert torch.equal(opt2.alpha, opt.alpha)
    assert opt2.steps == opt.steps == 7


def test_a_copy_steps_independently_of_the_original():
    model, _, opt = _trained(steps=2)
    before = weights(model)
    model2, opt2 = copy.deepcopy((model, opt))
    train(model2, opt2, batches(2, seed=9))
    assert_same_tensors(weights(model), before)
    assert opt.steps == 2 and opt2.steps == 4


def test_add_param_group_is_refused():
    model, _, opt = _trained(steps=1)
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="parameter groups are fixed at construction"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------------------------
# from_checkpoints: paths and prefixes


def _save_checkpoints(tmp_path, model, n, transform=lambda k: k):
    g = torch.Generator().manual_seed(4)
    paths = []
    for i in range(n):
        drift(model, generator=g)
        paths.append(tmp_path / f"{i}.pt")
        torch.save({transform(k): v for k, v in model.state_dict().items()}, paths[-1])
    return paths


@pytest.mark.parametrize("as_str", [True, False], ids=["str", "Path"])
def test_from_checkpoints_takes_one_path(tmp_path, as_str):
    model = make_model()
    (path,) = _save_checkpoints(tmp_path, model, 1)
    space = Subspace.from_checkpoints(make_model(), str(path) if as_str else path, 2)
    assert (space.rank, space.num_samples) == (1, 1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(space.anchor, flat)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_from_checkpoints_strips_wrapper_prefixes(tmp_path, prefix):
    model = make_model()
    live = Subspace(model, max_rank=3)
    paths = _save_checkpoints(tmp_path, model, 2, lambda k: prefix + k)
    live_model = make_model()
    for path in paths:
        live.add([torch.load(path, weights_only=True)[prefix + n] for n, _ in live_model.named_parameters()])
    loaded = Subspace.from_checkpoints(make_model(), paths, 3)
    assert torch.equal(loaded.mean, live.mean)


def test_from_checkpoints_of_a_compiled_model(tmp_path):
    """The model passed is itself wrapped by torch.compile: its names carry ``_orig_mod.``."""
    model = make_model()
    paths = _save_checkpoints(tmp_path, model, 2)
    compiled = torch.compile(make_model())
    space = Subspace.from_checkpoints(compiled, paths, 3)
    assert space.num_samples == 2


@pytest.mark.parametrize("paths", [3, None, b"ck.pt", [3]], ids=["int", "None", "bytes", "list-of-int"])
def test_from_checkpoints_refuses_other_path_types(paths):
    with pytest.raises(TypeError, match="paths"):
        Subspace.from_checkpoints(make_model(), paths, 2)


# ---------------------------------------------------------------------------------------------
# step semantics: no gradients, weights edited outside the optimizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_any_gradient_changes_nothing(backend):
    model, _, opt = _trained(steps=3, backend=backend)
    opt.zero_grad(set_to_none=True)
    before_opt, before_weights = opt_snapshot(opt), weights(model)
    versions = [p._version for p in model.parameters()]
    assert opt.step() is None
    assert_same_opt(opt, before_opt)
    assert_same_tensors(weights(model), before_weights)
    assert [p._version for p in model.parameters()] == versions, "no weight write at all"


def test_step_with_some_gradients_none_still_steps():
    model, _, opt = _trained(steps=1)
    opt.zero_grad(set_to_none=True)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad = None
    opt.step()
    assert opt.steps == 2


def _projector(space):
    basis, scales = space.columns
    P = basis.double() * scales.double()[:, None]
    return P.T @ torch.linalg.solve(P @ P.T, P)  # the orthogonal projector onto the span


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["load_state_dict", "detach_copy", "no_grad_inplace", "data_assignment"])
def test_weights_edited_outside_the_optimizer_are_kept_with_a_warning(edit, backend):
    model, space, opt = _trained(steps=3, backend=backend)
    target = make_model(21)
    if edit == "load_state_dict":
        model.load_state_dict(target.state_dict())
    elif edit == "detach_copy":
        for p, q in zip(model.parameters(), target.parameters(), strict=True):
            p.detach().copy_(q)
    elif edit == "no_grad_inplace":
        with torch.no_grad():
            model[2].weight.copy_(target[2].weight)
    else:
        model[2].weight.data = target[2].weight.detach().clone()
    edited = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    opt.param_groups[0].update(momentum=0.0, weight_decay=0.0)
    opt.zero_grad()
    x, y = batches(1, seed=3)[0]
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    name = "0.weight" if edit in ("load_state_dict", "detach_copy") else "2.weight"
    with pytest.warns(UserWarning, match=rf"'{name}'.*changed outside"):
        opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    # continues from the edited weights: one SGD step on the projected gradient
    expected = edited - 0.1 * _projector(space) @ g
    torch.testing.assert_close(after, expected, atol=2e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "TWA: ")
        train(model, opt, batches(2))  # the next steps do not warn again
    assert opt.start == "current"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightning_swa_callback_ends_on_its_average(backend):
    """What Lightning's StochasticWeightAveraging does at the end of training, without Lightning:
    copy the running average into the module, then call optimizer.step() with no gradients."""
    model, _, opt = _trained(steps=2, backend=backend)
    average = torch.optim.swa_utils.AveragedModel(model)
    for x, y in batches(4, seed=6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        average.update_parameters(model)
    for dst, src in zip(model.parameters(), average.module.parameters(), strict=True):
        dst.detach().copy_(src.to(dst.device))
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert_same_tensors(weights(model), [p.detach() for p in average.module.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_reads_the_device_once(monkeypatch, backend):
    """The finiteness check rides on the one transfer ``add()`` already makes: one ``.cpu()``,
    and every other value read on the host comes from what it returned."""
    model = make_model()
    space = sampled_space(model, n=2, backend=backend)
    drift(model)
    transfers = []
    cpu = torch.Tensor.cpu

    def counted_cpu(self, *args, **kwargs):
        out = cpu(self, *args, **kwargs)
        transfers.append(out.untyped_storage().data_ptr())
        return out

    def reader(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() not in transfers:
                raise AssertionError(f"Tensor.{name} reads a value outside the one transfer of add()")
            return original(self, *args, **kwargs)

        return read

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, reader(name))
    space.add()
    monkeypatch.undo()
    assert len(transfers) == 1
    assert space.num_samples == 3


def test_a_state_dict_without_a_basis_fingerprint_loads_with_a_warning():
    """Saved before the fingerprint existed: it cannot be checked, and the user is told so."""
    model, _, opt = _trained(steps=2)
    state = opt.state_dict()
    del state["twa"]["basis_fingerprint"]
    alpha = opt.alpha.clone()
    train(model, opt, batches(1))
    with pytest.warns(UserWarning, match="no basis fingerprint"):
        opt.load_state_dict(state)
    assert torch.equal(opt.alpha, alpha)
