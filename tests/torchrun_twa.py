"""Run under torchrun (gloo): sharded TWA must match single-process TWA on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_twa.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.txt with "ok <relative error>" or the error it raised.
"""

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


def twa_run(group, world, rank):
    model = make_model()
    space = Subspace(model, MAX_RANK, process_group=group)
    for s in make_samples():
        space.add(s)
    opt = TWA(model, space, **HYPER)
    train(model, opt, make_batches(), world, rank)
    return flat(model)


def main(out: Path) -> None:
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        sharded = twa_run(dist.group.WORLD, world, rank)
        single = twa_run(None, 1, 0)
        err = rel_err(sharded, single)
        status = f"ok {err:.3e}" if err <= 1e-6 else f"mismatch {err:.3e}"
    except Exception:
        status = "error " + traceback.format_exc()
    (out / f"rank{rank}.txt").write_text(status)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(Path(sys.argv[1]))
