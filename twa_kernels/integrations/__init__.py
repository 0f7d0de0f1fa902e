"""Integrations with other training code, each imported only when used.

- ``bn.update_bn(loader, model, *, forward=None, device=None)``: BatchNorm recalibration after
  averaging, for any batch type (also ``twa_kernels.update_bn``).
- ``lightning.TWACallback(max_rank, *, switch_epoch=None, optimizer=TWA, optimizer_kwargs=None,
  ...)``: a PyTorch Lightning callback that samples the weights, switches the trainer to TWA at
  an epoch, recalibrates BatchNorm, and keeps the subspace in every checkpoint (one file per
  rank beside it for a sharded subspace). Needs ``lightning`` (the ``frameworks`` extra).
- ``hf.TWASampler(subspace, *, every_n_epochs=1, every_n_steps=None, sample_from_epoch=0)``: a
  Hugging Face ``TrainerCallback`` that samples the weights and saves the subspace in every
  checkpoint folder (``load_subspace`` reads it back); TWA is the second ``Trainer``'s optimizer.
  Needs ``transformers`` and ``accelerate`` (the ``frameworks`` extra).

Importing ``twa_kernels`` or ``twa_kernels.integrations`` imports neither framework.
"""
