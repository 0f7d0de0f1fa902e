r"""A subspace sharded along D across ``torch.distributed`` ranks, and the TWA step over it.

Pass ``process_group`` to ``Subspace`` and every rank of the group holds one contiguous range of
the D trainable values (ZeRO-style): rank r owns columns ``[r S, min((r + 1) S, D))`` with
``S = ceil(D / world)``, i.e. ``basis[:, shard]`` (about ``2 K D / world`` bytes in fp16), the
matching slices of the anchor and of the mean, and an fp32 buffer of S values for the step. The
small state (scales, the sample coordinates, the K coordinates and their momentum) is identical
on every rank. The parameters themselves stay replicated, as DDP keeps them.

``Subspace.add()`` orthogonalises shard by shard with the subspace's backend (CGS2, the passes of
``reference.orthogonalize_`` with fp64 dot products); only O(K) numbers cross the network per
pass:

1. each rank: ``c1_r = P_r^T v_r`` and ``||v_r||^2``; all-reduce (sum) of K + 1 values;
2. each rank: ``v1_r = v_r - P_r c1``, ``c2_r = P_r^T v1_r``, ``||v1_r||^2``; all-reduce (sum) of
   K + 1 values, and ``max |v1_r|``; all-reduce (max) of 1 value (it sets the column's scale);
3. each rank writes its slice of the new column, scaled like the others; nothing is sent.

``TWA.step()`` on such a subspace:

1. gradients averaged over the ranks: a reduce-scatter of the flat fp32 gradient (D values)
   leaves each rank the mean of its shard; under DDP, which has averaged them already, each rank
   just reads its shard;
2. ``c_r = P_r^T g_r``, then an all-reduce (sum) of K fp32 values gives ``c = P^T g`` everywhere;
3. the K-dimensional SGD step runs identically on every rank (same inputs, same bits);
4. each rank writes ``w_r = w0_r + P_r alpha``; an all-gather of the weights (D values) brings
   the replicated parameters up to date.

With ring collectives a reduce-scatter or an all-gather of N bytes sends ``(world - 1) / world * N``
per rank and an all-reduce twice that, so steps 1 and 4 cost one DDP gradient all-reduce and the
subspace itself adds K floats. The published DDP scheme keeps whole basis rows per rank and adds
a second all-reduce of D floats per step on top of DDP's: 4 x 25.6M = 102 MB at ResNet-50 size,
where this one all-reduces 4 K = 256 bytes for K = 64.

Example (``torchrun --nproc-per-node=N train.py``; one process per GPU, replicated model)::

    dist.init_process_group("nccl")         # "gloo" for CPU tensors
    space = Subspace(model, max_rank=64, process_group=dist.group.WORLD)
    for epoch in range(E):
        train_one_epoch(ddp_model)          # any optimizer
        space.add()                         # every rank, same weights: each keeps its shard
    opt = TWA(model, space, lr=0.3, momentum=0.9)   # plain model: TWA averages the gradients
    for x, y in local_loader:               # each rank its share of the global batch
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

FSDP2 models (``torch.distributed.fsdp.fully_shard``, DTensor parameters sharded along dim 0)
need no ``process_group``: ``Subspace(model, max_rank)`` gives each rank a basis over its local
parameter shards (their concatenation, in parameter order), and the orthogonalisation above runs
over the mesh's group on those pieces. ``TWA.step()`` then adds one collective to FSDP2's own:

1. FSDP2's backward has left each rank the averaged gradient of its shards: ``c_r = P_r^T g_r``
   from the local gradients in place (``twa::project_grads``), all-reduce (sum) of K fp32 values;
2. the K-dimensional step, identical on every rank;
3. each rank writes ``w_r = w0_r + P_r alpha`` into its local shards; FSDP2's all-gather in the
   next forward distributes them. Nothing else is sent (``_steps.FSDPStep``).

Which to use: a model that fits on one card trains under DDP, and ``process_group`` adds K
floats to DDP's all-reduce (plus, without DDP, a reduce-scatter and an all-gather of D floats
that replace it); a model sharded with FSDP2 keeps its sharding and TWA adds K floats per step.

Construction, ``add()``, ``load_state_dict()``, ``write_average_()`` and ``TWA.step()`` are then
collectives: all ranks of the group call them, in the same order. Layout mismatches are detected
by an all-gather of a small fingerprint, so ranks that disagree raise ``ValueError`` together
instead of waiting for each other.

Where the pieces live: this module holds the sharded Gram-Schmidt (``orthogonalize_``);
``_collectives`` the collectives and the agreement checks; ``_params`` the shards of the
flattened parameters (and ``dtensor_pieces``, the local shards of FSDP2 parameters);
``_steps.ShardedStep`` and ``_steps.FSDPStep`` the optimizer's step.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from . import _checkpoint, _collectives, _ops


def orthogonalize_(
    basis: Tensor, scales: Tensor, sample: Tensor, rank: int, group, backend: str = "auto"
) -> Tensor:
    """CGS2 of a sample sharded along D: ``twa::orthogonalize_`` with its sums all-reduced.

    ``basis`` [K, n] is this rank's columns of the basis, ``sample`` fp32 [n] its slice of the
    sample; ``scales`` fp32 [K] is the same on every rank. ``backend``'s kernels run the three
    passes over the local columns with fp64 accumulation (``reference.orthogonalize_`` states
    them); pass 1 all-reduces K + 1 values, pass 2 K + 1 values and a maximum. The stored slices
    share one scale per column, set from the global ``max |v1|`` and ``||u||``.

    Returns fp64 ``[c1 + c2 (rank values), ||u||, ||v||]`` (global, the same on every rank).
    """

    def reduce(tensor: Tensor, op: str) -> None:
        _collectives.all_reduce_(tensor, group, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    _ops.check_orthogonalize(basis, scales, sample, rank)
    return _ops.route("orthogonalize_", backend, basis, rank)(basis, scales, sample, rank, all_reduce=reduce)


# ---- checkpoints of FSDP2 subspaces (torch.distributed.checkpoint) -----------------------------


def save_checkpoint(path, subspace, optimizer=None) -> None:
    """Collective: save ``subspace`` (on an FSDP2 model) and optionally its ``TWA`` optimizer
    with ``torch.distributed.checkpoint`` into the directory ``path``.

    The basis, the anchor, the mean (and an optimizer's own origin) are stored per parameter as
    DTensors sharded like the parameters, so the checkpoint loads into any number of ranks
    (``load_subspace``, ``load_optimizer``); the small replicated state goes with them. A float
    basis only: an int8 basis's block scales belong to each rank's shards (save its per-rank
    ``state_dict()`` instead). Raises ``ValueError`` for a subspace that is not on an FSDP2 model.
    """
    _checkpoint.save_checkpoint(path, subspace, optimizer)


def load_subspace(path, subspace) -> None:
    """Collective: restore a ``save_checkpoint`` into ``subspace``, built (empty or not) on the same
    model sharded by FSDP2 over any number of ranks, through ``subspace.load_state_dict``: the
    same checks (a different model, dtype or too small ``max_rank`` raise ``ValueError`` on every
    rank), all or nothing. Build the optimizer afterwards and ``load_optimizer`` into it."""
    _checkpoint.load_subspace(path, subspace)


def load_optimizer(path, optimizer) -> None:
    """Collective: restore the ``TWA`` state saved by ``save_checkpoint`` into ``optimizer``, built
    on the subspace ``load_subspace`` restored (any world size), through its ``load_state_dict``:
    the weights are written from the loaded coordinates."""
    _checkpoint.load_optimizer(path, optimizer)
