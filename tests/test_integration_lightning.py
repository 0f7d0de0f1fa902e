"""TWACallback in real Lightning runs on the CPU: sampling, the switch to TWA, BatchNorm, and
``fit(ckpt_path=...)`` from an epoch-end checkpoint continuing bit for bit as the uninterrupted
run (with gradient clipping, accumulation, bf16 autocast and schedulers), also for a sharded
subspace under DDP (2 processes, one file per rank beside each checkpoint)."""

import copy
import functools
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.optim.swa_utils import update_bn as torch_update_bn  # noqa: E402

import twa_kernels  # noqa: E402
from twa_kernels.integrations.lightning import TWACallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 192, 32  # 6 batches per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(pl.LightningModule):
    """An MLP with BatchNorm; SGD with a scheduler of its own (dropped at the switch)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


def dataset(n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def loader(n=N):
    """Shuffled by a sampler seeded per epoch (Lightning calls set_epoch): the order does not
    depend on the global random state, which Lightning's checkpoints do not hold."""
    data = dataset(n)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)


def trainer(root, callbacks, max_epochs, **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kwargs,
    )  # fmt: skip


def every_epoch(root, top_k=-1):
    """A checkpoint at each epoch's end, the last ``top_k`` kept."""
    return ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=top_k, monitor="epoch", mode="max")


def flat(module):
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


def in_span(vector, space):
    """Relative distance of ``vector`` (fp32 [D]) from the span of the subspace's columns, in fp64."""
    basis, scales = space.columns
    P = (basis.double() * scales.double()[:, None]).T  # [D, k]
    coef = torch.linalg.lstsq(P, vector.double()[:, None]).solution
    return float((P @ coef - vector.double()[:, None]).norm() / vector.double().norm())


HEAD = dict(gradient_clip_val=0.5, accumulate_grad_batches=2, precision="bf16-mixed")


def head_callback():
    return TWACallback(
        max_rank=8,
        switch_epoch=3,
        optimizer_kwargs=dict(lr=0.5, momentum=0.9, weight_decay=1e-5),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )


def head_run(root, ckpt_path=None):
    model, twa = Net(), head_callback()
    initial = copy.deepcopy(model.state_dict())
    t = trainer(root, [twa, every_epoch(root)], max_epochs=5, **HEAD)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return model, twa, t, initial


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """3 SGD epochs (samples: the initial weights and each epoch's end), then 2 TWA epochs."""
    root = tmp_path_factory.mktemp("head")
    return root, *head_run(root)


def assert_same_run(a, b):
    """Weights, BatchNorm buffers, the subspace, TWA's state and the scheduler, bit for bit."""
    (model_a, twa_a, trainer_a), (model_b, twa_b, trainer_b) = a, b
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    space_a, space_b = twa_a.subspace.state_dict(), twa_b.subspace.state_dict()
    for k in ("basis", "scales", "anchor", "mean"):
        assert torch.equal(space_a[k], space_b[k]), k
    assert space_a["num_samples"] == space_b["num_samples"]
    opt_a, opt_b = twa_a.optimizer_twa.state_dict()["twa"], twa_b.optimizer_twa.state_dict()["twa"]
    for k in ("alpha", "momentum_buffer", "counters"):
        assert torch.equal(opt_a[k], opt_b[k]), k
    assert trainer_a.optimizers[0].param_groups[0]["lr"] == trainer_b.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("epoch", [1, 3], ids=["before-switch", "after-switch"])
def test_resume_from_an_epoch_end_checkpoint_is_bit_exact(head, tmp_path, epoch):
    root, model, twa, t, _ = head
    resumed = head_run(tmp_path, ckpt_path=root / f"epoch={epoch}.ckpt")
    assert_same_run((model, twa, t), resumed[:3])


def test_head_stage_trains_twa_in_the_span_of_the_samples(head):
    _, model, twa, t, _ = head
    space, opt = twa.subspace, twa.optimizer_twa
    assert space.num_samples == 4  # the initial weights and the ends of epochs 0, 1 and 2
    assert isinstance(opt, twa_kernels.TWA) and t.optimizers == [opt]
    assert opt.steps == 2 * 3  # 2 epochs of 6 batches, accumulated by 2
    # The module's StepLR (on SGD) is gone; TWA's own halved the lr twice (after each TWA epoch).
    assert [type(c.scheduler) for c in t.lr_scheduler_configs] == [torch.optim.lr_scheduler.StepLR]
    assert t.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == 0.5 * 0.5**2
    moved = flat(model) - space.mean
    assert moved.norm() > 1e-3 * space.mean.norm()  # TWA trained away from its start, the mean
    assert in_span(moved, space) < 1e-5


def test_batchnorm_is_recalibrated_when_training_ends(head):
    """The running statistics are those of one pass over the training data at the final weights,
    under the trainer's precision (bf16 autocast), as torch's update_bn computes them."""
    _, model, _, _, _ = head
    ref = copy.deepcopy(model)
    ref.net[1].running_mean.fill_(7.0)
    batches = loader()
    batches.sampler.set_epoch(4)  # the order of the last epoch, where Lightning left the sampler
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_update_bn(batches, ref.net)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.net[1], name), getattr(ref.net[1], name)), name


def test_checkpoints_hold_the_initial_weights_and_the_samples(head):
    """Built from the checkpoint files alone, the mean misses the initial weights; the callback's
    state in the checkpoint has them (the subspace's anchor) and the mean of all the samples."""
    root, _, _, _, initial = head
    ckpt = torch.load(root / "epoch=1.ckpt", weights_only=True)
    state = ckpt["callbacks"]["TWACallback"]
    assert state["switched"] is False and state["subspace"]["num_samples"] == 3
    space = twa_kernels.Subspace(Net(), max_rank=8)
    space.load_state_dict(state["subspace"])
    params = [k for k, _ in Net().named_parameters()]
    samples = [torch.cat([s[k].reshape(-1).float() for k in params]) for s in (
        initial,
        torch.load(root / "epoch=0.ckpt", weights_only=True)["state_dict"],
        ckpt["state_dict"],
    )]  # fmt: skip
    assert torch.equal(space.anchor, samples[0])
    mean = torch.stack(samples).double().mean(0)
    assert float((space.mean.double() - mean).abs().max()) < 1e-6 * float(mean.abs().max())
    files_only = torch.stack(samples[1:]).double().mean(0)
    assert float((files_only - mean).norm() / mean.norm()) > 1e-3  # what the files alone would give


def test_sampling_by_steps_then_a_tail_stage_in_a_second_fit(tmp_path):
    """Phase 1 samples every 2 optimizer steps from epoch 1 on and never switches; a second fit
    trains TWA from the last SGD weights (start="current") on those samples."""
    model = Net()
    sampler = TWACallback(max_rank=16, every_n_epochs=None, every_n_steps=2, sample_from_epoch=1)
    first = trainer(tmp_path, [sampler], max_epochs=3, enable_checkpointing=False)
    first.fit(model, loader())
    assert sampler.subspace.num_samples == 6  # steps 8, 10, 12 (epoch 1) and 14, 16, 18 (epoch 2)
    assert sampler.optimizer_twa is None and isinstance(first.optimizers[0], torch.optim.SGD)
    start = flat(model)

    tail = TWACallback(
        subspace=sampler.subspace, switch_epoch=0, recalibrate_bn=False,
        optimizer_kwargs=dict(lr=0.2, momentum=0.9, weight_decay=5e-5, start="current"),
    )  # fmt: skip
    second = trainer(tmp_path, [tail], max_epochs=2, enable_checkpointing=False)
    second.fit(model, loader())
    assert tail.optimizer_twa.steps == 12 and sampler.subspace.num_samples == 6
    moved = flat(model) - start
    assert moved.norm() > 1e-3 * start.norm()
    assert in_span(moved, sampler.subspace) < 1e-5


def test_arguments_are_checked_and_named():
    with pytest.raises(ValueError, match="max_rank"):
        TWACallback(max_rank=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        TWACallback(max_rank=4, every_n_epochs=0)
    with pytest.raises(ValueError, match="nothing would be sampled"):
        TWACallback(max_rank=4, every_n_epochs=None)
    with pytest.raises(ValueError, match="sample_from_epoch=5 is after switch_epoch=2"):
        TWACallback(max_rank=4, sample_from_epoch=5, switch_epoch=2, optimizer_kwargs=dict(lr=1.0))
    with pytest.raises(TypeError, match="lrr"):
        TWACallback(max_rank=4, switch_epoch=2, optimizer_kwargs=dict(lrr=1.0))
    with pytest.raises(TypeError, match="lr"):  # TWA's lr has no default
        TWACallback(max_rank=4, switch_epoch=2)
    with pytest.raises(ValueError, match="scheduler_interval"):
        TWACallback(max_rank=4, scheduler_interval="batch")
    space = twa_kernels.Subspace(Net(), max_rank=4)
    with pytest.raises(ValueError, match="not both"):
        TWACallback(max_rank=4, subspace=space)


def test_switch_without_samples_is_refused(tmp_path):
    """A checkpoint written without the callback resumes with no sample: the switch says so,
    instead of failing inside TWA."""
    plain = trainer(tmp_path, [every_epoch(tmp_path)], max_epochs=2)
    plain.fit(Net(), loader(64))
    twa = TWACallback(max_rank=4, switch_epoch=2, optimizer_kwargs=dict(lr=0.1))
    resumed = trainer(tmp_path / "r", [twa], max_epochs=3, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="empty subspace"):
        warnings.simplefilter("always")
        resumed.fit(Net(), loader(64), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert any("no TWACallback state" in str(w.message) for w in caught)


# --- a sharded subspace under DDP: 2 processes (Lightning's ddp_fork, gloo) -------------------


class Record(pl.Callback):
    """Each rank writes what the test compares when its fit ends (the forked ranks' callbacks are
    not sent back to this process)."""

    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        twa = next(c for c in trainer.callbacks if isinstance(c, TWACallback))
        out = {
            "weights": pl_module.state_dict(),
            "twa": {
                k: v for k, v in twa.optimizer_twa.state_dict()["twa"].items() if isinstance(v, torch.Tensor)
            },
            "shard": twa.subspace.shard,
            "steps": twa.optimizer_twa.steps,
        }
        torch.save(out, f"{self.path}-rank{trainer.global_rank}.pt")


def ddp_run(directory, ckpt_path=None):
    """4 epochs of 2 ranks x 4 batches of 16 (accumulated by 2): the switch after 2 epochs."""
    twa = TWACallback(max_rank=8, sharded=True, switch_epoch=2, optimizer_kwargs=dict(lr=0.5, momentum=0.9))
    t = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory,
        callbacks=[twa, every_epoch(directory, top_k=2), Record(directory / "result")],
        gradient_clip_val=0.5, accumulate_grad_batches=2, precision="bf16-mixed",
    )  # fmt: skip
    t.fit(Net(), torch.utils.data.DataLoader(dataset(128), batch_size=16), ckpt_path=ckpt_path)
    return [torch.load(directory / f"result-rank{r}.pt", weights_only=True) for r in range(2)]


def test_sharded_subspace_under_ddp_saves_and_resumes_per_rank(tmp_path):
    first = ddp_run(tmp_path / "first")
    # Rank 0 writes the checkpoints, every rank its part beside them; the older checkpoints (the
    # last 2 are kept) went with their parts.
    assert sorted(p.name for p in (tmp_path / "first").glob("epoch=*")) == sorted(
        f"epoch={e}.ckpt{part}" for e in (2, 3) for part in ("", ".twa-rank0.pt", ".twa-rank1.pt")
    )
    assert first[0]["shard"][1] == first[1]["shard"][0]  # each rank holds its part of the basis
    assert first[1]["shard"][1] == sum(p.numel() for p in Net().parameters())
    resumed = ddp_run(tmp_path / "second", tmp_path / "first" / "epoch=2.ckpt")  # after 1 TWA epoch
    for a, b in zip(first, resumed, strict=True):
        assert a["steps"] == b["steps"] == 2 * 2  # 2 TWA epochs of 4 batches per rank, by 2
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k
        for k in a["twa"]:
            assert torch.equal(a["twa"][k], b["twa"][k]), k
    (tmp_path / "first" / "epoch=2.ckpt.twa-rank1.pt").unlink()
    with pytest.raises(Exception, match=r"rank 1: \S*epoch=2\.ckpt\.twa-rank1\.pt") as caught:
        ddp_run(tmp_path / "third", tmp_path / "first" / "epoch=2.ckpt")
    assert "FileNotFoundError: the checkpoint" in str(caught.value)  # raised on rank 0 too


# --- the README's snippet, and the import of the package without the frameworks ----------------


def readme_block(first_line):
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README.md has {len(found)} python blocks starting with {first_line!r}"
    return found[0]


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer's logs and checkpoints
    namespace = {"model": Net(), "train_loader": loader(64)}  # 2 batches per epoch
    exec(compile(readme_block("# PyTorch Lightning"), "README.md", "exec"), namespace)
    twa, t = namespace["twa"], namespace["trainer"]
    assert twa.subspace.num_samples == 21  # the initial weights and 20 epoch ends
    assert t.optimizers == [twa.optimizer_twa] and twa.optimizer_twa.steps == 4 * 2
    assert twa.optimizer_twa.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1 * 0.1)


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, twa_kernels, twa_kernels.integrations, twa_kernels.integrations.bn\n"
        "twa_kernels.update_bn\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
