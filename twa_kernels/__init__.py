"""twa_kernels: fused kernels and a drop-in optimizer for Trainable Weight Averaging (TWA)."""

from . import ops
from ._backend import BACKENDS

__version__ = "0.1.0"
__all__ = ["BACKENDS", "ops"]
