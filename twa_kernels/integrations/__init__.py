"""Integrations with other training code, each imported only when used.

- ``bn.update_bn(loader, model, *, forward=None, device=None)``: BatchNorm recalibration after
  averaging, for any batch type (also ``twa_kernels.update_bn``).
"""
