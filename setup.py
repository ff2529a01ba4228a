"""Build script: the Python package plus the compiled backends.

- `fastrnn._C_cpu` (csrc/cpu): the fused CPU kernel, built whenever torch is importable.
- `fastrnn._C_cuda` (csrc/cuda): the CUDA kernels, built only when the installed torch has CUDA
  (a CUDAExtension cannot even be constructed against the CPU wheel) and FASTRNN_SKIP_CUDA_BUILD
  is unset. MAX_JOBS limits the parallel compile jobs; TORCH_CUDA_ARCH_LIST picks the GPUs.

Torch must be importable when building (`pip install --no-build-isolation -e .`); without it the
package is installed without extensions and the backends compile them on first use instead.
"""

import glob
import os
import sys

from setuptools import setup


def _fix_cuda_home(cpp_extension) -> None:
    """torch takes CUDA_HOME from the folder above the `nvcc` on PATH; where that `nvcc` is a
    wrapper script (/usr/local/bin/nvcc), take the first toolkit folder holding both nvcc and
    cuda_runtime.h instead."""
    def complete(home):
        return bool(home) and all(os.path.exists(os.path.join(home, *part)) for part in
                                  (("bin", "nvcc"), ("include", "cuda_runtime.h")))

    if complete(cpp_extension.CUDA_HOME):
        return
    for home in [os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                 *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if complete(home):
            print(f"fastrnn: CUDA_HOME {home} (torch found {cpp_extension.CUDA_HOME})",
                  file=sys.stderr)
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = home
            return


def extension_setup() -> dict:
    """setup() arguments that build the extensions, or {} when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastrnn: torch is not importable, building without the extensions", file=sys.stderr)
        return {}
    extensions = [CppExtension(
        "fastrnn._C_cpu",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )]
    if torch.version.cuda is not None and not os.environ.get("FASTRNN_SKIP_CUDA_BUILD"):
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import CUDAExtension
        _fix_cuda_home(cpp_extension)
        extensions.append(CUDAExtension(
            "fastrnn._C_cuda",
            ["csrc/cuda/binding.cpp", "csrc/cuda/forward.cu", "csrc/cuda/backward.cu"],
            include_dirs=[os.path.abspath("csrc/cuda")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        ))
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_setup())
