"""Installs dml_kernels. The compiled extension (csrc/) is optional: see csrc/README or the README."""
from setuptools import find_packages, setup

setup(
    name="dml_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for deep-metric-learning losses (PML drop-in)",
    packages=find_packages(include=["dml_kernels", "dml_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "pytorch-metric-learning==2.9.0"]},
)
