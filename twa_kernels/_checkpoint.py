"""torch.distributed.checkpoint (DCP) for a subspace on an FSDP2 model and its TWA optimizer.

The per-rank ``state_dict()`` of a sharded subspace loads only into the same rank of a group of
the same size. A DCP checkpoint instead stores the values that scale with D as DTensors placed
like the parameters (per parameter: the anchor and the mean as ``[*shape]`` sharded along dim 0,
the basis as ``[rank, *shape]`` sharded along dim 1, an optimizer's own origin like the anchor),
so DCP can load them into any number of ranks; everything else (sample coordinates, row scales,
coordinates, momentum, counters, hyperparameters) is small, replicated, and stored as one blob.

Loading reads the blob first (it says how many basis rows to read), then the DTensors into fresh
local tensors, assembles the per-rank ``state_dict()`` of this rank and hands it to the
subspace's (or optimizer's) own ``load_state_dict``: the same checks, all-or-nothing, and the
same bits as a per-rank round trip. Every function here is a collective of the subspace's group.
"""

from __future__ import annotations

import io
import math

import torch
from torch import Tensor

_SUBSPACE = "twa_subspace"
_OPTIMIZER = "twa_optimizer"
_LOCAL = ("basis", "anchor", "mean")  # the subspace's entries sharded like the parameters


def _blob(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unblob(buf: io.BytesIO):
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _check_fsdp(subspace) -> None:
    if not subspace.fsdp:
        raise ValueError(
            "DCP checkpoints are for a subspace on an FSDP2 model; save state_dict() (one file per "
            "rank with a process_group) otherwise"
        )
    if subspace.dtype == torch.int8:
        raise ValueError(
            "an int8 basis keeps one scale per 64 values of each rank's own shards, which another "
            "sharding cannot reuse: save state_dict() on every rank and load it at the same world size"
        )


def _keys(subspace) -> list[str]:
    names = subspace.layout.names
    return list(names) if names is not None else [str(i) for i in range(len(subspace.layout.shapes))]


def _dtensors(subspace, local: Tensor) -> dict[str, Tensor]:
    """Per parameter, a DTensor over ``local`` ([n] values held here, or [rows, n] basis rows):
    ``[*shape]`` sharded along dim 0, or ``[rows, *shape]`` sharded along dim 1."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = subspace._params[0].device_mesh
    rows = () if local.dim() == 1 else (local.shape[0],)
    out, at = {}, 0
    for key, (_, a, b), p in zip(_keys(subspace), subspace.pieces, subspace._params, strict=True):
        piece = local[..., at : at + b - a].reshape(*rows, *p.to_local().shape)
        shape = torch.Size((*rows, *p.shape))
        stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
        out[key] = DTensor.from_local(
            piece, mesh, [Shard(len(rows))], run_check=False, shape=shape, stride=stride
        )
        at += b - a
    return out


def _assemble(subspace, loaded: dict[str, Tensor], rows: int | None) -> Tensor:
    """The values held here ([n], or [rows, n]) from per-parameter DTensors loaded by DCP."""
    lead = () if rows is None else (rows,)
    pieces = [loaded[k].to_local().reshape(*lead, -1) for k in _keys(subspace)]
    return torch.cat(pieces, dim=-1)


def _empty_dtensors(subspace, rows: int | None) -> dict[str, Tensor]:
    lead = () if rows is None else (rows,)
    local = torch.zeros(*lead, subspace.local_numel, dtype=torch.float32, device=subspace.device)
    if rows is not None:
        local = local.to(subspace.dtype)
    return _dtensors(subspace, local)


def save_checkpoint(path, subspace, optimizer=None) -> None:
    import torch.distributed.checkpoint as dcp

    _check_fsdp(subspace)
    state = subspace.state_dict()
    small = {k: v for k, v in state.items() if k not in _LOCAL}
    checkpoint = {_SUBSPACE: {"replicated": _blob(small)}}
    for name in _LOCAL:
        checkpoint[_SUBSPACE][name] = _dtensors(subspace, state[name])
    if optimizer is not None:
        if optimizer.subspace is not subspace:
            raise ValueError("optimizer is not built on this subspace")
        opt = optimizer.state_dict()
        twa = dict(opt["twa"])
        w0 = twa.pop("w0")
        checkpoint[_OPTIMIZER] = {"replicated": _blob({**opt, "twa": twa})}
        if w0 is not None:
            checkpoint[_OPTIMIZER]["w0"] = _dtensors(subspace, w0)
    dcp.save(checkpoint, checkpoint_id=path, process_group=subspace.process_group)


def _load_blob(path, group, section: str):
    import torch.distributed.checkpoint as dcp

    state = {section: {"replicated": io.BytesIO()}}
    dcp.load(state, checkpoint_id=path, process_group=group)
    return _unblob(state[section]["replicated"])


def load_subspace(path, subspace) -> None:
    import torch.distributed.checkpoint as dcp

    _check_fsdp(subspace)
    small = _load_blob(path, subspace.process_group, _SUBSPACE)
    rank = int(small["rank"])
    if not isinstance(small.get("layout"), dict):
        raise ValueError(f"{path}: not a twa_kernels subspace checkpoint")
    subspace.layout.check_signature(small["layout"], "checkpoint")
    if small["dtype"] != str(subspace.dtype).removeprefix("torch."):
        raise ValueError(f"checkpoint stores a {small['dtype']} basis, this subspace {subspace.dtype}")
    if rank > subspace.max_rank:
        raise ValueError(f"checkpoint has rank {rank} > this subspace's max_rank {subspace.max_rank}")
    local = {name: _empty_dtensors(subspace, rank if name == "basis" else None) for name in _LOCAL}
    dcp.load({_SUBSPACE: local}, checkpoint_id=path, process_group=subspace.process_group)
    state = dict(small)
    for name in _LOCAL:
        state[name] = _assemble(subspace, local[name], rank if name == "basis" else None)
    state["shard"], state["world_size"] = subspace.sharding
    subspace.load_state_dict(state)


def load_optimizer(path, optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    subspace = optimizer.subspace
    _check_fsdp(subspace)
    opt = _load_blob(path, subspace.process_group, _OPTIMIZER)
    twa = dict(opt["twa"])
    twa["w0"] = None
    if twa.get("start") == "current":
        w0 = {"w0": _empty_dtensors(subspace, None)}
        dcp.load({_OPTIMIZER: w0}, checkpoint_id=path, process_group=subspace.process_group)
        twa["w0"] = _assemble(subspace, w0["w0"], None)
    twa["shard"], twa["world_size"] = subspace.sharding
    optimizer.load_state_dict({**opt, "twa": twa})
