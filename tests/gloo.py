"""Run a function on N spawned processes (gloo on CPU, or NCCL with one GPU per rank), each
saving what it returns, with a deadline.

``spawn(world, "module:function", root)`` starts ``world`` processes that join one group by file
rendezvous under ``root``, call ``function(world, rank, root)`` from ``module`` (a test module,
imported by name in the child) and ``torch.save`` its result; a rank that raises writes its
traceback instead. Every spawn has a deadline, so a rank stuck in a collective fails the test
instead of hanging it.
"""

import datetime
import importlib
import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def _worker(rank, world, init_method, target, root, timeout_s, backend):
    root = Path(root)
    name = target.replace(":", "_")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        module, function = target.split(":")
        out = getattr(importlib.import_module(module), function)(world, rank, root)
        torch.save(out, root / f"{name}_w{world}_r{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (root / f"{name}_w{world}_r{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    # Skip the interpreter's teardown: gloo's threads sometimes end it in std::terminate after
    # everything above has finished, which would read as a failed rank.
    os._exit(0)


def spawn(world: int, target: str, root: Path, deadline_s: float = 60, backend: str = "gloo") -> list:
    """Run ``target`` ("module:function") on ``world`` processes; each rank's result, or a test
    failure with the tracebacks of the ranks that raised and the ranks still running."""
    ctx = multiprocessing.get_context("spawn")
    name = target.replace(":", "_")
    init = f"file://{root}/rendezvous_{name}_{world}"
    args = lambda r: (r, world, init, target, str(root), max(deadline_s - 10, 5), backend)  # noqa: E731
    procs = [ctx.Process(target=_worker, args=args(r), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    errors = [
        (root / f"{name}_w{world}_r{r}.err").read_text()
        for r in range(world)
        if (root / f"{name}_w{world}_r{r}.err").exists()
    ]
    if hung or errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"ranks {hung} still running after {deadline_s} s; errors:\n" + "\n".join(errors))
    return [torch.load(root / f"{name}_w{world}_r{r}.pt", weights_only=False) for r in range(world)]
