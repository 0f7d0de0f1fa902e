"""Run under torchrun: sharded TWA must match single-process TWA on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_twa.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node=1 tests/torchrun_twa.py OUT_DIR nccl

The optional last argument is the backend: gloo (CPU tensors, the default) or nccl (each rank
on cuda:LOCAL_RANK). Each rank writes OUT_DIR/rank<r>.txt with "ok <relative error>" or the
error it raised.
"""

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from test_distributed import (
    HYPER,
    MAX_RANK,
    flat,
    make_batches,
    make_model,
    make_samples,
    rel_err,
    train,
)

from twa_kernels import TWA, Subspace


def twa_run(group, world, rank, device, backend="auto"):
    model = make_model().to(device)
    space = Subspace(model, MAX_RANK, process_group=group, backend=backend)
    for s in make_samples():
        space.add([t.to(device) for t in s])
    opt = TWA(model, space, **HYPER, backend=backend)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches()]
    train(model, opt, batches, world, rank)
    return flat(model).cpu()


def main(out: Path, backend: str) -> None:
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)  # torchrun's env:// rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    # On GPUs each kernel backend runs the sharded add() and step() (one GPU: a group of one,
    # through the same hooks and collectives).
    kernels = ["auto"] if backend == "gloo" else ["triton", "cuda"]
    try:
        errs = {}
        for k in kernels:
            sharded = twa_run(dist.group.WORLD, world, rank, device, k)
            errs[k] = rel_err(sharded, twa_run(None, 1, 0, device, k))
        worst = max(errs.values())
        status = ("ok " if worst <= 1e-6 else "mismatch ") + " ".join(f"{k} {e:.3e}" for k, e in errs.items())
    except Exception:
        status = "error " + traceback.format_exc()
    (out / f"rank{rank}.txt").write_text(status)
    dist.destroy_process_group()
    # As in test_distributed's workers: gloo's threads can end a normal teardown in
    # std::terminate, which torchrun would report as a failed rank.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "gloo")
