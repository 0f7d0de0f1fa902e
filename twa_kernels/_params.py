"""The parameters a subspace describes: their layout, the flat vector they form, its shards.

- ``ParamLayout``: order, shapes, dtypes, names and flat offsets; views of a flat [D] tensor.
- ``trainable``: the ``requires_grad`` tensors (and names) of a module, ``named_parameters()``
  or a list of tensors.
- names as checkpoints write them (``unwrapped_name``: without ``module.`` / ``_orig_mod.``).
- shards: ``shard_pieces`` / ``flatten_shard`` cut the flat vector's range ``[start, stop)`` out
  of the parameters without building the whole vector.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Order, shapes, dtypes and flat offsets of the parameters a subspace describes."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, params: Sequence[Tensor], names: Sequence[str] | None = None) -> ParamLayout:
        """The layout of ``params`` (in this order)."""
        shapes = tuple(tuple(p.shape) for p in params)
        return cls(shapes, tuple(p.dtype for p in params), None if names is None else tuple(names))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def signature(self) -> dict:
        """A plain description for state dicts (loadable with ``weights_only=True``)."""
        return {
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
        }

    def check_params(self, params: Sequence[Tensor], device: torch.device, what: str) -> None:
        """Raise ``ValueError`` naming the first parameter that does not fit this layout."""
        if len(params) != len(self.shapes):
            raise ValueError(
                f"{what} has {len(params)} tensors, the subspace was built for {len(self.shapes)}"
            )
        for i, (p, shape, dtype) in enumerate(zip(params, self.shapes, self.dtypes, strict=True)):
            if tuple(p.shape) != shape:
                raise ValueError(f"{what}[{i}] has shape {tuple(p.shape)}, expected {shape}")
            if p.dtype != dtype:
                raise ValueError(f"{what}[{i}] has dtype {p.dtype}, expected {dtype}")
            if p.device != device:
                raise ValueError(f"{what}[{i}] is on {p.device}, the subspace is on {device}")

    def check_signature(self, signature: Mapping, what: str) -> None:
        """Raise ``ValueError`` naming the first parameter where ``signature`` differs."""
        mine = self.signature()
        if signature == mine:
            return
        if len(signature["shapes"]) != len(mine["shapes"]):
            raise ValueError(
                f"{what} is from a different model: {len(signature['shapes'])} parameters, "
                f"this one has {len(mine['shapes'])}"
            )
        for i, (s, d, s2, d2) in enumerate(
            zip(
                signature["shapes"],
                signature["dtypes"],
                mine["shapes"],
                mine["dtypes"],
                strict=True,
            )
        ):
            if (s, d) != (s2, d2):
                raise ValueError(
                    f"{what} is from a different model: parameter {i} is {d} {s}, here {d2} {s2}"
                )

    def describe(self, i: int) -> str:
        """How errors name parameter ``i``: its quoted name, or ``params[i]`` without names."""
        return repr(self.names[i]) if self.names is not None else f"params[{i}]"

    def parameter_at(self, flat_index: int) -> int:
        """The index of the parameter that holds flat value ``flat_index``."""
        return bisect.bisect_right(self.offsets, flat_index) - 1

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat [D] tensor, one per parameter, shaped like the parameters."""
        return [
            flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes, strict=True)
        ]


def trainable(params) -> tuple[list[Tensor], tuple[str, ...] | None]:
    """The ``requires_grad`` parameters (and their names, given a module or named pairs), in order."""
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        return [p for _, p in named], tuple(n for n, _ in named)
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or an nn.Module, got one Tensor")
    params = list(params)
    if params and isinstance(params[0], tuple):  # named_parameters()
        for i, item in enumerate(params):
            if not (
                isinstance(item, tuple)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], Tensor)
            ):
                raise TypeError(
                    f"params[{i}] is not a (name, Tensor) pair: pass model.named_parameters(), "
                    "model.parameters() or the module"
                )
        named = [(n, p) for n, p in params if p.requires_grad]
        return [p for _, p in named], tuple(n for n, _ in named)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a Tensor")
    return [p for p in params if p.requires_grad], None


# Prefixes that wrappers put before parameter names: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """``name`` without leading wrapper prefixes (``module._orig_mod.fc.weight`` -> ``fc.weight``)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def by_unwrapped_name(state: Mapping, path) -> dict:
    out = {}
    for k, v in state.items():
        name = unwrapped_name(k)
        if name in out:
            raise ValueError(f"{os.fspath(path)}: {k!r} and another entry both name {name!r}")
        out[name] = v
    return out


def coefficient_blocks(layout: ParamLayout, granularity) -> list[tuple[int, int]]:
    """The flat ranges ``[start, stop)`` of D that share one coefficient vector.

    ``"model"``: one block, all of D (the published TWA). ``"tensor"``: one block per
    parameter tensor. An int N >= 1: consecutive tensors grouped until a block holds at least N
    values (the published follow-up's ``--layer-size``), the last block possibly smaller.
    ``ValueError`` (or ``TypeError``) naming the value for anything else.
    """
    if granularity == "model" and isinstance(granularity, str):
        return [(0, layout.numel)]
    if granularity == "tensor" and isinstance(granularity, str):
        return [(o, o + n) for o, n in zip(layout.offsets, layout.numels, strict=True)]
    if isinstance(granularity, bool) or not isinstance(granularity, int):
        if isinstance(granularity, str):
            raise ValueError(f"granularity must be 'model', 'tensor' or an int >= 1, got {granularity!r}")
        raise TypeError(f"granularity must be 'model', 'tensor' or an int >= 1, got {granularity!r}")
    if granularity < 1:
        raise ValueError(f"granularity (values per block) must be >= 1, got {granularity}")
    blocks, start, stop = [], 0, 0
    for o, n in zip(layout.offsets, layout.numels, strict=True):
        stop = o + n
        if stop - start >= granularity:
            blocks.append((start, stop))
            start = stop
    if start < stop:
        blocks.append((start, stop))
    return blocks


def segment_ranges(sizes: Sequence[int], segments: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """Each coefficient row's range ``[start, stop)`` of the concatenated items (``sizes[i]`` each:
    values, or blocks of the parameter table), item i in row ``segments[i]`` (non-decreasing, so
    each row is one run of items); ``(0, 0)`` for a row with none."""
    ranges = [(0, 0)] * rows
    at = 0
    for i, (n, seg) in enumerate(zip(sizes, segments, strict=True)):
        start = at if i == 0 or seg != segments[i - 1] else ranges[seg][0]
        at += n
        ranges[seg] = (start, at)
    return ranges


def block_segments(layout: ParamLayout, blocks: list[tuple[int, int]]) -> list[int]:
    """Each parameter's block (its coefficient row) among ``blocks`` (``coefficient_blocks``):
    non-decreasing, as the fused per-block kernels take it. A parameter without values belongs
    to the block its offset starts (the last block at the end of D)."""
    segments, l = [], 0
    for o in layout.offsets:
        while l + 1 < len(blocks) and o >= blocks[l][1]:
            l += 1
        segments.append(l)
    return segments


def shard_pieces(layout: ParamLayout, start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(parameter index, begin, end)`` of the flattened parameters' values in ``[start, stop)``.

    Concatenated in order, the pieces are exactly the shard.
    """
    pieces = []
    for i, (offset, n) in enumerate(zip(layout.offsets, layout.numels, strict=True)):
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append((i, a - offset, b - offset))
    return pieces


def piece_views(buffer: Tensor, pieces: list[tuple[int, int, int]]) -> list[Tensor]:
    views, at = [], 0
    for _, a, b in pieces:
        views.append(buffer[at : at + b - a])
        at += b - a
    return views


def flatten_pieces(
    tensors: Sequence[Tensor], pieces: list[tuple[int, int, int]], device: torch.device
) -> Tensor:
    """The values ``pieces`` of the flattened ``tensors``, concatenated as a new fp32 tensor.

    A ``DTensor`` gives its local values (an FSDP2 parameter, or a sample saved from one), which
    must be exactly its piece; a plain tensor is the whole parameter, cut to its piece."""
    out = torch.empty(sum(b - a for _, a, b in pieces), dtype=torch.float32, device=device)
    sources = []
    for i, a, b in pieces:
        t = tensors[i]
        if is_dtensor(t):
            t = t.to_local().reshape(-1)
            if t.numel() != b - a:
                raise ValueError(
                    f"values[{i}] is a DTensor with {t.numel()} local values, this process holds "
                    f"{b - a} of that parameter: it is sharded differently from the model"
                )
            sources.append(t)
        else:
            sources.append(t.reshape(-1)[a:b])
    torch._foreach_copy_(piece_views(out, pieces), sources)
    return out


# ---- FSDP2 (DTensor parameters sharded along dim 0) -------------------------------------------


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support has no DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The values this process holds of ``t``: a DTensor's local shard (a view of the storage
    FSDP2 gathers from), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def dtensor_pieces(params: Sequence[Tensor], layout: ParamLayout):
    """``(pieces, process group)`` of DTensor parameters sharded along dim 0 on one 1-D mesh
    (what ``fully_shard`` makes): each parameter's local rows are one contiguous run of its
    flattened values, ``(index, begin, end)``. ``ValueError`` for other placements or meshes."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = params[0].device_mesh
    pieces = []
    for i, (p, n) in enumerate(zip(params, layout.numels, strict=True)):
        where = layout.describe(i)
        if p.device_mesh != mesh:
            raise ValueError(f"{where} is on another device mesh than {layout.describe(0)}: one mesh for all")
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{where} is a DTensor placed {tuple(p.placements)} on a {mesh.ndim}-D mesh; the basis "
                "follows FSDP2's sharding along dim 0 of a 1-D mesh (fully_shard) only"
            )
        shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        if tuple(shape) != tuple(p.to_local().shape):
            raise ValueError(f"{where}: local shard of shape {tuple(p.to_local().shape)}, expected {shape}")
        a = offset[0] * (n // p.shape[0] if p.shape[0] else 0)
        pieces.append((i, a, a + math.prod(shape)))
    return pieces, mesh.get_group()


def copy_or_zero_(views: Sequence[Tensor], sources: Sequence[Tensor | None]) -> None:
    """``views[i] <- sources[i]``, or zeros where it is None (a gradient that was not computed)."""
    pairs = [(v, s) for v, s in zip(views, sources, strict=True) if s is not None]
    missing = [v for v, s in zip(views, sources, strict=True) if s is None]
    if pairs:
        torch._foreach_copy_([v for v, _ in pairs], [s for _, s in pairs])
    if missing:
        torch._foreach_zero_(missing)
