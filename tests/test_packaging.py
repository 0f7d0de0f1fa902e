"""The package imports and runs its reference path without triton, a GPU or a compiler."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = None          # 'import triton' now raises ImportError
import torch, twa_kernels
from twa_kernels import _backend
assert not _backend.triton_available()
p = torch.nn.Parameter(torch.randn(10))
space = twa_kernels.Subspace([p], max_rank=2)
space.add(); space.add([p.detach() + 1])
opt = twa_kernels.TWA([p], space, lr=0.1)
p.grad = torch.ones(10)
opt.step()
assert "triton" not in sys.modules or sys.modules["triton"] is None
assert "twa_kernels._cuda" not in sys.modules, "the CUDA extension must load lazily"
print("ok")
"""


def test_package_works_without_triton_and_loads_no_extension():
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
