"""TWASampler and the two-phase recipe in real Hugging Face Trainer runs on the CPU: sampling,
the subspace saved beside each checkpoint, TWA as the Trainer's optimizer, and
``train(resume_from_checkpoint=...)`` continuing bit for bit as the uninterrupted run in both
phases (bf16 autocast, gradient accumulation, gradient clipping and a scheduler in phase 2)."""

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

import twa_kernels  # noqa: E402
from twa_kernels.integrations.hf import SUBSPACE_FILE, TWASampler, load_subspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 192, 32  # 6 batches per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """An MLP with BatchNorm that returns its loss in a dict, as the Trainer expects."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def dataset(n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]


def arguments(out, epochs, **kwargs):
    """bf16 in both phases: accelerate prepares a model once, so the second Trainer on the same
    model keeps the first one's autocast."""
    kwargs = dict(
        num_train_epochs=epochs, per_device_train_batch_size=BATCH, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", save_strategy="epoch", use_cpu=True, bf16=True, seed=0,
        disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0,
    ) | kwargs  # fmt: skip
    return TrainingArguments(str(out), **kwargs)


PHASE2 = dict(gradient_accumulation_steps=2, max_grad_norm=0.5)  # 3 steps per epoch


def phase1(out, model, sampler=None, resume=None):
    space = twa_kernels.Subspace(model, max_rank=8) if sampler is None else sampler.subspace
    sampler = sampler or TWASampler(space)
    Trainer(model, arguments(out, 3), train_dataset=dataset(), callbacks=[sampler]).train(
        resume_from_checkpoint=resume
    )
    return space


def phase2(out, model, space, resume=None):
    opt = twa_kernels.TWA(model.parameters(), space, lr=0.5, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    trainer = Trainer(
        model, arguments(out, 3, **PHASE2), train_dataset=dataset(), optimizers=(opt, sched),
        callbacks=[TWASampler(space)],
    )  # fmt: skip
    if resume is None:
        twa_kernels.update_bn(trainer.get_train_dataloader(), model)
    trainer.train(resume_from_checkpoint=resume)
    return opt, sched


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Phase 1: 3 SGD epochs sampled by TWASampler; phase 2: 3 TWA epochs on the same model."""
    root = tmp_path_factory.mktemp("hf")
    model = Net()
    initial = copy.deepcopy(model.state_dict())
    space = phase1(root / "sgd", model)
    after_sgd = copy.deepcopy(model.state_dict())
    space_after_sgd = copy.deepcopy(space.state_dict())
    opt, sched = phase2(root / "twa", model, space)
    return dict(root=root, model=model, initial=initial, space=space, opt=opt, sched=sched,
                after_sgd=after_sgd, space_after_sgd=space_after_sgd)  # fmt: skip


def flat(state):
    return torch.cat([state[k].reshape(-1).float() for k, _ in Net().named_parameters()])


def in_span(vector, space):
    """Relative distance of ``vector`` (fp32 [D]) from the span of the subspace's columns, in fp64."""
    basis, scales = space.columns
    P = (basis.double() * scales.double()[:, None]).T
    coef = torch.linalg.lstsq(P, vector.double()[:, None]).solution
    return float((P @ coef - vector.double()[:, None]).norm() / vector.double().norm())


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_subspace(a, b):
    for k in ("basis", "scales", "anchor", "mean"):
        assert torch.equal(a[k], b[k]), k
    assert a["num_samples"] == b["num_samples"] and a["rank"] == b["rank"]


def test_phase_one_samples_every_epoch_and_saves_beside_each_checkpoint(run):
    root = run["root"] / "sgd"
    assert run["space_after_sgd"]["num_samples"] == 4  # the initial weights and 3 epoch ends
    assert torch.equal(run["space_after_sgd"]["anchor"], flat(run["initial"]))
    for epoch, step in enumerate((6, 12, 18), 1):
        saved = torch.load(root / f"checkpoint-{step}" / SUBSPACE_FILE, weights_only=True)
        assert saved["num_samples"] == epoch + 1
    final = torch.load(root / "checkpoint-18" / SUBSPACE_FILE, weights_only=True)
    assert_same_subspace(final, run["space_after_sgd"])


def test_phase_one_resume_is_bit_exact(run, tmp_path):
    shutil.copytree(run["root"] / "sgd" / "checkpoint-6", tmp_path / "checkpoint-6")
    model = Net(seed=1)  # other weights: the checkpoint's are loaded
    space = phase1(
        tmp_path, model, TWASampler(twa_kernels.Subspace(model, max_rank=8)), tmp_path / "checkpoint-6"
    )
    assert_same_state(model.state_dict(), run["after_sgd"])
    assert_same_subspace(space.state_dict(), run["space_after_sgd"])


def test_phase_two_trains_twa_in_the_span_and_samples_nothing(run):
    opt, space, model = run["opt"], run["space"], run["model"]
    assert opt.steps == 3 * 3 and space.num_samples == 4
    assert opt.param_groups[0]["lr"] == 0.5 * 0.5**3  # StepLR stepped by the Trainer every step
    moved = flat(model.state_dict()) - space.mean
    assert moved.norm() > 1e-3 * space.mean.norm()
    assert in_span(moved, space) < 1e-5
    for step in (3, 6, 9):  # every phase-2 checkpoint holds the subspace
        saved = torch.load(run["root"] / "twa" / f"checkpoint-{step}" / SUBSPACE_FILE, weights_only=True)
        assert_same_subspace(saved, run["space_after_sgd"])


def test_phase_two_resume_is_bit_exact(run, tmp_path):
    checkpoint = run["root"] / "twa" / "checkpoint-3"
    shutil.copytree(checkpoint, tmp_path / "checkpoint-3")
    model = Net(seed=1)
    space = twa_kernels.Subspace(model, max_rank=8)
    load_subspace(space, tmp_path / "checkpoint-3")
    opt, sched = phase2(tmp_path, model, space, resume=tmp_path / "checkpoint-3")
    assert_same_state(model.state_dict(), run["model"].state_dict())
    mine, theirs = opt.state_dict()["twa"], run["opt"].state_dict()["twa"]
    for k in ("alpha", "momentum_buffer", "counters"):
        assert torch.equal(mine[k], theirs[k]), k
    assert sched.state_dict() == run["sched"].state_dict()


def test_sampling_by_steps(tmp_path):
    model = Net()
    sampler = TWASampler(
        twa_kernels.Subspace(model, max_rank=8), every_n_epochs=None, every_n_steps=4, sample_from_epoch=1
    )
    phase1(tmp_path, model, sampler)
    assert sampler.subspace.num_samples == 3  # steps 8 and 12 (epoch 1) and 16 (epoch 2)


def test_missing_subspace_file_is_named(run, tmp_path):
    shutil.copytree(run["root"] / "sgd" / "checkpoint-6", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / SUBSPACE_FILE).unlink()
    model = Net()
    sampler = TWASampler(twa_kernels.Subspace(model, max_rank=8))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-6/twa_subspace\.pt is missing"):
        phase1(tmp_path, model, sampler, resume=tmp_path / "checkpoint-6")
    with pytest.raises(FileNotFoundError, match="twa_subspace.pt is missing"):
        load_subspace(sampler.subspace, tmp_path)


def test_arguments_are_checked_and_named():
    with pytest.raises(TypeError, match="subspace"):
        TWASampler(Net())
    space = twa_kernels.Subspace(Net(), max_rank=4)
    with pytest.raises(ValueError, match="every_n_steps"):
        TWASampler(space, every_n_steps=0)
    with pytest.raises(ValueError, match="sample_from_epoch"):
        TWASampler(space, sample_from_epoch=-1)


def readme_block(first_line):
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README.md has {len(found)} python blocks starting with {first_line!r}"
    return found[0]


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    """The two phases (the Trainer's defaults: 8 samples a batch, 8 batches an epoch), then the
    resume of phase 2 in a new model from its last checkpoint, which restores its weights."""
    monkeypatch.chdir(tmp_path)
    namespace = {"model": Net(), "train_set": dataset(64)}
    exec(compile(readme_block("# Hugging Face Trainer: phase 1"), "README.md", "exec"), namespace)
    space, opt = namespace["space"], namespace["opt"]
    assert space.num_samples == 11 and opt.steps == 3 * 8
    assert (tmp_path / "run" / "twa" / "checkpoint-24" / SUBSPACE_FILE).is_file()
    trained = {k: p.detach().clone() for k, p in namespace["model"].named_parameters()}
    namespace["model"] = Net(seed=1)
    exec(compile(readme_block("# Hugging Face Trainer: resuming"), "README.md", "exec"), namespace)
    assert namespace["space"].num_samples == 11 and torch.equal(namespace["opt"].alpha, opt.alpha)
    for k, p in namespace["model"].named_parameters():
        assert torch.equal(p, trained[k]), k


def test_optimizer_cls_and_kwargs_builds_twa_over_the_trainers_param_groups(run, tmp_path):
    """``Trainer(..., optimizer_cls_and_kwargs=(TWA, {"subspace": ..., ...}))``: the Trainer
    builds ``TWA(groups, **kwargs)`` with its decay and no-decay groups (biases and BatchNorm
    weights without weight decay) and trains with it."""
    model = Net()
    model.load_state_dict(run["after_sgd"])
    space = twa_kernels.Subspace(model, max_rank=8)
    space.load_state_dict(run["space_after_sgd"])
    kwargs = {"subspace": space, "lr": 0.5, "momentum": 0.9}
    trainer = Trainer(
        model, arguments(tmp_path, 1, weight_decay=1e-4, save_strategy="no"), train_dataset=dataset(),
        optimizer_cls_and_kwargs=(twa_kernels.TWA, kwargs),
    )  # fmt: skip
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, twa_kernels.TWA) and opt.steps == N // BATCH
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 1e-4], decays
    assert in_span(flat(model.state_dict()) - space.mean, space) <= 1e-5, "the weights left the span"
