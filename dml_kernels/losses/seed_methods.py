"""Two of the seeds' methods as loss modules: ``LanguageGuidanceLoss`` (Mohan et al. overview §6.1, eq. 28–30)
and ``DensityAdaptivityLoss`` (DML-DA, Li et al., eq. 5–9). Not PML classes: the seeds' equations are their
specification (``dk.functional.language_guidance_loss`` / ``density_adaptivity_loss`` say how, and which
official-release variants the arguments select). Both plug in beside any loss: ``loss=`` adds a base DML loss
(called on the same batch), ``weight=`` is the regulariser's weight (ω of eq. 30, λ of eq. 9)."""
from __future__ import annotations

import torch
from torch import nn

from ..functional import seed_methods as _f


def _check_base(loss, weight):
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a loss module (called with embeddings, labels, ...), got {type(loss).__name__}")
    return _f.check_finite(weight, "weight")


class _Regularised(nn.Module):
    def _plus_base(self, term, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self.loss is None:
            if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
                raise ValueError(f"{type(self).__name__} uses every sample of the batch: indices_tuple, ref_emb and "
                                 "ref_labels are passed to the base loss only, and none was given (loss=None)")
            return term
        if ref_emb is None and ref_labels is None:
            base = self.loss(embeddings, labels, indices_tuple)
        else:
            base = self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return base + term


class LanguageGuidanceLoss(_Regularised):
    """Language-guidance distillation (eq. 29; eq. 30 with ``loss=``):
    ``loss(embeddings, labels, language_embeddings)`` = ``loss(...)`` (if given) + ω · L_Lang, with L_Lang the
    mean over the batch rows of KL(σ(S_I^i) ‖ σ(S_L^i + γ_L)). ``language_embeddings``: one row per sample,
    (B, D_L), or (B, K, D_L) for the release's pseudo-label guidance; a constant (the teacher). Arguments as in
    ``dk.functional.language_guidance_loss``; the defaults are the seed's equation, ``mask_same_class=True``
    with ``direction="backward"`` and T = 1, γ_L = 1 is the official release's default configuration."""

    def __init__(self, temperature=1.0, language_shift=1.0, direction="backward", mask_same_class=False, loss=None,
                 weight=1.0, *, backend="auto", check_inputs=True):
        super().__init__()
        self.temperature = _f.check_positive(temperature, "temperature")
        self.language_shift = _f.check_finite(language_shift, "language_shift")
        if direction not in _f.DIRECTIONS:
            raise ValueError(f"direction must be one of {_f.DIRECTIONS}, got {direction!r}")
        if not isinstance(mask_same_class, bool):
            raise TypeError(f"mask_same_class must be a bool, got {type(mask_same_class).__name__}")
        self.direction, self.mask_same_class = direction, mask_same_class
        self.weight = _check_base(loss, weight)
        self.loss = loss
        self.backend, self.check_inputs = backend, check_inputs

    def forward(self, embeddings, labels, language_embeddings, indices_tuple=None, ref_emb=None, ref_labels=None):
        term = _f.language_guidance_loss(embeddings, labels, language_embeddings, temperature=self.temperature,
                                         language_shift=self.language_shift, direction=self.direction,
                                         mask_same_class=self.mask_same_class, backend=self.backend,
                                         check_inputs=self.check_inputs)
        return self._plus_base(self.weight * term, embeddings, labels, indices_tuple, ref_emb, ref_labels)


class DensityAdaptivityLoss(_Regularised):
    """The DML-DA density regulariser (eq. 8, or eq. 6 without ``original_densities``; eq. 9 with ``loss=``):
    ``loss(embeddings, labels)`` = ``loss(...)`` (if given) + λ · L_DA.

    ``alpha`` is the learnable (num_classes,) parameter of target densities α_c, initialised to ``alpha_init``
    (0.5, the paper's value); ``original_densities`` (num_classes,) the densities D⁽⁰⁾ before the embedding
    (``dk.functional.class_densities`` of e.g. the backbone's pooled features), kept as a buffer; ``eta`` η
    (0.5 in the paper). The paper trains with λ = 10 beside a contrastive, N-pair or triplet loss:
    ``DensityAdaptivityLoss(C, d0, loss=dk.losses.ContrastiveLoss(), weight=10)``. Labels must lie in
    [0, num_classes). ``indices_tuple`` (e.g. from a miner, or ``MultipleLosses``) goes to the base loss only:
    the densities use every sample of the batch (eq. 5)."""

    def __init__(self, num_classes, original_densities=None, eta=0.5, alpha_init=0.5, normalize_embeddings=True,
                 loss=None, weight=1.0, *, backend="auto", check_inputs=True):
        super().__init__()
        self.num_classes = _f._check_num_classes(num_classes)
        self.eta = _f.check_finite(eta, "eta")
        self.alpha = nn.Parameter(torch.full((num_classes,), _f.check_finite(alpha_init, "alpha_init")))
        d0 = _f.check_original_densities(original_densities, num_classes)
        self.register_buffer("original_densities", None if d0 is None else d0.detach().clone())
        self.normalize_embeddings = bool(normalize_embeddings)
        self.weight = _check_base(loss, weight)
        self.loss = loss
        self.backend, self.check_inputs = backend, check_inputs

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        term = _f.density_adaptivity_loss(embeddings, labels, self.alpha,
                                          original_densities=self.original_densities, eta=self.eta,
                                          normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                                          check_inputs=self.check_inputs)
        return self._plus_base(self.weight * term, embeddings, labels, indices_tuple, ref_emb, ref_labels)
