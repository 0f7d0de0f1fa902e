"""Triton kernels for the twa:: ops (backend "triton").

Each function has the arguments and semantics of the same function in ``twa_kernels.reference``
(the ``_ops`` checks run before these are called). They run on CUDA tensors, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import.
"""

from .blocks import block_step_, step_blocks_
from .orthogonalize import orthogonalize_
from .project import project
from .reconstruct import reconstruct_
from .step import project_grads, step_, write_params_
from .subspace_step import subspace_step_

__all__ = [
    "block_step_", "orthogonalize_", "project", "project_grads", "reconstruct_", "step_", "step_blocks_",
    "subspace_step_", "write_params_",
]  # fmt: skip
