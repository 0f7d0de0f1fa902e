"""Subspace and TWA on FSDP2 models (``fully_shard``): gloo on CPU, 2 and 3 spawned processes.

Each rank's basis covers its local parameter shards; the step's only collective of its own is
the all-reduce of K coordinate gradients. The spawned runs (uneven shards, nested
``fully_shard``) are compared with the same samples and batches in this process without FSDP.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from gloo import spawn
from test_distributed import (
    BATCH,
    HYPER,
    IN,
    MAX_RANK,
    N_SAMPLES,
    OUT,
    STEPS,
    _NoHostReads,
    make_batches,
    rel_err,
    train,
)
from test_distributed import make_samples as trajectory
from torch import nn
from torch.nn import functional as F

from twa_kernels import TWA, Subspace, _backend, distributed

fsdp = pytest.importorskip("torch.distributed.fsdp")

# Samples, batches, hyperparameters and the batch split as in test_distributed (BATCH divisible
# by 2 and 3: each rank's mean gradient, averaged, is the batch's).
# dim-0 rows 10, 7, 3 (and biases): shards of 5/5, 4/3, 2/1 rows on 2 ranks, 4/4/2, 3/3/1,
# 1/1/1 on 3: uneven everywhere, and every rank holds some of every tensor.
HIDDEN = (10, 7)
REL = 1e-5  # the requirement (fp32 basis); fp32 sums in another order differ by ~1e-7
DEADLINE_S = 90  # per spawn; FSDP2's first forward on 2 busy cores takes several seconds


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, HIDDEN[0])
        self.b = nn.Linear(HIDDEN[0], HIDDEN[1])
        self.c = nn.Linear(HIDDEN[1], OUT)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make_model():
    torch.manual_seed(5)
    return Net()


def shard(model):
    """Nested fully_shard: the first two layers on their own, the root around them."""
    fsdp.fully_shard(model.a)
    fsdp.fully_shard(model.b)
    fsdp.fully_shard(model)
    return model


def make_samples():
    return trajectory(make_model)


def full_weights(model):
    """The whole flat weights (an FSDP2 model's gathered from its shards)."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


class _Collectives:
    """Count the payload bytes of every torch.distributed collective called while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_gather_single", "reduce_scatter_single", "all_to_all_single")  # fmt: skip

    def __enter__(self):
        self.calls = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():

            def counted(t, *args, _name=name, _fn=fn, **kwargs):
                self.calls.append((_name, t.numel() * t.element_size()))
                return _fn(t, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def main_scenario(world, rank, root):
    out = {}
    samples, batches = make_samples(), make_batches()
    model = shard(make_model())
    space = Subspace(model, MAX_RANK, torch.float32)
    out["local_numel"], out["dim"] = space.local_numel, space.dim
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = next(model.parameters()).device_mesh
    with _Collectives() as counted:
        for i, s in enumerate(samples):
            if i == 2:  # one sample given as DTensors sharded like the model
                s = [distribute_tensor(t, mesh, [Shard(0)]) for t in s]
            space.add(s)
    out["add_collectives"] = counted.calls
    out["rank"], out["coords"] = space.rank, space.sample_coordinates()
    opt = TWA(model, space, **HYPER)
    out["start"] = full_weights(model)
    x, y = batches[0]
    mine = slice(rank * (BATCH // world), (rank + 1) * (BATCH // world))
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    with _Collectives() as counted, _NoHostReads():
        opt.step()
    out["step_collectives"] = counted.calls
    opt.zero_grad()
    train(model, opt, batches[1:], world, rank)
    out["weights"] = full_weights(model)
    out["alpha"] = opt.alpha.clone()
    out["comm"] = opt.comm_bytes_per_step
    out["space_state"] = space.state_dict()
    out["opt_state"] = copy.deepcopy(opt.state_dict())
    distributed.save_checkpoint(root / f"dcp_w{world}", space, opt)
    # Resume at the same world size: a fresh model and subspace, the saved states loaded.
    model2 = shard(make_model())
    space2 = Subspace(model2, MAX_RANK, torch.float32)
    space2.load_state_dict(out["space_state"])
    opt2 = TWA(model2, space2, **HYPER)
    opt2.load_state_dict(copy.deepcopy(out["opt_state"]))
    out["resumed"] = full_weights(model2)
    train(model, opt, batches[:2], world, rank)
    train(model2, opt2, batches[:2], world, rank)
    out["continued"], out["continued_resumed"] = full_weights(model), full_weights(model2)
    # The mean of the samples (SWA) written into the shards.
    space.write_average_(model)
    out["average"] = full_weights(model)
    return out


def _load_dcp(world, rank, root, saved_by):
    """A fresh FSDP2 model, subspace and optimizer on ``world`` ranks, loaded from the DCP
    checkpoint the main run on ``saved_by`` ranks wrote, then two more steps."""
    model = shard(make_model())
    space = Subspace(model, MAX_RANK, torch.float32)
    distributed.load_subspace(root / f"dcp_w{saved_by}", space)
    opt = TWA(model, space, **HYPER)
    distributed.load_optimizer(root / f"dcp_w{saved_by}", opt)
    out = {"loaded": full_weights(model), "alpha": opt.alpha.clone(), "rank": space.rank}
    train(model, opt, make_batches()[:2], world, rank)
    out["continued"] = full_weights(model)
    return out


def dcp_from_2(world, rank, root):
    return _load_dcp(world, rank, root, 2)


def dcp_from_3(world, rank, root):
    return _load_dcp(world, rank, root, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    done = {}

    def get(world):
        if world not in done:
            done[world] = spawn(world, "test_fsdp:main_scenario", root, DEADLINE_S)
        return done[world]

    get.root = root
    return get


@pytest.fixture(scope="module")
def single():
    """The same samples and batches on one process (no FSDP), the whole batch per step."""
    samples, batches = make_samples(), make_batches()
    model = make_model()
    space = Subspace(model, MAX_RANK, torch.float32)
    for s in samples:
        space.add(s)
    opt = TWA(model, space, **HYPER)
    start = full_weights(model)
    train(model, opt, batches)
    weights = full_weights(model)
    space.write_average_(model)
    average = full_weights(model)
    return {"space": space, "start": start, "weights": weights, "alpha": opt.alpha, "average": average}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_twa_matches_one_process(runs, single, world):
    for r, out in enumerate(runs(world)):
        assert out["rank"] == single["space"].rank == N_SAMPLES
        torch.testing.assert_close(out["coords"], single["space"].sample_coordinates(), atol=1e-9, rtol=1e-6)
        assert rel_err(out["start"], single["start"]) <= REL, f"rank {r}: start weights"
        assert rel_err(out["weights"], single["weights"]) <= REL, f"rank {r}: weights after {STEPS} steps"
        assert rel_err(out["alpha"], single["alpha"]) <= REL, f"rank {r}: alpha"
        assert rel_err(out["average"], single["average"]) <= REL, f"rank {r}: mean of the samples"


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_its_shards_of_the_basis(runs, world):
    outs = runs(world)
    D = outs[0]["dim"]
    held = [o["local_numel"] for o in outs]
    assert sum(held) == D
    assert max(held) <= -(-D // world) + 2 * sum(HIDDEN) + OUT, held  # about D / world each


@pytest.mark.parametrize("world", [2, 3])
def test_add_communicates_o_of_k_numbers(runs, world):
    """Each collective of add() carries at most K + 2 fp64 numbers (the passes' dot products
    and norms; the finiteness flag), never values of the parameters."""
    for out in runs(world):
        sizes = [size for _, size in out["add_collectives"]]
        assert sizes and max(sizes) <= 8 * (MAX_RANK + 2), sizes


@pytest.mark.parametrize("world", [2, 3])
def test_the_step_communicates_k_floats(runs, world):
    """The only collective TWA issues in step(): one all-reduce of K fp32 values, and no value
    is read on the host (the main scenario runs step() with every host read raising)."""
    for out in runs(world):
        assert out["step_collectives"] == [("all_reduce", 4 * N_SAMPLES)]
        assert out["comm"] == {"gradients": 0, "coordinates": 4 * N_SAMPLES, "weights": 0}


@pytest.mark.parametrize("world", [2, 3])
def test_state_dicts_resume_bit_for_bit(runs, world):
    for r, out in enumerate(runs(world)):
        assert torch.equal(out["resumed"], out["weights"]), f"rank {r}: weights after loading"
        assert torch.equal(out["continued_resumed"], out["continued"]), f"rank {r}: two more steps"


# ---- mixed precision, and what is refused


def mixed_precision_scenario(world, rank, root):
    """The main run's samples and steps under MixedPrecisionPolicy(param_dtype=bf16): the basis
    describes the fp32 sharded parameters, the projection reads the fp32 reduced gradients."""
    samples, batches = make_samples(), make_batches()
    model = make_model()
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (model.a, model.b, model):
        fsdp.fully_shard(module, mp_policy=policy)
    space = Subspace(model, MAX_RANK, torch.float32)
    for s in samples:
        space.add(s)
    opt = TWA(model, space, **HYPER)
    train(model, opt, batches, world, rank)
    return {
        "dtypes": [p.dtype for p in model.parameters()],
        "layout_dtypes": space.layout.dtypes,
        "weights": full_weights(model),
        "steps": opt.steps,
    }


def int8_scenario(world, rank, root):
    """The main run with an int8 basis: block scales per 64 values of each rank's local values."""
    samples, batches = make_samples(), make_batches()
    model = shard(make_model())
    space = Subspace(model, MAX_RANK, torch.int8)
    for s in samples:
        space.add(s)
    opt = TWA(model, space, **HYPER)
    train(model, opt, batches, world, rank)
    state = space.state_dict()
    again = Subspace(shard(make_model()), MAX_RANK, torch.int8)
    again.load_state_dict(state)
    same = all(torch.equal(a, b) for a, b in zip(again.columns, space.columns, strict=True))
    return {"weights": full_weights(model), "scales": tuple(space.scales.shape), "round_trip": same}


def errors_scenario(world, rank, root):
    """What an FSDP2 subspace refuses, on every rank together."""
    out = {}

    def error(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    partly = make_model()
    fsdp.fully_shard(partly.a)  # b and c stay plain tensors
    out["mixed"] = error(lambda: Subspace(partly, MAX_RANK))
    model = shard(make_model())
    out["group"] = error(lambda: Subspace(model, MAX_RANK, process_group=dist.group.WORLD))
    space = Subspace(model, MAX_RANK, torch.float32)
    for s in make_samples()[:2]:
        space.add(s)
    out["average"] = error(lambda: TWA(model, space, lr=0.1, average_gradients=True))
    # Another rank's state dict: other shards of the same model.
    torch.save(space.state_dict(), root / f"errors_state_r{rank}.pt")
    dist.barrier()
    other = torch.load(root / f"errors_state_r{(rank + 1) % world}.pt", weights_only=True)
    out["other_rank"] = error(
        lambda: Subspace(shard(make_model()), MAX_RANK, torch.float32).load_state_dict(other)
    )
    # Two rows of weight and bias: on 3 ranks the last holds none of them.
    tiny = nn.Linear(4, 2)
    fsdp.fully_shard(tiny)
    out["empty"] = error(lambda: Subspace(tiny, MAX_RANK))
    return out


def test_mixed_precision_policy_trains_the_fp32_shards(tmp_path, single):
    outs = spawn(2, "test_fsdp:mixed_precision_scenario", tmp_path, DEADLINE_S)
    for out in outs:
        assert out["dtypes"] == [torch.float32] * 6 and out["layout_dtypes"] == (torch.float32,) * 6
        assert out["steps"] == STEPS
        # bf16 forward and backward: the move from the start differs from the fp32 run's by
        # bf16's rounding (measured 1.8e-3 relative), not by a wrong basis or a missed step.
        move, ref_move = out["weights"] - single["start"], single["weights"] - single["start"]
        assert rel_err(move, ref_move) <= 1e-2


def test_int8_basis_on_fsdp2_tracks_one_process(tmp_path, single):
    """int8 blocks start at each rank's first local value, so the shards round other blocks than
    one process does: TWA's move from the mean is as far from the fp32 basis's as one process's
    int8 move is (within 1.5x: measured 8.5e-3 and 9.0e-3; to each other 1.2e-2), and each
    rank's state dict round trips bit for bit."""
    samples, batches = make_samples(), make_batches()
    model = make_model()
    space = Subspace(model, MAX_RANK, torch.int8)
    for s in samples:
        space.add(s)
    train(model, TWA(model, space, **HYPER), batches)
    fp32_move = single["weights"] - single["start"]
    one_process = rel_err(full_weights(model) - single["start"], fp32_move)
    assert one_process > 0
    for out in spawn(2, "test_fsdp:int8_scenario", tmp_path, DEADLINE_S):
        assert out["round_trip"] and out["scales"][0] == MAX_RANK
        sharded = rel_err(out["weights"] - single["start"], fp32_move)
        assert sharded <= 1.5 * one_process, (sharded, one_process)


def test_fsdp_subspace_refuses_what_it_cannot_follow(tmp_path):
    outs = spawn(3, "test_fsdp:errors_scenario", tmp_path, DEADLINE_S)
    for r, out in enumerate(outs):
        assert "'b.weight' is a plain tensor among FSDP2 (DTensor) parameters" in out["mixed"]
        assert "pass no process_group" in out["group"]
        assert "has averaged the gradients already" in out["average"]
        assert "load sharded state dicts into a process group" in out["other_rank"]
        expected = "rank 2 holds none of the trainable values" if r == 2 else "failed on rank 2"
        assert expected in out["empty"]


@pytest.mark.parametrize(("saved_by", "world"), [(2, 3), (3, 2), (3, 3)])
def test_dcp_checkpoints_load_into_any_world_size(runs, saved_by, world):
    """Saved with torch.distributed.checkpoint on ``saved_by`` ranks, loaded on ``world``: the
    same weights, bit for bit (each value is w0 + P alpha of the same numbers), and two more
    steps as the saving run took them (to the all-reduce's summation order at another size)."""
    saved = runs(saved_by)[0]
    outs = spawn(world, f"test_fsdp:dcp_from_{saved_by}", runs.root, DEADLINE_S)
    for r, out in enumerate(outs):
        assert out["rank"] == N_SAMPLES
        assert torch.equal(out["alpha"], saved["alpha"]), f"rank {r}: alpha"
        assert torch.equal(out["loaded"], saved["weights"]), f"rank {r}: weights as saved"
        if world == saved_by:
            assert torch.equal(out["continued"], saved["continued"]), f"rank {r}: two more steps"
        else:
            assert rel_err(out["continued"], saved["continued"]) <= REL, f"rank {r}: two more steps"


def test_dcp_checkpoints_refuse_another_model(runs, tmp_path):
    runs(2)
    outs = spawn(2, "test_fsdp:dcp_other_model", runs.root, DEADLINE_S)
    for out in outs:
        assert "checkpoint is from a different model" in out


def dcp_other_model(world, rank, root):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 9), nn.Linear(9, OUT))
    fsdp.fully_shard(model)
    space = Subspace(model, MAX_RANK, torch.float32)
    try:
        distributed.load_subspace(root / "dcp_w2", space)
    except ValueError as e:
        return str(e)
    return None


def test_dcp_checkpoints_are_for_fsdp2_subspaces(tmp_path):
    space = Subspace(make_model(), MAX_RANK)
    space.add()
    with pytest.raises(ValueError, match="DCP checkpoints are for a subspace on an FSDP2 model"):
        distributed.save_checkpoint(tmp_path / "dcp", space)


def triton_scenario(world, rank, root):
    """The main run's samples and steps with the Triton kernels (its interpreter on CPU): the
    fused gradient projection reads the local shards' grads and ``write_params_`` writes the
    local shards in place."""
    samples, batches = make_samples(), make_batches()
    model = shard(make_model())
    space = Subspace(model, MAX_RANK, torch.float32)
    for s in samples:
        space.add(s)
    opt = TWA(model, space, **HYPER, backend="triton")
    with _NoHostReads():
        train(model, opt, batches, world, rank)
    return {"weights": full_weights(model), "alpha": opt.alpha.clone(), "steps": opt.steps}


@pytest.mark.skipif(not _backend.triton_interpreted(), reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_fsdp_twa_with_the_triton_kernels_matches_one_process(tmp_path, single):
    for r, out in enumerate(spawn(2, "test_fsdp:triton_scenario", tmp_path, DEADLINE_S)):
        assert out["steps"] == STEPS
        assert rel_err(out["weights"], single["weights"]) <= REL, f"rank {r}: weights after {STEPS} steps"
        assert rel_err(out["alpha"], single["alpha"]) <= REL, f"rank {r}: alpha"


def cuda_scenario(world, rank, root):
    """The main run's samples and steps on CUDA (one GPU per rank, NCCL), with the GPU kernels
    "auto" picks: the fused step's gradient projection on the local shards."""
    from twa_kernels import _ops

    device = torch.device("cuda", rank)
    samples, batches = make_samples(), make_batches()
    model = shard(make_model().to(device))
    space = Subspace(model, MAX_RANK, torch.float32)
    for s in samples:
        space.add([t.to(device) for t in s])
    opt = TWA(model, space, **HYPER)
    train(model, opt, [(x.to(device), y.to(device)) for x, y in batches], world, rank)
    return {
        "weights": full_weights(model).cpu(),
        "backend": _ops.choose("step_", "auto", space.basis),
        "steps": opt.steps,
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL on CUDA devices")
def test_fsdp_twa_on_cuda_with_nccl_matches_one_process(tmp_path, single):
    world = torch.cuda.device_count()
    outs = spawn(world, "test_fsdp:cuda_scenario", tmp_path, 300, backend="nccl")
    for r, out in enumerate(outs):
        assert out["backend"] in ("triton", "cuda") and out["steps"] == STEPS
        assert rel_err(out["weights"], single["weights"]) <= REL, f"rank {r}: weights after {STEPS} steps"
