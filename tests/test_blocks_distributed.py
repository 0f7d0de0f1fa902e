"""Per-block coefficients (TWA with granularity, TWAAdamW) and per-group weight decay on sharded
subspaces: a process group over a replicated model, and FSDP2, on 2 and 3 gloo ranks, against
one process."""

import pytest
import test_fsdp
import torch
import torch.distributed as dist
from gloo import spawn
from test_distributed import HYPER, MAX_RANK, make_batches, make_model, make_samples, rel_err, train

from twa_kernels import TWA, Subspace, TWAAdamW, _backend

pytest.importorskip("torch.distributed.fsdp")

# (optimizer, keyword arguments): SGD per tensor, AdamW per 100 values, and the published TWA
# with parameter groups of different weight decay (weights 5e-2, biases none).
RUNS = {
    "tensor": (TWA, dict(granularity="tensor", **HYPER)),
    "adamw": (TWAAdamW, dict(granularity=100, lr=1e-2, weight_decay=1e-2)),
    "groups": (TWA, dict(lr=0.5, momentum=0.9)),
}


def params_for(name, model):
    if name != "groups":
        return model
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 5e-2}]


REL = 1e-5  # fp32 sums in another order (the all-reduced partials): ~1e-7 measured alike


def full(model):
    return test_fsdp.full_weights(model)


def _runs(make, samples, group, world, rank, backend="auto"):
    """Each optimizer of RUNS from the same samples, trained on this rank's share."""
    out = {}
    for name, (opt_class, kwargs) in RUNS.items():
        model = make()
        space = Subspace(model, MAX_RANK, torch.float32, group)
        for s in samples:
            space.add(s)
        opt = opt_class(params_for(name, model), space, backend=backend, **kwargs)
        train(model, opt, make_batches(), world, rank)
        out[name] = (full(model), opt.alpha.clone(), opt.comm_bytes_per_step)
    return out


def process_group_scenario(world, rank, root):
    return _runs(make_model, make_samples(), dist.group.WORLD, world, rank)


def fsdp_scenario(world, rank, root, backend="auto"):
    sharded = lambda: test_fsdp.shard(test_fsdp.make_model())  # noqa: E731
    return _runs(sharded, test_fsdp.make_samples(), None, world, rank, backend)


def process_group_triton_scenario(world, rank, root):
    """The process-group runs with the Triton kernels (interpreted on CPU): the per-row
    projection of this rank's shard of the averaged gradient and the per-row write of its shard."""
    return _runs(make_model, make_samples(), dist.group.WORLD, world, rank, "triton")


def fsdp_triton_scenario(world, rank, root):
    """The FSDP2 runs with the Triton kernels (interpreted on CPU): the per-row projection of
    the local shards, the [L, K] step and the per-row write of the shards."""
    return fsdp_scenario(world, rank, root, "triton")


def _single(make, samples):
    out = {}
    for name, (opt_class, kwargs) in RUNS.items():
        model = make()
        space = Subspace(model, MAX_RANK, torch.float32)
        for s in samples:
            space.add(s)
        opt = opt_class(params_for(name, model), space, **kwargs)
        train(model, opt, make_batches())
        out[name] = (full(model), opt.alpha.clone())
    return out


@pytest.mark.parametrize(
    ("scheme", "world"),
    [("process_group", 2), ("process_group", 3), ("fsdp", 2), ("fsdp", 3), ("process_group_triton", 3),
     ("fsdp_triton", 2)],
)  # fmt: skip
def test_per_block_and_per_group_decay_on_a_sharded_subspace_match_one_process(tmp_path, scheme, world):
    if scheme.endswith("_triton") and not _backend.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if scheme.startswith("fsdp"):
        expected = _single(test_fsdp.make_model, test_fsdp.make_samples())
    else:
        expected = _single(make_model, make_samples())
    deadline = 240 if scheme.endswith("_triton") else 90  # the interpreter: ~4x the time on 2 cores
    for r, out in enumerate(spawn(world, f"test_blocks_distributed:{scheme}_scenario", tmp_path, deadline)):
        for name, (weights, alpha) in expected.items():
            got_weights, got_alpha, comm = out[name]
            assert rel_err(got_weights, weights) <= REL, f"rank {r} {name}: weights"
            assert rel_err(got_alpha, alpha) <= REL, f"rank {r} {name}: alpha"
