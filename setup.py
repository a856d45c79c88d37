"""Installs dml_kernels. The compiled extension (csrc/) is optional: see csrc/README or the README."""
from setuptools import find_packages, setup

setup(
    name="dml_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for deep-metric-learning losses (PML drop-in)",
    packages=find_packages(include=["dml_kernels", "dml_kernels.*"]),
    python_requires=">=3.9",
    # triton: the GPU backend, and the interpreter the CPU tests run its kernels under; ninja: JIT build of
    # the extension when it was not built at install time.
    install_requires=["torch>=2.4", "numpy", "ninja", "triton; platform_system == 'Linux'"],
    # PML is only a test/benchmark dependency: the oracle we compare against (scikit-learn comes with it).
    extras_require={"test": ["pytest", "pytest-benchmark", "pytorch-metric-learning==2.9.0"]},
)
