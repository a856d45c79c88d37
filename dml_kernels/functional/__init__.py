"""Functional API: ``dk.functional.<snake_case_name>(embeddings, labels, ..., backend=...)``.

Each function validates its inputs (``_validation.py``), turns PML-style arguments into the canonical form
every backend takes (``_ops.py``), and dispatches through the registry (``_registry.py``). One module per
family, the same names as in ``dk.losses`` and in each backend package:

* ``similarity.py``   — ``pairwise_similarity`` and the device-side mining results;
* ``pair_losses.py``  — the pair family (multi-similarity, lifted structure, contrastive, N-pairs, triplet);
* ``class_losses.py`` — the class-weight family (ProxyNCA, ProxyNCA++, Proxy Anchor).
"""
from .._pairs import PackedPairMask
from .class_losses import proxy_anchor_loss, proxy_nca_loss, proxy_nca_plus_plus_loss
from .contrastive_losses import nca_loss, ntxent_loss, supcon_loss
from .contrastive_losses import (circle_loss, intra_pair_variance_loss, margin_loss,
                                 signal_to_noise_ratio_contrastive_loss, threshold_consistent_margin_loss,
                                 tuplet_margin_loss)
from .margin_softmax import (arcface_loss, cosface_loss, large_margin_softmax_loss,
                             normalized_softmax_loss, p2sgrad_loss, soft_triple_loss, sphereface_loss,
                             subcenter_arcface_loss)
from .pair_losses import (
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    n_pairs_loss,
    triplet_margin_loss,
)
from .similarity import batch_hard_mining, multi_similarity_mask, multi_similarity_thresholds, pairwise_similarity

__all__ = [
    "pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
    "multi_similarity_loss", "lifted_structure_loss", "generalized_lifted_structure_loss", "n_pairs_loss",
    "contrastive_loss", "triplet_margin_loss", "proxy_nca_loss", "proxy_nca_plus_plus_loss",
    "proxy_anchor_loss", "PackedPairMask",
]
__all__ += ["ntxent_loss", "supcon_loss", "nca_loss"]
__all__ += ["circle_loss", "tuplet_margin_loss", "intra_pair_variance_loss", "signal_to_noise_ratio_contrastive_loss", "threshold_consistent_margin_loss", "margin_loss"]
__all__ += ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
            "sphereface_loss"]
__all__ += ["subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss"]
from .embedding_losses import angular_loss, instance_loss, manifold_loss, vicreg_loss  # noqa: E402
__all__ += ["angular_loss", "instance_loss", "manifold_loss", "vicreg_loss"]
from .proxy_gml import proxy_gml_loss  # noqa: E402
__all__ += ["proxy_gml_loss"]
from .seed_methods import class_densities, density_adaptivity_loss, language_guidance_loss  # noqa: E402
__all__ += ["language_guidance_loss", "density_adaptivity_loss", "class_densities"]
from .direction import (direction_multi_similarity_loss, direction_proxy_nca_loss,  # noqa: E402
                        direction_triplet_margin_loss)
__all__ += ["direction_triplet_margin_loss", "direction_multi_similarity_loss", "direction_proxy_nca_loss"]
from .ranking_losses import (dynamic_soft_margin_loss, fastap_loss, histogram_loss, pnp_loss,  # noqa: E402
                             ranked_list_loss, smooth_ap_loss)
__all__ += ["fastap_loss", "histogram_loss", "pnp_loss", "ranked_list_loss", "dynamic_soft_margin_loss",
            "smooth_ap_loss"]
