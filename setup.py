"""Build script: the package plus the optional native extension ``memoir._C``.

The C++ CPU kernels in ``csrc/`` are always built.  CUDA kernels in ``csrc/cuda/`` are
added only when CUDA is usable here or ``MEMOIR_FORCE_CUDA=1`` (cross-compiling on a
GPU-less box with a CUDA build of torch; ``TORCH_CUDA_ARCH_LIST`` picks the archs).
``MEMOIR_SKIP_EXT=1`` builds the pure-Python package only.  Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
"""
import glob
import os

from setuptools import setup


def _want_cuda():
    import torch

    forced = os.environ.get("MEMOIR_FORCE_CUDA", "0") == "1"
    if not forced and not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        msg = (
            "MEMOIR_FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
        if forced:
            raise RuntimeError(msg)
        print(f"memoir: building CPU kernels only: {msg}")
        return False
    return True


def _extensions():
    if os.environ.get("MEMOIR_SKIP_EXT", "0") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]
    # No -march=native: wide instructions live only in target-attributed functions that are
    # picked at run time (csrc/popcount_cpu.cpp), so the binary runs on any x86-64.
    common = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension(
            "memoir._C",
            sources,
            define_macros=[("MEMOIR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **common,
        )
    else:
        ext = CppExtension("memoir._C", sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
