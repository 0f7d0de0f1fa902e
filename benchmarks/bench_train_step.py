"""A whole training step (forward, backward, optimizer step) with each optimizer.

Model: ResNet-50 (torchvision), batch 256 at 224x224 under bf16 autocast, on a GPU with
torchvision; a small built-in transformer language model otherwise. Providers: ``sgd`` (plain
``torch.optim.SGD``, the reference time), ``published`` (the published TWA code's step, fp32
basis) and ``torch``, ``triton``, ``cuda`` (``twa_kernels.TWA`` over an fp16 basis). The report
turns the times into the overhead of each over the ``sgd`` step of the same group.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from .harness import BACKEND_PROVIDERS, machine_summary, run, skip_unless_backend, skip_unless_fits
from .shapes import bench_device, fill_basis_, free_inputs
from .steps import LR, MOMENTUM, WEIGHT_DECAY, PublishedStep, make_twa

PROVIDERS = ("sgd", "published", *BACKEND_PROVIDERS)


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

        return "resnet50-b256", build, batch, nn.functional.cross_entropy, torch.bfloat16, (101, 301)

    vocab, width, layers, heads, seq, bsz = (8192, 768, 6, 12, 512, 16) if gpu else (512, 128, 2, 4, 64, 8)

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
    if provider not in ("sgd", "published"):
        skip_unless_backend("twa_step", provider, device)
    free_inputs()
    torch.manual_seed(0)
    model = BUILD()
    params = [p for p in model.parameters() if p.requires_grad]
    D = sum(p.numel() for p in params)
    basis_bytes = (4 if provider == "published" else 2) * K * D if provider != "sgd" else 0
    skip_unless_fits(basis_bytes + 32 * D, device, f"{provider} with K={K} on {MODEL}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y = BATCH()

    if provider == "sgd":
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
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
    run(benchmark, train_step, device)
    info = benchmark.extra_info
    info.update(op="train-step", provider=provider, model=MODEL, D=D, K=K, B=1)
    info.update(copy_gbps=round(copy_bw / 1e9, 2), autocast=str(AUTOCAST), **machine_summary())
    assert all(bool(torch.isfinite(p).all()) for p in params)
