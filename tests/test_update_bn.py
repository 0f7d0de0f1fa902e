"""update_bn: torch's BatchNorm recalibration, bit for bit, for any batch, and nothing changed
when it fails."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import twa_kernels
from twa_kernels.integrations.bn import update_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.BatchNorm1d(5),
        nn.SyncBatchNorm(5, affine=False),  # single process: plain batch norm
        nn.BatchNorm1d(5, track_running_stats=False),  # no running statistics at all
    )
    net.train()
    with torch.no_grad():  # statistics that are neither the reset ones nor update_bn's
        for _ in range(3):
            net(torch.randn(6, 3, 5, 5) * 2 + 1)
    return net


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6 + i, 3, 5, 5, generator=g) * 3 - 1 for i in range(n)]


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_same_state(a, b):
    """Buffers and parameters bit for bit, momenta, and every module's training flag."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [m.momentum for m in bns(a)] == [m.momentum for m in bns(b)]
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


def test_tensor_batches_equal_torch():
    ours, ref = make_net(), make_net()
    data = batches()
    update_bn(data, ours)
    torch_update_bn(data, ref)
    assert_same_state(ours, ref)
    assert ours[1].num_batches_tracked.item() == len(data)


def test_tuple_batches_equal_torch_through_a_dataloader():
    xs = torch.randn(40, 3, 5, 5) * 2 + 0.5
    ys = torch.randint(0, 5, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=7)
    ours, ref = make_net(), make_net()
    update_bn(loader, ours)
    torch_update_bn(loader, ref)
    assert_same_state(ours, ref)
    ours, ref = make_net(), make_net()
    update_bn([[x, 0] for x in batches()], ours)  # a list batch, a non-tensor target
    torch_update_bn(batches(), ref)
    assert_same_state(ours, ref)


class KwNet(nn.Module):
    """Hugging Face style: keyword inputs, the labels among them."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, pixel_values, labels=None, scale=1.0):
        out = self.net(pixel_values * scale)
        return out if labels is None else (out, nn.functional.cross_entropy(out, labels))


def test_dict_batches_call_model_with_keywords():
    data = batches()
    loader = torch.utils.data.DataLoader(
        [{"pixel_values": x, "labels": torch.tensor(i % 5)} for i, x in enumerate(torch.cat(data))],
        batch_size=6,
    )
    with pytest.raises(TypeError):  # torch's feeds the dict as one positional input
        torch_update_bn(loader, make_net())
    ours, ref = KwNet(), make_net()
    update_bn(loader, ours)
    torch_update_bn([b["pixel_values"] for b in loader], ref)
    assert_same_state(ours.net, ref)
    ours, ref = KwNet(), make_net()  # (inputs, labels) tuples whose inputs are a dict
    update_bn([({"pixel_values": x}, torch.zeros(len(x))) for x in data], ours)
    torch_update_bn(data, ref)
    assert_same_state(ours.net, ref)


def test_custom_forward():
    data = batches()
    seen = []

    def forward(model, batch):
        seen.append(batch)
        return model(batch["x"], scale=batch["scale"])

    ours, ref = KwNet(), make_net()
    update_bn([{"x": x, "scale": 0.5} for x in data], ours, forward=forward)
    torch_update_bn([x * 0.5 for x in data], ref)
    assert_same_state(ours.net, ref)
    assert len(seen) == len(data)
    ours, ref = make_net(), make_net()  # forward= receives the whole tuple batch
    update_bn([(0, x) for x in data], ours, forward=lambda m, b: m(b[1]))
    torch_update_bn(data, ref)
    assert_same_state(ours, ref)


def test_device_moves_every_tensor_of_the_batch():
    # The linear layer of a model on the meta device refuses CPU inputs, so the forward below
    # runs only if every tensor of the batch was moved. (BatchNorm with momentum=None reads its
    # batch count on the host, which a meta tensor cannot give: the forward skips it.)
    data = batches(2)

    def forward(m, batch):
        x, (x1, text) = batch["inputs"]
        assert x.device.type == x1.device.type == "meta" and text == "text" and batch["n"] == 3
        m[4](x.flatten(1)[:, :36]), m[4](x1.flatten(1)[:, :36])

    tagged = [{"inputs": (x, [x + 1, "text"]), "n": 3} for x in data]
    with pytest.raises(AssertionError):
        update_bn(tagged, make_net().to("meta"), forward=forward)
    with pytest.raises(RuntimeError, match="device"):
        update_bn(tagged, make_net().to("meta"), forward=lambda m, b: m[4](b["inputs"][0].flatten(1)[:, :36]))
    update_bn(tagged, make_net().to("meta"), forward=forward, device=torch.device("meta"))

    ours, ref = make_net(), make_net()  # CPU to CPU: torch's statistics
    update_bn([(x, torch.zeros(1)) for x in data], ours, device="cpu")
    torch_update_bn(data, ref, device="cpu")
    assert_same_state(ours, ref)


class Boom(Exception):
    pass


def failing_cases():
    good = batches(3)
    bad_shape = torch.randn(4, 2, 5, 5)  # 2 channels instead of 3: the conv raises

    def interrupted():
        yield from good
        raise KeyboardInterrupt

    def raising_forward(model, batch):
        model(batch)
        if batch.shape[0] == good[2].shape[0]:
            raise Boom
        return None

    return {
        "bad batch": (lambda: [*good[:2], bad_shape, good[2]], {}, RuntimeError),
        "KeyboardInterrupt": (interrupted, {}, KeyboardInterrupt),
        "forward raises": (lambda: good, {"forward": raising_forward}, Boom),
        "empty loader": (lambda: [], {}, ValueError),
    }


@pytest.mark.parametrize("case", list(failing_cases()))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_failure_restores_statistics_momenta_and_flags(case, mode):
    make_loader, kwargs, error = failing_cases()[case]
    model = make_net()
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model[1].eval()
        model[5].eval()
    before = copy.deepcopy(model)
    buffers = [m.running_mean for m in bns(model)]
    with pytest.raises(error):
        update_bn(make_loader(), model, **kwargs)
    assert_same_state(model, before)
    assert [m.running_mean for m in bns(model)] == buffers  # the same tensors, written in place


def test_empty_loader_names_the_loader():
    with pytest.raises(ValueError, match="loader list yielded no batch"):
        update_bn([], make_net())


def test_model_without_batchnorm_is_untouched_and_loader_not_iterated():
    class Untouchable:
        def __iter__(self):
            raise AssertionError("iterated")

    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Dropout()).eval()
    before = copy.deepcopy(model)
    update_bn(Untouchable(), model)
    assert_same_state(model, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parameters_unchanged_no_gradients_and_flag_restored(mode):
    model = make_net().train(mode == "train")
    model[4].eval()  # a submodule's own flag is restored too
    flags = [m.training for m in model.modules()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    update_bn(batches(), model)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n
    assert [m.training for m in model.modules()] == flags
    assert [m.momentum for m in bns(model)] == [0.3, 0.1, 0.1, 0.1]


def test_lazy_batchnorm():
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="not initialised"):
        update_bn(batches(), lazy)
    assert any(isinstance(m, nn.LazyBatchNorm2d) for m in lazy.modules())  # nothing was run
    lazy(batches(1)[0])  # initialised: torch's statistics again
    ref = copy.deepcopy(lazy)
    update_bn(batches(), lazy)
    torch_update_bn(batches(), ref)
    assert_same_state(lazy, ref)


def test_exported_lazily_from_the_package():
    assert twa_kernels.update_bn is update_bn
    assert "update_bn" in twa_kernels.__all__
    with pytest.raises(AttributeError):
        twa_kernels.no_such_name  # noqa: B018
