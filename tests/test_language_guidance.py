"""Language-guidance distillation (seed 002 §6.1 eq. 28–30) against naive loops over eq. 29 in float64 and against
the official release's formulation (masking, temperature, both KL directions): values and gradients, gradcheck,
label patterns, pseudo-label (K > 1) language embeddings, the module (ω, beside a base loss), errors, inputs
untouched; the fused Triton form (interpreter) against the reference, its memory and host syncs."""
import math

import pytest
import torch
import torch.nn.functional as tnf

import dml_kernels as dk
from dml_kernels import _registry
from memory import TensorWatch, peak_extra_bytes, requires_clear_refs
from patterns import PATTERNS

F = dk.functional
TOL = dict(rtol=1e-9, atol=1e-9)
NUM_CLASSES = 200
_CPU_WHY = _registry.unavailable_reason("cpu", "cpu")
NEEDS_CPU = pytest.mark.skipif(_CPU_WHY is not None, reason=f"cpu backend unavailable: {_CPU_WHY}")


def language_table(k=None, dim=6, seed=7):
    """A fixed random projection of the one-hot labels: row c is class c's "text embedding" (K of them if k)."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_CLASSES, dim) if k is None else (NUM_CLASSES, k, dim)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def inputs(pattern, n=9, d=5, k=None, seed=0, jitter=0.0):
    """x, labels and per-sample language embeddings: the class's row of the table, plus ``jitter`` × noise per
    sample (sample-level guidance: same-class rows differ, so masking the language side is not a no-op)."""
    g = torch.Generator().manual_seed(seed)
    y = PATTERNS[pattern](n)
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64)
    lang = language_table(k)[y % NUM_CLASSES]
    lang = lang + jitter * torch.randn(lang.shape, generator=g, dtype=torch.float64)
    return x, y, lang


# ----------------------------------------------------------------------------- naive loops over eq. 29


def _cos(u, v):
    dot = sum(u[t] * v[t] for t in range(u.shape[0]))
    return dot / (torch.sqrt(sum(u[t] ** 2 for t in range(u.shape[0]))) *
                  torch.sqrt(sum(v[t] ** 2 for t in range(v.shape[0]))))


def naive_language_guidance(x, y, lang, temperature=1.0, shift=1.0, direction="backward", mask=False):
    """(1/B) Σ_i Σ_j p_ij log(p_ij / q_ij) · T², p = softmax_j(S_I[i]/T), q = softmax_j((S_L[i] + γ)/T), every
    entry by explicit loops; S_L the mean over k of the cosines when lang is (B, K, D_L); ``mask``: the release's
    same-class fill with 1 + γ in both matrices."""
    b = x.shape[0]
    lang3 = lang if lang.dim() == 3 else lang[:, None, :]
    total = 0
    for i in range(b):
        a_row, b_row = [], []
        for j in range(b):
            s_img = _cos(x[i], x[j])
            s_lang = sum(_cos(lang3[i, k], lang3[j, k]) for k in range(lang3.shape[1])) / lang3.shape[1] + shift
            if mask and int(y[i]) == int(y[j]):
                s_img = s_lang = torch.tensor(1.0 + shift, dtype=x.dtype)
            a_row.append(s_img / temperature)
            b_row.append(s_lang / temperature)
        za = sum(torch.exp(v) for v in a_row)
        zb = sum(torch.exp(v) for v in b_row)
        for j in range(b):
            p, q = torch.exp(a_row[j]) / za, torch.exp(b_row[j]) / zb
            total = total + (p * torch.log(p / q) if direction == "backward" else q * torch.log(q / p))
    return total * temperature ** 2 / b


def release_style(x, y, lang, temperature=1.0, shift=1.0, direction="backward", mask=True):
    """What the official release computes (LanguageGuide.regularize + kl_div), written anew: normalised image
    embeddings' Gram, language sims averaged over K plus the shift, same-class entries filled with 1 + shift
    in both, F.kl_div(log_softmax(A/T), softmax(B/T), 'sum') · T² / B with (A, B) = (lang, img) for
    'backward' and (img, lang) for 'forward'."""
    z = tnf.normalize(x, dim=-1)
    img = z @ z.T
    e = tnf.normalize(lang if lang.dim() == 3 else lang[:, None, :], dim=-1)
    lng = torch.einsum("abe,cbe->acb", e, e).mean(-1) + shift
    if mask:
        same = y[:, None] == y[None, :]
        img, lng = img.masked_fill(same, 1 + shift), lng.masked_fill(same, 1 + shift)
    a, b = (lng, img) if direction == "backward" else (img, lng)
    return tnf.kl_div(tnf.log_softmax(a / temperature, -1), tnf.softmax(b / temperature, -1),
                      reduction="sum") * temperature ** 2 / x.shape[0]


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    v = fn(x)
    if not v.requires_grad:  # a naive loop over constants only (every pair masked)
        return v.detach(), torch.zeros_like(x)
    (g,) = torch.autograd.grad(v, x, allow_unused=True)
    return v.detach(), torch.zeros_like(x) if g is None else g


def assert_same(a, b, tol=TOL):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


VARIANTS = {
    "seed": {},
    "forward": dict(direction="forward"),
    "release": dict(mask=True),
    "release/T0.5/shift2": dict(mask=True, temperature=0.5, shift=2.0),
    "forward/mask/T2": dict(direction="forward", mask=True, temperature=2.0),
}


def _kw(v):
    return dict(temperature=v.get("temperature", 1.0), language_shift=v.get("shift", 1.0),
                direction=v.get("direction", "backward"), mask_same_class=v.get("mask", False))


def _naive_cases():
    """Every label pattern × variant on the reference; on triton every pattern with two variants, and every
    variant on one pattern (the interpreter is slow)."""
    cases = [("reference", p, v) for p in PATTERNS for v in VARIANTS]
    cases += [("triton", p, v) for p in PATTERNS for v in ("seed", "release")]
    cases += [pytest.param("cpu", p, v, marks=NEEDS_CPU) for p in PATTERNS for v in VARIANTS]
    return cases + [("triton", "random", v) for v in VARIANTS if v not in ("seed", "release")]


@pytest.mark.parametrize("backend,pattern,variant", _naive_cases())
def test_equals_naive_loops(backend, pattern, variant):
    v = VARIANTS[variant]
    x, y, lang = inputs(pattern, n=7, jitter=0.3)
    ours = value_and_grad(lambda e: F.language_guidance_loss(e, y, lang, backend=backend, **_kw(v)), x)
    naive = value_and_grad(lambda e: naive_language_guidance(e, y, lang, v.get("temperature", 1.0),
                                                             v.get("shift", 1.0), v.get("direction", "backward"),
                                                             v.get("mask", False)), x)
    assert_same(ours, naive)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [None, 3])
def test_release_formulation(variant, k):
    """The release's own computation (masking always on there) equals ours with mask_same_class=True; with masking
    off (the seed) they equal the release's kl_div without a mask. K = 3: pseudo-label guidance."""
    v = VARIANTS[variant]
    x, y, lang = inputs("random", n=11, k=k, jitter=0.3)
    rel = dict(temperature=v.get("temperature", 1.0), shift=v.get("shift", 1.0),
               direction=v.get("direction", "backward"), mask=v.get("mask", False))
    ours = value_and_grad(lambda e: F.language_guidance_loss(e, y, lang, backend="reference", **_kw(v)), x)
    assert_same(ours, value_and_grad(lambda e: release_style(e, y, lang, **rel), x))


def test_gamma_matters_only_with_masking_and_labels_only_then():
    x, y, lang = inputs("random", n=8)
    f = lambda **kw: F.language_guidance_loss(x, y, lang, backend="reference", **kw)  # noqa: E731
    torch.testing.assert_close(f(language_shift=0.0), f(language_shift=3.0), **TOL)
    assert abs(float(f(language_shift=0.0, mask_same_class=True) - f(language_shift=3.0, mask_same_class=True))) > 1e-3
    torch.testing.assert_close(F.language_guidance_loss(x, None, lang, backend="reference"), f(), **TOL)


def test_identical_similarities_give_zero_and_one_sample_gives_zero():
    x, y, _ = inputs("random", n=6)
    assert abs(float(F.language_guidance_loss(x, y, x.clone(), backend="reference"))) < 1e-12
    x1, y1, l1 = inputs("one_sample")
    out = F.language_guidance_loss(x1.requires_grad_(), y1, l1, backend="reference")
    assert float(out) == 0 and out.requires_grad


def test_gradcheck_reference():
    x, y, lang = inputs("random", n=6, d=3, k=2)
    for kw in ({}, dict(direction="forward", mask_same_class=True, temperature=0.7)):
        assert torch.autograd.gradcheck(lambda e: F.language_guidance_loss(e, y, lang, backend="reference", **kw),
                                        (x.clone().requires_grad_(),))


def test_language_side_is_a_constant():
    x, y, lang = inputs("random", n=6)
    lang = lang.clone().requires_grad_()
    F.language_guidance_loss(x.requires_grad_(), y, lang, backend="reference").backward()
    assert lang.grad is None and x.grad is not None


# ----------------------------------------------------------------------------- module


def test_module_weight_and_base_loss():
    """Eq. 30: L = L_DML + ω L_Lang (loss=, weight=); the release's configuration by arguments."""
    x, y, lang = inputs("pairs", n=10)
    base = dk.losses.MultiSimilarityLoss()
    lg = dk.losses.LanguageGuidanceLoss(mask_same_class=True, loss=base, weight=7.5, backend="reference")
    got = value_and_grad(lambda e: lg(e, y, lang), x)
    want = value_and_grad(lambda e: base(e, y) + 7.5 * release_style(e, y, lang), x)
    assert_same(got, want)
    alone = dk.losses.LanguageGuidanceLoss(backend="reference")
    torch.testing.assert_close(alone(x, y, lang), naive_language_guidance(x, y, lang), **TOL)
    with pytest.raises(ValueError, match="indices_tuple"):
        alone(x, y, lang, dk.miners.MultiSimilarityMiner()(x, y))
    assert list(alone.state_dict()) == []


def test_inputs_untouched():
    x, y, lang = inputs("random", n=7, k=2)
    copies = [t.clone() for t in (x, y, lang)]
    F.language_guidance_loss(x.requires_grad_(), y, lang, mask_same_class=True, backend="reference").backward()
    for t, c in zip((x.detach(), y, lang), copies):
        assert torch.equal(t, c)


def test_errors_name_the_argument():
    x, y, lang = inputs("random", n=7)
    cases = [
        (ValueError, "language_embeddings", dict(language_embeddings=lang[:-1])),
        (ValueError, "language_embeddings", dict(language_embeddings=lang[0])),
        (TypeError, "language_embeddings", dict(language_embeddings=lang.long())),
        (ValueError, "language_embeddings", dict(language_embeddings=lang * math.nan)),
        (ValueError, "direction", dict(direction="image")),
        (ValueError, "temperature", dict(temperature=0)),
        (ValueError, "language_shift", dict(language_shift=math.inf)),
        (ValueError, "labels", dict(labels=None, mask_same_class=True)),
        (ValueError, "labels", dict(labels=y[:-1])),
        (ValueError, "embeddings", dict(embeddings=x[:, :0])),
    ]
    for err, name, kw in cases:
        args = dict(embeddings=x, labels=y, language_embeddings=lang) | kw
        with pytest.raises(err, match=name):
            F.language_guidance_loss(args.pop("embeddings"), args.pop("labels"), args.pop("language_embeddings"),
                                     backend="reference", **args)
    with pytest.raises(ValueError, match="weight"):
        dk.losses.LanguageGuidanceLoss(weight=math.nan)
    with pytest.raises(ValueError, match="direction"):
        dk.losses.LanguageGuidanceLoss(direction="both")


# ----------------------------------------------------------------------------- the fused Triton form (interpreter)


def _compare(backend_a, backend_b, x, y, lang, tol=TOL, **kw):
    got = value_and_grad(lambda e: F.language_guidance_loss(e, y, lang, backend=backend_a, **kw), x)
    want = value_and_grad(lambda e: F.language_guidance_loss(e.double(), y, lang.double(), backend=backend_b,
                                                             **kw), x)
    assert_same([t.double() for t in got], [t.double() for t in want], tol)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpu", marks=NEEDS_CPU)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [None, 3])
def test_fused_equals_reference_odd_shapes(variant, k, backend, monkeypatch):
    """B = 37, D = 19 (several 16-row tiles / 5-row cpu blocks, ragged edges), D_L = 6 (or K = 3 × 6), float64,
    1e-9."""
    from dml_kernels.backends.cpp import language_guidance as cpu_lg
    monkeypatch.setattr(cpu_lg, "TILE", 5 * 37)
    x, y, lang = inputs("random", n=37, d=19, k=k, jitter=0.3)
    _compare(backend, "reference", x, y, lang, **_kw(VARIANTS[variant]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_triton_low_precision(dtype, tol):
    """fp32 / fp16 / bf16 operands (fp32 accumulation) against the float64 reference on the rounded inputs."""
    x, y, lang = inputs("random", n=21, d=16, jitter=0.3)
    x, lang = x.to(dtype), lang.to(dtype)
    got = value_and_grad(lambda e: F.language_guidance_loss(e, y, lang, mask_same_class=True, backend="triton"), x)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    _compare("triton", "reference", x, y, lang, tol=dict(rtol=tol, atol=tol * float(got[0])),
             mask_same_class=True)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpu", marks=NEEDS_CPU)])
def test_gradcheck_fused(backend):
    x, y, lang = inputs("random", n=6, d=3, k=2, jitter=0.3)
    for kw in ({}, dict(direction="forward", mask_same_class=True, temperature=0.7)):
        assert torch.autograd.gradcheck(lambda e: F.language_guidance_loss(e, y, lang, backend=backend, **kw),
                                        (x.clone().requires_grad_(),))


def test_registered_backends_and_auto_on_cpu():
    have = _registry.implemented("language_guidance_loss")
    assert {"reference", "triton"} <= set(have) and "cuda" not in have
    if _CPU_WHY is None:  # auto on CPU tensors runs the cpu form, without a fallback warning
        x, y, lang = inputs("random", n=9)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = F.language_guidance_loss(x, y, lang)
        torch.testing.assert_close(got, F.language_guidance_loss(x, y, lang, backend="cpu"), rtol=0, atol=0)


def test_triton_inputs_untouched_and_double_backward_refused():
    x, y, lang = inputs("random", n=7, k=2)
    copies = [t.clone() for t in (x, y, lang)]
    xl = x.clone().requires_grad_()
    F.language_guidance_loss(xl, y, lang, mask_same_class=True, backend="triton").backward()
    for t, c in zip((xl.detach(), y, lang), copies):
        assert torch.equal(t, c)
    out = F.language_guidance_loss(xl, y, lang, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, xl, create_graph=True)


_Watch = TensorWatch  # tests/memory.py


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_batch_by_batch_tensor_and_no_host_sync(backend):
    """fp32, B = 128, D = 3, K = 2: a B×B matrix takes 64 KiB; the fused path's largest tensor stays under 1/8 of
    that (x, the language rows, four row statistics) and nothing syncs (check_inputs=False). The reference forms
    B×B matrices: the same check fails there."""
    x, y, lang = inputs("random", n=128, d=3, k=2, jitter=0.3)
    x, lang = x.float().requires_grad_(), lang.float()
    with _Watch() as watch:
        F.language_guidance_loss(x, y, lang, mask_same_class=True, backend=backend, check_inputs=False).backward()
    fits = watch.largest < 128 * 128 * 4 // 8 and not watch.syncs
    assert fits == (backend == "triton"), (watch.largest, watch.syncs)


@requires_clear_refs
def test_peak_memory_fused_vs_reference(monkeypatch):
    """Peak resident memory of forward + backward, fp32, B = 1024, D = 8, D_L = 8: the reference holds several
    B×B matrices (4 MiB each); the fused path holds O(B·D). Larger interpreter tiles keep it fast."""
    from dml_kernels.backends.triton import language_guidance as lg
    monkeypatch.setattr(lg, "INTERPRETER_BLOCKS", [128, 128])
    x, y, lang = inputs("random", n=1024, d=8, jitter=0.3)
    lang = torch.cat([lang, lang], 1)[:, :8]
    x, lang = x.float(), lang.float()
    matrix = 1024 * 1024 * 4

    def run(backend, n=1024):
        xl = x[:n].clone().requires_grad_()
        F.language_guidance_loss(xl, y[:n], lang[:n], mask_same_class=True, backend=backend,
                                 check_inputs=False).backward()

    run("triton", 16)  # load / warm up the kernels outside the measurement
    fused, ref = peak_extra_bytes(lambda: run("triton")), peak_extra_bytes(lambda: run("reference"))
    assert ref > 3 * matrix, ref  # the same bound fails on the reference
    assert fused < matrix // 2, fused


@NEEDS_CPU
@requires_clear_refs
def test_peak_memory_cpu_form(monkeypatch):
    """The cpu form at B = 2048 fp32 with 32-row blocks (TILE = 2¹⁶): a B×B matrix takes 16 MiB; the cpu form stays
    under half of one, the reference needs several (the same bound fails there). No syncing op either. (At B = 1024
    the 2 MiB bound was within the few MiB the allocator state left by earlier test modules adds.)"""
    from dml_kernels.backends.cpp import language_guidance as cpu_lg
    monkeypatch.setattr(cpu_lg, "TILE", 1 << 16)
    x, y, lang = inputs("random", n=2048, d=16, jitter=0.3)
    x, lang = x.float(), lang.float()

    def run(backend, n=2048):
        xl = x[:n].clone().requires_grad_()
        F.language_guidance_loss(xl, y[:n], lang[:n], mask_same_class=True, backend=backend,
                                 check_inputs=False).backward()

    run("cpu")
    matrix = 2048 * 2048 * 4
    fused, ref = peak_extra_bytes(lambda: run("cpu")), peak_extra_bytes(lambda: run("reference"))
    assert ref > 3 * matrix, ref
    assert fused < matrix // 2, fused
    with _Watch() as watch:
        run("cpu", 64)
    assert not watch.syncs, watch.syncs
