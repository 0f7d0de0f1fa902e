"""What builds the CUDA extension: its sources and compiler flags, in one place.

Read by the JIT loader (``twa_kernels._cuda``) and by ``setup.py`` (an eager build with
``TWA_KERNELS_BUILD_CUDA=1``), which loads this file on its own, without importing the package:
so it imports nothing.
"""

SOURCES = (
    "bindings.cpp",
    "project.cu",
    "reconstruct.cu",
    "orthogonalize.cu",
    "subspace_step.cu",
    "step.cu",
)
HEADERS = ("twa_common.h", "twa_launch.h", "twa_device.cuh", "twa_step.h")
NVCC_FLAGS = ("-O3", "-lineinfo", "-std=c++17")
CXX_FLAGS = ("-O3",)
