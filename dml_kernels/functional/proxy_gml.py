"""ProxyGML (Zhu et al., NeurIPS 2020; seed 002 §5.3 eq. 21–27): N proxies per class, a per-sample top-K
proxy selection that always keeps the sample's own-class proxies, per-class sums of the selected
similarities, a masked softmax over the classes with a selected proxy, plus a proxy-proxy regulariser.

The equations, the tie rule at the K-th value and the two mask rules are stated in
``dml_kernels/backends/reference/proxy_gml.py``. ``proxies`` has the official code's layout and name
(``Proxies``): **D×(C·N)**, column k is proxy ``k mod N`` of class ``k // N``.

Where the seed's equations and the official release differ, the seed is the default and the release is an
argument:

* ``release_eps=False``: the seed's exact log-softmax; ``True`` adds the release's 1e−8 to the softmax's
  denominator and 1e−20 inside the log.
* ``normalize_embeddings=True``: s is a cosine (seed eq. 21); the release normalises the embeddings in its
  network, not in the loss: ``normalize_embeddings=False`` is the release's loss on raw embeddings (the
  proxies are normalised either way, in both).
* ``top_k < proxies_per_class``: the seed keeps all N own-class proxies (and no other); the release's
  ``topk(s + 1000·own)`` would keep only the K best own ones. The loss is 0 (seed) or ≈1e−8 (release)
  either way: only the own class is unmasked. Not offered as a variant.

``class_mask="selected"`` (default) is the seed's text ("a class with no selected proxy gets similarity
zero" and is masked); ``"nonzero"`` is eq. 22 read literally (M = [z ≠ 0]), as the release computes it.
K = ``top_k`` when given, else ceil(r·C·N) as the release computes it.
"""
from __future__ import annotations

import math

from .._validation import check_embeddings, check_proxy_labels, check_same_device
from ..distances import parse_distance
from ._common import _loss, _prepare

CLASS_MASKS = ("selected", "nonzero")


def resolve_top_k(r, top_k, num_proxies):
    """K: ``top_k`` if given, else ceil(r·C·N) (the release's rule); a ValueError names a bad argument."""
    if top_k is not None:
        if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= int(top_k) <= num_proxies:
            raise ValueError(f"top_k must be an integer in [1, num_classes·proxies_per_class={num_proxies}], "
                             f"got {top_k!r}")
        return int(top_k)
    if not (isinstance(r, (int, float)) and 0 < r <= 1):
        raise ValueError(f"r must be a number in (0, 1] (K = ceil(r·C·N)), got {r!r}")
    return max(1, min(num_proxies, math.ceil(r * num_proxies)))


def _check_proxies(embeddings, proxies, proxies_per_class, check_inputs):
    check_embeddings(proxies, "proxies", check_values=check_inputs)
    check_same_device(embeddings, proxies, "proxies")
    n = proxies_per_class
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"proxies_per_class must be a positive integer, got {n!r}")
    n = int(n)
    if proxies.shape[0] != embeddings.shape[1] or proxies.shape[1] % n:
        raise ValueError(f"proxies has shape {tuple(proxies.shape)}: expected (embedding_size="
                         f"{embeddings.shape[1]}, num_classes·proxies_per_class) with proxies_per_class={n} "
                         "(the official D×(C·N) layout)")
    return n


def proxy_gml_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                   proxies_per_class=12, r=0.05, weight_lambda=0.3, top_k=None, class_mask="selected",
                   release_eps=False, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                   reducer=None, _extra=None):
    """ProxyGML's loss (module docstring): mean CE of the masked softmax over the per-class sums of each
    sample's selected proxy similarities, plus ``weight_lambda`` × the proxy-proxy regulariser."""
    if indices_tuple is not None:
        raise ValueError("ProxyGMLLoss does not support indices_tuple (the top-K selection is its own mining)")
    if ref_emb is not None or ref_labels is not None:
        raise ValueError("ProxyGMLLoss does not support ref_emb / ref_labels")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    n = _check_proxies(embeddings, proxies, proxies_per_class, check_inputs)
    num_classes = proxies.shape[1] // n
    check_proxy_labels(labels, num_classes, check_values=check_inputs)
    k = resolve_top_k(r, top_k, proxies.shape[1])
    if class_mask not in CLASS_MASKS:
        raise ValueError(f"class_mask must be one of {CLASS_MASKS}, got {class_mask!r}")
    if not isinstance(weight_lambda, (int, float)) or isinstance(weight_lambda, bool) or not weight_lambda >= 0:
        raise ValueError(f"weight_lambda must be a number >= 0, got {weight_lambda!r}")
    dist = parse_distance(distance, normalize_embeddings, default="dot")
    if not dist.is_similarity:
        raise ValueError(f"ProxyGMLLoss uses a similarity (cosine, or dot with normalize_embeddings=False); got "
                         f"distance={distance!r}")
    return _loss("proxy_gml_loss", backend, embeddings, labels, proxies, proxies_per_class=n, top_k=k,
                 weight_lambda=float(weight_lambda), class_mask=class_mask, release_eps=bool(release_eps),
                 distance=dist, reducer=reducer, extra=_extra)
