"""Two of the seeds' methods as functions: language-guidance distillation and the DML-DA density regulariser.

Neither is a PML loss; the seeds' equations are the specification (``/work/shared/seeds``: Mohan et al.'s
overview §6.1 eq. 28–30 and Li et al.'s DML-DA eq. 5–9). Where the official release of language guidance
(ExplainableML/LanguageGuidance_for_DML) differs from the seed, the seed's equation is the default and the
release's variant is an argument.
"""
from __future__ import annotations

import math

import torch

from .._validation import check_embeddings, check_labels, check_same_device
from ._common import _call

DIRECTIONS = ("backward", "forward")


def _check_lang(lang, x, check_inputs):
    if not isinstance(lang, torch.Tensor):
        raise TypeError(f"language_embeddings must be a torch.Tensor, got {type(lang).__name__}")
    if lang.dim() not in (2, 3):
        raise ValueError("language_embeddings must be 2-D (batch, language_dim) or 3-D (batch, K, language_dim), "
                         f"got shape {tuple(lang.shape)}")
    if lang.shape[0] != x.shape[0]:
        raise ValueError(f"language_embeddings has {lang.shape[0]} rows but the embeddings have {x.shape[0]} "
                         "(one row per sample: index a per-class table with the labels, text_emb[labels])")
    if lang.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"language_embeddings must be a floating-point tensor, got {lang.dtype}")
    if lang.shape[-1] == 0 or (lang.dim() == 3 and lang.shape[1] == 0):
        raise ValueError(f"language_embeddings has an empty dimension: shape {tuple(lang.shape)}")
    check_same_device(x, lang, "language_embeddings")
    if check_inputs and not bool(torch.isfinite(lang).all()):
        raise ValueError("language_embeddings contains NaN or inf (pass check_inputs=False to skip this check)")
    return lang.detach() if lang.dim() == 3 else lang.detach().unsqueeze(1)


def check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_finite(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def language_guidance_loss(embeddings, labels, language_embeddings, *, temperature=1.0, language_shift=1.0,
                           direction="backward", mask_same_class=False, backend="auto", check_inputs=True):
    """Language-guidance distillation, Mohan et al. §6.1 eq. 29 (Roth, Vinyals, Akata, CVPR 2022):

        L_Lang = (1/B) Σ_i σ(S_I^i) · log[σ(S_I^i) / σ(S_L^i + γ_L)]   (a KL divergence per row i)

    with S_I the cosine similarities of ``embeddings`` (eq. 10, B×B, diagonal included) and S_L those of the
    language embeddings f_i^lang = Ω(T_i) (eq. 28), given here as a tensor — one row per sample (B, D_L), or
    (B, K, D_L) for the release's pseudo-label guidance, where S_L is the mean over k of the K cosines. The
    language side is the teacher: a constant, no gradient flows into it (the release detaches it too).
    Eq. 30 (L = L_DML + ω L_Lang) is ``dk.losses.LanguageGuidanceLoss(loss=..., weight=ω)``.

    Normaliser: the seed's C is the batch size ("C is the size of the batch"), so its 1/C is the release's
    1/B; nothing to choose. Arguments for the release's variants (the defaults are the seed's equation):

    * ``temperature`` T: softmaxes of S/T and the loss times T² (release ``--language_temp``, default 1; the
      seed has none, i.e. T = 1);
    * ``language_shift`` γ_L (default 1, as in both). A softmax ignores a shift of its whole row, so γ_L
      changes the value only together with ``mask_same_class``;
    * ``direction``: ``"backward"`` = KL(σ(S_I) ‖ σ(S_L + γ_L)), eq. 29 and the release's default
      (``--language_distill_dir backward``); ``"forward"`` = KL(σ(S_L + γ_L) ‖ σ(S_I));
    * ``mask_same_class`` (default False, the seed masks nothing): the release's masking — every same-class
      entry (y_i = y_j, diagonal included) of *both* matrices is set to 1 + γ_L before the softmaxes.

    ``labels`` are needed only for ``mask_same_class=True`` (else they may be None). Returns a 0-dim tensor.
    """
    check_embeddings(embeddings, check_values=check_inputs)
    labels = check_labels(labels, embeddings.shape[0], embeddings.device, required=bool(mask_same_class))
    lang = _check_lang(language_embeddings, embeddings, check_inputs)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} ('backward' = KL(image ‖ language), eq. 29), "
                         f"got {direction!r}")
    if not isinstance(mask_same_class, bool):
        raise TypeError(f"mask_same_class must be a bool, got {type(mask_same_class).__name__}")
    return _call("language_guidance_loss", backend, embeddings, labels, lang,
                 temperature=check_positive(temperature, "temperature"),
                 language_shift=check_finite(language_shift, "language_shift"), direction=direction,
                 mask_same_class=mask_same_class)


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def _check_class_labels(labels, n, device, num_classes, check_inputs):
    labels = check_labels(labels, n, device)
    if check_inputs and (bool(labels.min() < 0) or bool(labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}) (got min {int(labels.min())}, "
                         f"max {int(labels.max())})")
    return labels


def class_densities(features, labels, num_classes, *, normalize=False, backend="auto", check_inputs=True):
    """DML-DA eq. 5 per class: D_avg(S_c) = (1/|S_c|) Σ_{i∈S_c} ‖f_i − μ_c‖² (μ_c the class mean); 0 for a class
    without samples. With the features *before* the embedding (the paper: GoogLeNet's pool5, not normalised)
    this gives the original densities D⁽⁰⁾ of eq. 7–8 for ``DensityAdaptivityLoss(original_densities=...)``.
    Returns a (num_classes,) tensor."""
    num_classes = _check_num_classes(num_classes)
    check_embeddings(features, "features", check_values=check_inputs)
    labels = _check_class_labels(labels, features.shape[0], features.device, num_classes, check_inputs)
    return _call("class_densities", backend, features, labels, num_classes=num_classes, normalize=bool(normalize))


def check_original_densities(original_densities, num_classes, device=None, *, check_values=True):
    if original_densities is None:
        return None
    d = torch.as_tensor(original_densities)
    if not d.dtype.is_floating_point:
        d = d.double()
    if d.shape != (num_classes,):
        raise ValueError(f"original_densities must have shape (num_classes,) = ({num_classes},), "
                         f"got {tuple(d.shape)}")
    if check_values and (not bool(torch.isfinite(d).all()) or bool((d < 0).any())):
        raise ValueError("original_densities must be finite and >= 0 (mean squared distances to the class mean)")
    return d if device is None else d.to(device)


def density_adaptivity_loss(embeddings, labels, alpha, *, original_densities=None, eta=0.5,
                            normalize_embeddings=True, backend="auto", check_inputs=True):
    """The DML-DA density regulariser, Li et al. eq. 8 (eq. 6 without ``original_densities``):

        L_DA = (1/C) Σ_c (D_avg(S_c) − α_c)² − (1/C) Σ_c α_c
             + (1/C²) Σ_{ci,cj} ((D⁽⁰⁾_cj)^η α_ci − (D⁽⁰⁾_ci)^η α_cj)²

    D_avg(S_c) of eq. 5 (mean squared distance of the class's embeddings to their mean), α (num_classes,) the
    learnable target densities, D⁽⁰⁾ the original densities (``class_densities`` of the features before the
    embedding), η = ``eta`` (0.5 in the paper). The classes c are those present in the batch (D_avg exists
    only for them; C = their number, counted on the device). The double sum is computed in O(C) (Lagrange's
    identity). Embeddings are L2-normalised first by default (the paper's embeddings are). Eq. 9 (L_pair +
    λ L_DA) is ``dk.losses.DensityAdaptivityLoss(loss=..., weight=λ)``. Returns a 0-dim tensor.
    """
    check_embeddings(embeddings, check_values=check_inputs)
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 1 or not alpha.dtype.is_floating_point:
        raise TypeError("alpha must be a 1-D floating-point tensor of the num_classes target densities")
    num_classes = alpha.shape[0]
    if num_classes < 1:
        raise ValueError("alpha is empty: num_classes must be >= 1")
    check_same_device(embeddings, alpha, "alpha")
    labels = _check_class_labels(labels, embeddings.shape[0], embeddings.device, num_classes, check_inputs)
    d0 = check_original_densities(original_densities, num_classes, embeddings.device, check_values=check_inputs)
    return _call("density_adaptivity_loss", backend, embeddings, labels, alpha, num_classes=num_classes,
                 original_densities=d0, eta=check_finite(eta, "eta"), normalize=bool(normalize_embeddings))
