"""The canonical op contract every backend implements (reference/, triton/, csrc_ops.py).

The functional layer (``functional.py``) validates user input and calls
``_backends.call(op, backend, device_type, *args, **kwargs)``; an implementation registered with
``@_backends.register(op, backend)`` receives exactly these arguments (already validated: float
tensors on one device, labels int64 on that device, ``distance`` a :class:`dml_kernels.Distance`).

``ref is None`` means *self mode*: references are the queries, the (i, i) pair is excluded and the
gradient flows into ``x`` from both sides. Otherwise ``ref`` (M×D) with ``ref_labels`` (M,) and no
pair is excluded. Losses return a 0-dim tensor attached to the graph of every differentiable input
(also when the value is 0). Raise ``_backends.Unsupported`` for an argument combination not handled;
``backend="auto"`` then falls back to the next backend.

op                                   signature
-----------------------------------  ------------------------------------------------------------------
pairwise_similarity                  (x, ref, *, distance) -> N×M
multi_similarity_thresholds          (x, labels, ref, ref_labels, *, distance) -> (hardest_pos (N,), hardest_neg (N,))
multi_similarity_mask                (x, labels, ref, ref_labels, *, epsilon, distance) -> PackedPairMask
batch_hard_mining                    (x, labels, ref, ref_labels, *, distance) -> (pos_idx (N,), neg_idx (N,)), -1 = none
triplet_margin_mining                (x, labels, ref, ref_labels, *, margin, type_of_triplets, distance) -> (a, p, n)
pair_margin_mining                   (x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance) -> PackedPairMask
batch_easy_hard_mining               (x, labels, ref, ref_labels, *, pos_strategy, neg_strategy, allowed_pos_range,
                                     allowed_neg_range, distance) -> (pos_idx (N,) | None, neg_idx (N,) | None), -1 = none
distance_weighted_mining             (x, labels, ref, ref_labels, *, cutoff, nonzero_loss_cutoff) -> (a, p, n), random
angular_mining                       (x, labels, ref, ref_labels, *, angle) -> (a, p, n)
hdc_mining                           (x, labels, ref, ref_labels, *, filter_percentage, distance, pairs) -> (a1, p, a2, n)
uniform_histogram_mining             (x, labels, ref, ref_labels, *, num_bins, pos_per_bin, neg_per_bin, distance)
                                     -> (a1, p, a2, n), random
packaged_triplets_mining             (x) -> (a, p, n)
multi_similarity_loss                (x, labels, ref, ref_labels, *, alpha, beta, base, epsilon, distance, pairs, pair_rule)
generalized_lifted_structure_loss    (x, labels, ref, ref_labels, *, neg_margin, pos_margin, distance, pairs, pair_rule)
lifted_structure_loss                (x, labels, *, neg_margin, pos_margin, distance, pairs, pair_rule, ref=None, ref_labels=None)
contrastive_loss                     (x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs, pair_rule)
n_pairs_loss                         (x, labels, *, distance, pairs)
triplet_margin_loss                  (x, labels, ref, ref_labels, *, margin, swap, smooth_loss, mining, distance, triplets)
ntxent_loss                          (x, labels, ref, ref_labels, *, temperature, distance, pairs, pair_rule)
supcon_loss                          (x, labels, ref, ref_labels, *, temperature, distance, pairs, pair_rule)
nca_loss                             (x, labels, ref, ref_labels, *, softmax_scale, distance, weights)
circle_loss                          (x, labels, ref, ref_labels, *, m, gamma, distance, pairs, pair_rule)
tuplet_margin_loss                   (x, labels, ref, ref_labels, *, margin (radians), scale, distance, pairs, pair_rule)
intra_pair_variance_loss             (x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance, pairs, pair_rule)
snr_contrastive_loss                 (x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize, pairs, pair_rule)
threshold_consistent_margin_loss     (x, labels, *, lambda_plus, lambda_minus, margin_plus, margin_minus, pairs)
margin_loss                          (x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance, triplets)
proxy_nca_loss                       (x, labels, proxies, *, softmax_scale, exclude_positive, distance, weights)
proxy_anchor_loss                    (x, labels, proxies, *, margin, alpha, distance, weights)
normalized_softmax_loss              (x, labels, W, *, temperature, distance, weights); W is D×C (PML's layout)
cosface_loss                         (x, labels, W, *, margin, scale, weights)
arcface_loss                         (x, labels, W, *, margin (radians), scale, weights)
large_margin_softmax_loss            (x, labels, W, *, margin (int), scale, weights)
sphereface_loss                      (x, labels, W, *, margin (int), scale, weights)
subcenter_arcface_loss               (x, labels, W, *, margin (radians), scale, sub_centers, weights); W is D×(C·K)
soft_triple_loss                     (x, labels, fc, *, centers_per_class, la, gamma, margin, distance, weights)
p2sgrad_loss                         (x, labels, weight); weight D×C, used as given
proxy_gml_loss                       (x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask,
                                     release_eps, distance); proxies D×(C·N) (reference/proxy_gml.py: equations, ties)
proxy_nca_row_stats                  (x, labels, proxies, *, softmax_scale, distance, columns=None)
                                     -> (target, has_target, rest, has_rest) (N,)
proxy_anchor_class_terms             (x, labels, proxies, *, margin, alpha, distance) -> (pos_term, has_pos, neg_term) (C,)
margin_softmax_row_stats             (x, labels, W, *, loss, columns=None, **params of the loss op) -> (target, has_target,
                                     rest, has_rest) (N,); W D×(C·K) a class shard, columns None or bool (C,)
knn                                  (x, ref, *, k, distance, exclude_self) -> (values N×k, indices N×k int64)
direction_triplet_margin_loss        (x, labels, ref, ref_labels, *, margin, gamma, swap, smooth_loss, mining, distance,
                                     triplets); + γ (seed 002 eq. 33, dml_kernels/functional/direction.py)
direction_multi_similarity_loss      (x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon, distance, pairs,
                                     pair_rule); + γ on the negative term (eq. 34)
direction_proxy_nca_loss             (x, labels, proxies, *, softmax_scale, gamma, exclude_positive, distance, weights)
                                     + γ on the denominator terms (eq. 35)
<loss>_elements                      (the arguments of the loss op <loss>) -> PML's loss dict (reference only, for now)
contrastive_loss_row_stats           (the arguments of contrastive_loss but pair_rule; *, bands) -> (sums (4, N), counts (4, N))
triplet_margin_loss_row_stats        (the arguments of triplet_margin_loss; *, bands) -> (sums (2, N), counts (2, N))

``pairs``: None (all label pairs), a PackedPairMask (matrix-based losses: MS, generalized lifted), or a
PML 4-tuple (a1, p, a2, n) with duplicates that count (pair-based: lifted, contrastive); ``(a, p)`` for
N-pairs. ``labels`` may be None when ``pairs`` is given. ``pair_rule``: apply PML's "≤1 positive and ≤1
negative pair → 0" on the pairs used, counted on the device. ``triplets``: None or (a, p, n).
``weights``: None or PML's per-sample miner weights (N,). ``epsilon``: None or the MS mining margin.
``<loss>_elements`` (one per ``*_loss`` op above): the loss's unreduced elements as PML's loss dict
``{name: {"losses", "indices", "reduction_type", ["divisor"]}}``, for a non-default ``reducer=``.
``proxy_nca_row_stats`` / ``proxy_anchor_class_terms``: a class shard's statistics for the class-sharded
losses of ``dk.distributed`` (labels outside [0, C) belong to other shards: no target / a negative here).
``<loss>_row_stats``: per anchor row, for each sub-loss j of pair / triplet elements l (contrastive: pos, neg),
``sums[2j:2j+2]`` = (Σ l, Σ l·[low < l < high]) (differentiable) and ``counts[2j:2j+2]`` = (#, #[low < l < high])
(int64), ``bands[j] = (low, high)`` (None = unbounded): the statistics a reducer is computed from
(``reducers.stats_plan``; SPEC §7) without forming the elements. PML's ≤1-pair rule is applied by the caller.
``margin_softmax_row_stats``: the same for the margin-softmax family (``loss`` one of the seven softmax loss ops):
the target logit with the loss's margin applied on the shard owning the target class, and the LSE of the shard's
other logits (only the classes of ``columns``: Partial FC's sampled classes).
``knn``: the k nearest references of every query (no gradient), best first — largest similarity or smallest
distance — equal values ordered by the smaller reference index (the tie rule every backend keeps exactly);
``values`` are the similarities / distances in x's dtype. ``ref=None``: the references are the queries and
(i, i) is excluded; with ``ref``, ``exclude_self=True`` excludes (i, i) for i < min(N, M) (PML's
``ref_includes_query``: the queries are the first N references). Needs k <= M (k <= M - 1 when excluding).
Miners (``*_mining``, no gradient): index tensors on x's device as PML's miner returns them (a host sync
where the count depends on the data). ``batch_easy_hard_mining`` is the per-row device form: a side whose
strategy is "all" is ``None`` (every pair of that kind); ``pairs`` of ``hdc_mining``: None (all pairs) or
the (a1, p, a2, n) to filter; ``angle`` in radians. The random ones (distance-weighted, uniform-histogram)
draw from torch's global RNG exactly as PML does (same calls, sizes and order: one seed, PML's indices).
For the miners from ``pair_margin_mining`` on, the reference also takes as ``distance`` a distance object
the engines cannot express (SNRDistance, LpDistance(p=1), ...), calling it as is; a fused backend raises
``Unsupported`` for anything but a ``Distance``.
PML's embedding losses (``dml_kernels/functional/embedding_losses.py``, reference only): ``angular_loss`` (x,
labels, ref, ref_labels, *, alpha (radians), pairs); ``instance_loss`` (x, labels, *, gamma); ``manifold_loss`` (x,
None, proxies, meta_classes, *, lambdaC, alpha, margin, inverse_dtype, distance) (proxies K×D, meta_classes (N,));
``vicreg_loss`` (x, None, ref, *, invariance_lambda, variance_mu, covariance_v, eps) (ref: the other view, N×D).
``language_guidance_loss`` (x, labels, lang, *, temperature, language_shift, direction, mask_same_class): seed
002 eq. 29 (``lang`` (B, K, D_L), a constant; labels None unless mask_same_class); ``class_densities`` (x,
labels, *, num_classes, normalize) -> (C,) eq. 5 of seed 001; ``density_adaptivity_loss`` (x, labels, alpha, *,
num_classes, original_densities, eta, normalize): eq. 6/8 of seed 001 (dml_kernels/functional/seed_methods.py).
The ranking / histogram family (``dml_kernels/functional/ranking_losses.py``; all self mode but DSM):
``fastap_loss`` (x, labels, *, num_bins, distance, weights); ``histogram_loss`` (x, labels, *, delta, distance,
triplets); ``pnp_loss`` (x, labels, *, b, alpha, anneal, variant, distance); ``ranked_list_loss`` (x, labels, *,
margin, Tn, imbalance, alpha, Tp, distance); ``smooth_ap_loss`` (x, labels, *, temperature, distance, weights)
(a float32 loss, as PML's); ``dynamic_soft_margin_loss`` (x, labels, ref, ref_labels, hist, *, min_val, num_bins,
momentum, distance, triplets) -> (loss, new histogram (num_bins,), not detached); its ``_elements`` op returns
(loss dict, new histogram).
"""
OPS = ("pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
       "triplet_margin_mining", "multi_similarity_loss", "generalized_lifted_structure_loss",
       "lifted_structure_loss", "contrastive_loss", "n_pairs_loss", "triplet_margin_loss", "proxy_nca_loss",
       "proxy_anchor_loss", "proxy_nca_row_stats", "proxy_anchor_class_terms", "knn")
OPS += ("multi_similarity_loss_elements", "generalized_lifted_structure_loss_elements",
        "lifted_structure_loss_elements", "contrastive_loss_elements", "n_pairs_loss_elements",
        "triplet_margin_loss_elements", "proxy_nca_loss_elements", "proxy_anchor_loss_elements")
OPS += ("pair_margin_mining", "batch_easy_hard_mining", "distance_weighted_mining", "angular_mining", "hdc_mining",
        "uniform_histogram_mining", "packaged_triplets_mining")
OPS += ("ntxent_loss", "ntxent_loss_elements", "supcon_loss", "supcon_loss_elements", "nca_loss",
        "nca_loss_elements")
OPS += tuple(f"{n}{e}" for n in ("circle_loss", "tuplet_margin_loss", "intra_pair_variance_loss",
                                   "snr_contrastive_loss", "threshold_consistent_margin_loss", "margin_loss")
             for e in ("", "_elements"))
OPS += tuple(f"{n}{e}" for n in ("normalized_softmax_loss", "cosface_loss", "arcface_loss",
                                     "large_margin_softmax_loss", "sphereface_loss") for e in ("", "_elements"))
OPS += tuple(f"{n}{e}" for n in ("subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss")
             for e in ("", "_elements"))
OPS += tuple(f"{n}{e}" for n in ("angular_loss", "instance_loss", "manifold_loss", "vicreg_loss")
             for e in ("", "_elements"))  # PML's embedding losses
OPS += ("proxy_gml_loss", "proxy_gml_loss_elements")  # ProxyGML (seed 002 §5.3)
OPS += ("language_guidance_loss", "class_densities", "density_adaptivity_loss")  # the seeds' regularisers
OPS += tuple(f"direction_{n}{e}" for n in ("triplet_margin_loss", "multi_similarity_loss", "proxy_nca_loss")
             for e in ("", "_elements"))
OPS += tuple(f"{n}{e}" for n in ("fastap_loss", "histogram_loss", "pnp_loss", "ranked_list_loss",
                                     "dynamic_soft_margin_loss", "smooth_ap_loss") for e in ("", "_elements"))
OPS += ("contrastive_loss_row_stats", "triplet_margin_loss_row_stats")
OPS += ("margin_softmax_row_stats",)
