"""C++/CUDA sources of the dml_kernels extension (installed as dml_kernels._csrc for JIT builds)."""
