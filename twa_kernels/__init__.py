"""twa_kernels: fused kernels and a drop-in optimizer for Trainable Weight Averaging (TWA).

- ``Subspace(params, max_rank, dtype=torch.float16)``: collects weight samples during training
  into a scaled low-precision orthonormal basis (``add()`` after each epoch).
- ``TWA(params, subspace, lr, momentum, dampening, weight_decay, nesterov, start="mean")``:
  SGD on the coordinates of the weights in that subspace, as a ``torch.optim.Optimizer``.
- ``twa_kernels.ops``: the operations (project, reconstruct_, orthogonalize_, subspace_step_)
  with ``backend="auto" | "torch" | "triton" | "cuda"``.

Importing needs neither a GPU, nor a C++ compiler, nor triton.
"""

from . import ops
from ._backend import BACKENDS
from .optim import TWA, TWAAdamW
from .subspace import Subspace

__version__ = "0.1.0"
__all__ = ["BACKENDS", "TWA", "TWAAdamW", "Subspace", "ops", "update_bn"]


def __getattr__(name):
    # update_bn lives in integrations/, imported on first use so that importing the package stays light.
    if name == "update_bn":
        from .integrations.bn import update_bn

        return update_bn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
