"""``python -m dml_kernels bench``: speed and peak extra memory of every op × provider over size sweeps.

Providers: each dml_kernels backend that can run the op on the device (never the Triton interpreter on
CPU), ``reference``, ``compile`` (``torch.compile`` of the reference; compile time recorded separately
as ``compile_s`` and excluded), and ``pml`` (the equivalent pytorch-metric-learning 2.9 pipeline, when
installed). For each cell (op, variant, provider, dtype, size) it records forward, backward and
forward+backward time and the peak memory the op needs on top of its inputs.

How (see ``benchmarks/README.md``):

* GPU: ``triton.testing.do_bench`` (warm-up, L2 flushed before every call, median with 20/80 %
  quantiles) for forward and forward+backward; backward alone by CUDA events around ``autograd.grad``
  after an untimed forward, median. Memory: ``torch.cuda.max_memory_allocated()`` during one
  forward+backward minus the memory allocated before it (inputs excluded, gradients included).
  One worker subprocess per op, so a crashed CUDA context loses one op, not the sweep.
* CPU: every cell runs in a fresh forked process with an address-space limit (so an OOM is recorded,
  never the machine's OOM killer). Memory first: malloc returns every freed block ≥ 64 KiB to the OS
  (``mallopt``), one warm-up call, then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``)
  and ``VmHWM − VmRSS(before)`` over one forward+backward is the peak extra memory. Then
  ``torch.utils.benchmark.Timer`` (median of ``blocked_autorange``) for forward and forward+backward,
  and the median of timed ``autograd.grad`` calls after untimed forwards for backward, with
  ``torch.set_num_threads`` = the machine's cores.
* Inputs are rotated between several copies (together ≥ 2× the last-level cache) so caches do not
  flatter small sizes. Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` accumulation).

Modules: ``cases.py`` (what is measured: ops, inputs, presets, GEMM floors), ``machine.py`` (device and
version facts for each record), ``measure.py`` (timing and memory of one cell, process isolation),
``sweep.py`` (cells of a preset, records, results files, the CLI), ``report.py`` (tables, plots,
RESULTS.md).
"""
from .sweep import main  # noqa: F401
