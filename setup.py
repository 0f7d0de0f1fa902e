"""Optional eager build of the CUDA kernels; all metadata lives in pyproject.toml.

A plain ``pip install .`` builds nothing: ``twa_kernels._cuda`` compiles csrc/ on first use.
With ``TWA_KERNELS_BUILD_CUDA=1`` (a CUDA build of torch and nvcc required, e.g.
``TWA_KERNELS_BUILD_CUDA=1 CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0
pip install -e . --no-build-isolation --no-deps``) the extension ``twa_kernels._C`` is built
at install and used instead.
"""

import os
import runpy

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("TWA_KERNELS_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    # The JIT loader's list of sources and flags, read without importing the package.
    build = runpy.run_path(os.path.join(root, "twa_kernels", "_cuda_build.py"))
    ext_modules = [
        CUDAExtension(
            "twa_kernels._C",
            [os.path.join("csrc", name) for name in build["SOURCES"]],
            include_dirs=[os.path.join(root, "csrc")],
            extra_compile_args={"cxx": list(build["CXX_FLAGS"]), "nvcc": list(build["NVCC_FLAGS"])},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
