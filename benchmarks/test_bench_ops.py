"""pytest-benchmark micro-benchmarks of the main ops at small CPU sizes.

    pytest benchmarks/ --benchmark-only                      # time them (groups: one per op and mode)
    pytest benchmarks/ --benchmark-only --benchmark-compare  # against a saved run (--benchmark-autosave)

Not collected by ``pytest tests/``; a plain ``pytest benchmarks/`` runs them as ordinary (quick) tests.
The full harness with memory, large sizes, torch.compile and GPUs is ``python -m dml_kernels bench``.
No thresholds here: targets live in the benchmark report (benchmarks/RESULTS.md).
"""
import warnings

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from dml_kernels import _registry  # noqa: E402
from dml_kernels.bench import cases as bc  # noqa: E402

B, D, C = 256, 64, 1024
CASES = ("ms", "ms_mining", "lifted", "generalized_lifted", "contrastive", "triplet_batch_hard", "n_pairs",
         "pairwise_similarity", "proxy_nca", "proxy_anchor")
PROVIDERS = ("cpu", "reference", "pml")


def _why_not(case, provider):
    if provider == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning is not installed"
        return None
    why = _registry.unavailable_reason(provider, "cpu")
    if why is None and provider not in _registry.implemented(case.op):
        why = f"{case.op} has no {provider!r} implementation yet"
    return why


def _setup(case_key, provider):
    case = bc.CASES[case_key]
    why = _why_not(case, provider)
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    inputs = bc.make_inputs(case, B, None, C if case.family == "proxy" else None, D, torch.float32, "cpu")
    if provider == "pml":
        return bc.pml_runner(case, inputs)
    return (lambda: case.dk(inputs, provider)), bc.leaves(inputs)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_key", CASES)
def test_forward(benchmark, case_key, provider):
    fn, _ = _setup(case_key, provider)
    benchmark.group = f"{case_key} forward B={B} D={D}"
    out = benchmark(fn)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_key", CASES)
def test_forward_backward(benchmark, case_key, provider):
    fn, leaves = _setup(case_key, provider)
    benchmark.group = f"{case_key} forward+backward B={B} D={D}"
    grads = benchmark(lambda: torch.autograd.grad(fn(), leaves, allow_unused=True))
    assert any(g is not None for g in grads)
