"""Installs dml_kernels, and builds its C++/CUDA extension (csrc/) ahead of time when it can.

* A C++ compiler and torch present at install time (``pip install --no-build-isolation .``): the CPU
  kernels are compiled into ``dml_kernels/_C*.so``; the CUDA kernels too when torch is a CUDA build and
  ``nvcc`` is found, or when ``FORCE_CUDA=1`` (compiles them on a machine without a GPU).
* No compiler, no torch, or the build fails: the pure-Python package still installs (with a warning);
  ``dml_kernels.csrc_ops`` then JIT-compiles the CPU kernels with ninja on first use, from the sources
  installed as ``dml_kernels/_csrc``.
* ``FORCE_CUDA=1`` or ``DML_KERNELS_REQUIRE_BUILD=1``: a failed build fails the install (CI's compile check).
  ``DML_KERNELS_NO_BUILD=1``: skip the build.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Every .cpp under csrc/cpu and every .cu under csrc/cuda is compiled (the loader globs the same way).
CPU_SOURCES = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
STRICT = os.environ.get("FORCE_CUDA") == "1" or os.environ.get("DML_KERNELS_REQUIRE_BUILD") == "1"


def _say(msg):
    print(f"dml_kernels setup: {msg}", file=sys.stderr)


def _nvidia_includes():
    """include/ folders of the nvidia-* wheels torch depends on (empty if none)."""
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in found if os.path.isdir(d)]


def _extension():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) when it cannot be built here."""
    if os.environ.get("DML_KERNELS_NO_BUILD") == "1":
        _say("DML_KERNELS_NO_BUILD=1: not building the C++ extension (it is JIT-compiled on first use)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - no torch at build time (isolated build): pure Python
        if STRICT:
            raise
        _say(f"torch is not importable at build time ({e}); installing without the compiled extension "
             "(use pip install --no-build-isolation . to build it)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        if STRICT:
            raise RuntimeError(f"no C++ compiler ({cxx}) found")
        _say("no C++ compiler found; installing without the compiled extension")
        return [], {}
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    with_cuda = torch.version.cuda is not None and nvcc and (force_cuda or torch.cuda.is_available()
                                                             or os.environ.get("DML_KERNELS_CUDA") == "1")
    if force_cuda and not with_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 needs a CUDA build of torch (have {torch.__version__}) and nvcc "
                           f"(CUDA_HOME={CUDA_HOME})")
    cxx_flags = ["-O3", "-fopenmp"]  # torch's BuildExtension picks the C++ standard it needs
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0;10.0;12.0+PTX"
        # Headers torch includes but a bare toolkit may lack (cuSPARSE, cuBLAS...) come with torch's
        # nvidia-* wheels; searched after the toolkit's own.
        after = sum((["-Xcompiler", "-idirafter", "-Xcompiler", d] for d in _nvidia_includes()), [])
        ext = CUDAExtension(
            "dml_kernels._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags + ["-DDML_WITH_CUDA"], "nvcc": ["-O3", "-DDML_WITH_CUDA"] + after},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("dml_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])
    _say(f"building the C++ extension ({'CPU + CUDA' if with_cuda else 'CPU'}) against torch {torch.__version__}")

    class OptionalBuildExt(BuildExtension):
        """A failed build leaves a pure-Python install (the kernels are then JIT-compiled on first use)."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if STRICT:
                    raise
                _say(f"building the C++ extension failed ({type(e).__name__}: {e}); installing without it")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension()

setup(
    name="dml_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for deep-metric-learning losses (PML drop-in)",
    packages=find_packages(include=["dml_kernels", "dml_kernels.*"]) + ["dml_kernels._csrc"],
    # The C++/CUDA sources ship with the package so the extension can be JIT-compiled after a
    # pure-Python install.
    package_dir={"dml_kernels._csrc": "csrc"},
    package_data={"dml_kernels._csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # triton: the GPU backend, and the interpreter the CPU tests run its kernels under; ninja: JIT build of
    # the extension when it was not built at install time.
    install_requires=["torch>=2.4", "numpy", "ninja", "triton; platform_system == 'Linux'"],
    # PML is only a test/benchmark dependency: the oracle we compare against (scikit-learn and tqdm come with
    # it). matplotlib: the plots of `python -m dml_kernels train`, whose PNG the tests check; "train" is what
    # that command needs (digits from scikit-learn, the progress bar, the plots).
    extras_require={"test": ["pytest", "pytest-benchmark", "pytorch-metric-learning==2.9.0", "matplotlib"],
                    "train": ["scikit-learn", "tqdm", "matplotlib"]},
)
