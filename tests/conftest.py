"""Shared test setup: Triton's interpreter, the seed, the devices and the tolerance table."""

import os

# Triton kernels run on CPU tensors only when this is set before any kernel is defined, i.e.
# before twa_kernels is imported. On a machine with a GPU the kernels run natively instead.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# TWA_TEST_DEVICE=cuda (or cpu) restricts the device-parametrised tests to one device.
DEVICES = (
    [os.environ["TWA_TEST_DEVICE"]]
    if "TWA_TEST_DEVICE" in os.environ
    else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
)
FLOAT_STORAGE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Every basis storage: the float ones (one scale per row) and int8 (one scale per 64 values).
STORAGE_DTYPES = [*FLOAT_STORAGE_DTYPES, torch.int8]

# (atol, rtol) per dtype, for results compared with an fp64 oracle after scaling by the size of
# the quantity (see the tests). Half-precision rows: the unit roundoff (4.9e-4 fp16, 3.9e-3 bf16)
# enters once per stored value; fp32 accumulation over D values adds ~sqrt(D) * 6e-8.
TOL = {
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-4, 8e-3),
    torch.float32: (1e-6, 2e-5),
    torch.float64: (1e-12, 1e-10),
    # An int8 basis against the fp64 columns of its stored values (``oracle.columns``): the
    # values and their scales are exact in fp32, so only the fp32 accumulation is left.
    torch.int8: (1e-6, 2e-5),
}


# The op each test module exercises (an int8 case skips where that op has no int8 kernels).
MODULE_OPS = {
    "test_op_project": "project",
    "test_op_reconstruct": "reconstruct_",
    "test_op_orthogonalize": "orthogonalize_",
    "test_fused_step_op": "step_",
    "test_triton_step": "step_",
}


@pytest.fixture(autouse=True)
def skip_int8_without_kernels(request):
    """A test parametrised with an int8 basis and a backend that has no int8 kernels yet skips."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    target = params.get("target")
    backend = target[0] if isinstance(target, tuple) else params.get("backend")
    if params.get("dtype") is torch.int8 and isinstance(backend, str):
        from twa_kernels import _ops

        op = MODULE_OPS.get(request.module.__name__.rsplit(".", 1)[-1])
        ops = [op] if op else list(_ops.BLOCKWISE_BACKENDS)
        if any(backend not in _ops.BLOCKWISE_BACKENDS[o] for o in ops):
            pytest.skip(f"backend={backend!r} has no int8 kernels yet")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (``pytest.mark.usefixtures``): on a loaded
    2-core CPU the thread pool's wake-ups cost up to 100x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield 0


def only_config(kernel, config):
    """Context: the Triton autotuned ``kernel`` runs ``config`` and nothing else.

    The autotuner's choice is timing-dependent, so a test of the result checks one config at
    best; tests that must cover every candidate (each is its own code path: tile shapes,
    warps) pin them one at a time with this.
    """
    import contextlib

    @contextlib.contextmanager
    def pinned():
        saved = kernel.configs, kernel.cache
        kernel.configs, kernel.cache = [config], {}
        try:
            yield
        finally:
            kernel.configs, kernel.cache = saved

    return pinned()
