"""The contrastive family: softmax-over-pairs losses (NT-Xent, SupCon, NCA, ...) with PML 2.9's arguments,
defaults and reductions. ``reducer=`` and ``_extra`` as in ``pair_losses.py``."""
from __future__ import annotations

import torch

from .._pairs import PackedPairMask
from .._validation import check_indices_tuple
from ..distances import parse_distance
from ._common import _loss, _matrix_pairs, _num_refs, _pair_list, _prepare


def check_temperature(value, name="temperature"):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def ntxent_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.07,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's NTXentLoss: mean over positive pairs (a, p) of −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{N_a} e^{s_an/τ}))."""
    temperature = check_temperature(temperature)
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("ntxent_loss", backend, embeddings, labels, ref, ref_labels, temperature=temperature,
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def supcon_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.1,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's SupConLoss: AvgNonZero over rows i of −(1/|P_i|) Σ_{P_i} log softmax_{P_i ∪ N_i}(s/τ)."""
    temperature = check_temperature(temperature)
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("supcon_loss", backend, embeddings, labels, ref, ref_labels, temperature=temperature,
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def _nca_weights(indices_tuple, n, m, device, check_inputs, *, using_ref):
    """PML's ``convert_to_weights`` for NCA: per query row, its count in the tuple / the largest count (the
    anchors only when a reference set is given); None without a tuple or with an empty one."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    t = check_indices_tuple(indices_tuple, n, m, check_values=check_inputs, device=device)
    if all(len(i) == 0 for i in t):
        return None
    idx = torch.cat(([t[0], t[2]] if len(t) == 4 else [t[0]]) if using_ref else list(t))
    counts = torch.bincount(idx, minlength=n).double()
    return counts / counts.max()


def nca_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, softmax_scale=1,
             distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
             _extra=None):
    """PML's NCALoss: mean over rows with a positive of −log Σ_{P_i} softmax_k(σ·s_ik) (s: similarity or
    negated distance, default squared euclidean); a tuple weights rows as PML's ``convert_to_weights``."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    weights = _nca_weights(indices_tuple, n, m, embeddings.device, check_inputs, using_ref=ref is not None)
    return _loss("nca_loss", backend, embeddings, labels, ref, ref_labels, softmax_scale=float(softmax_scale),
                 distance=dist, weights=weights, reducer=reducer, extra=_extra)
