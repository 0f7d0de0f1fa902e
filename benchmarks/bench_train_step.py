"""A whole training step (forward, backward, optimizer step) with each optimizer.

Model: ResNet-50 (torchvision), batch 256 at 224x224 under bf16 autocast, K = 32 and 101, on a
GPU with torchvision; a small built-in transformer language model otherwise (K = 8 and 32).
Providers: ``sgd-fused`` (``torch.optim.SGD(..., fused=True)``, the reference time),
``triton``, ``cuda``, ``torch`` (``twa_kernels.TWA`` over an fp16 basis with that backend) and
``published`` (the published TWA code's step, fp32 basis). The report turns the times into the
overhead of each over the ``sgd-fused`` step of the same K: milliseconds and % of that step.

A training step has no byte floor: ``pct_copy_bw`` and ``x_floor`` are None; the TWA and
published steps record ``step_floor_bytes``, the floor of the TWA step alone (``shapes``).
On the GPU each case runs at least ``GPU_MIN_ROUNDS`` steps: the overhead at K = 32 (about a
millisecond) is about 1 % of a ResNet-50 step, so a median of 3 would not resolve it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from .harness import record, run, skip_unless_backend, skip_unless_fits
from .shapes import Shape, bench_device, fill_basis_, free_inputs, step_bytes
from .steps import LR, MOMENTUM, WEIGHT_DECAY, PublishedStep, make_twa

# The reference and the two kernel backends first: a run cut at its time limit keeps those.
PROVIDERS = ("sgd-fused", "triton", "cuda", "published", "torch")
GPU_MIN_ROUNDS = 10


class TinyLM(nn.Module):
    """A pre-norm transformer language model, small enough for a CPU smoke run."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], tokens.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def _workload(device: torch.device):
    """(name, build_model, make_batch, loss_fn, autocast dtype or None, K values)."""
    gpu = device.type == "cuda"
    if gpu and importlib.util.find_spec("torchvision") is not None:
        import torchvision

        def build():
            return torchvision.models.resnet50().to(device, memory_format=torch.channels_last)

        def batch():
            x = torch.randn(256, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
            return x, torch.randint(0, 1000, (256,), device=device)

        return "resnet50-b256", build, batch, nn.functional.cross_entropy, torch.bfloat16, (32, 101)

    if gpu:
        vocab, width, layers, heads, seq, bsz = 8192, 768, 6, 12, 512, 16
    elif os.environ.get("TWA_BENCH_SHAPES") == "smoke":
        vocab, width, layers, heads, seq, bsz = 256, 64, 1, 2, 32, 4
    else:
        vocab, width, layers, heads, seq, bsz = 512, 128, 2, 4, 64, 8

    def build():
        return TinyLM(vocab, width, layers, heads, seq).to(device)

    def batch():
        tokens = torch.randint(0, vocab, (bsz, seq + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(logits, target):
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    name = f"lm-w{width}-l{layers}-b{bsz}x{seq}"
    return name, build, batch, loss, (torch.bfloat16 if gpu else None), ((101, 301) if gpu else (8, 32))


MODEL, BUILD, BATCH, LOSS, AUTOCAST, KS = _workload(bench_device())
CASES = [pytest.param(k, p, id=f"{MODEL}-K{k}-{p}") for k in KS for p in PROVIDERS]


@pytest.mark.parametrize("K, provider", CASES)
def test_train_step(benchmark, device, copy_bw, K: int, provider: str):
    if provider not in ("sgd-fused", "published"):
        skip_unless_backend("twa_step", provider, device)
    free_inputs()
    torch.manual_seed(0)
    model = BUILD()
    params = [p for p in model.parameters() if p.requires_grad]
    D = sum(p.numel() for p in params)
    basis = {"sgd-fused": None, "published": torch.float32}.get(provider, torch.float16)
    basis_bytes = (4 if provider == "published" else 2) * K * D if basis is not None else 0
    skip_unless_fits(basis_bytes + 32 * D, device, f"{provider} with K={K} on {MODEL}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y = BATCH()

    if provider == "sgd-fused":
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
        step, zero = opt.step, opt.zero_grad
    elif provider == "published":
        P = torch.empty(K, D, device=device)
        scales = torch.empty(K, device=device)
        fill_basis_(P, scales)
        P.mul_(scales[:, None])
        step = PublishedStep(params, P)
        zero = model.zero_grad
    else:
        w0 = torch.cat([p.detach().reshape(-1) for p in params]).float()
        opt = make_twa(model, K, torch.float16, provider, w0)
        step, zero = opt.step, opt.zero_grad

    def train_step():
        zero()
        with torch.autocast(device.type, dtype=AUTOCAST, enabled=AUTOCAST is not None):
            loss = LOSS(model(x), y)
        loss.backward()
        step()

    benchmark.group = f"train {MODEL}-K{K}"
    run(benchmark, train_step, device, min_rounds=GPU_MIN_ROUNDS if device.type == "cuda" else 3)
    shape = Shape(MODEL, D, K)
    extra = {"autocast": str(AUTOCAST)}
    if basis is not None:
        extra["step_floor_bytes"] = step_bytes(shape, torch.float16)
    record(benchmark, op="train-step", provider=provider, shape=shape, basis=basis, copy_bw=copy_bw,
           nbytes=None, **extra)  # fmt: skip
    assert all(bool(torch.isfinite(p).all()) for p in params)
