"""Plain-PyTorch, float64-capable implementations of every op: the oracle for all backends.

Every function here takes the *canonical* arguments listed in ``dml_kernels/_ops.py`` (inputs already
validated; ``ref=None`` means self mode) and is registered as the ``"reference"`` backend.
"""
from .mining import (
    angular_mining,
    batch_easy_hard_mining,
    batch_hard_mining,
    distance_weighted_mining,
    hdc_mining,
    multi_similarity_mask,
    multi_similarity_thresholds,
    packaged_triplets_mining,
    pair_margin_mining,
    triplet_margin_mining,
    uniform_histogram_mining,
)
from .pair_losses import (
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    n_pairs_loss,
    triplet_margin_loss,
)
from .class_losses import proxy_anchor_class_terms, proxy_anchor_loss, proxy_nca_loss, proxy_nca_row_stats
from .contrastive_losses import __all__ as _CONTRASTIVE_OPS
from .contrastive_losses import *  # noqa: F401,F403 - the contrastive family and its element ops
from .elements import __all__ as _ELEMENT_OPS
from .elements import *  # noqa: F401,F403 - the <loss>_elements ops (loss dicts for non-default reducers)
from .margin_softmax import __all__ as _MARGIN_SOFTMAX_OPS
from .margin_softmax import *  # noqa: F401,F403 - the margin-softmax family and its element ops
from .evaluation import knn
from .row_stats import __all__ as _ROW_STATS_OPS
from .row_stats import *  # noqa: F401,F403 - per-row reduction statistics (<loss>_row_stats)
from .similarity import pairwise_similarity

__all__ = [
    "pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
    "triplet_margin_mining", "multi_similarity_loss", "lifted_structure_loss",
    "generalized_lifted_structure_loss", "n_pairs_loss", "contrastive_loss", "triplet_margin_loss",
    "proxy_nca_loss", "proxy_anchor_loss", "proxy_nca_row_stats", "proxy_anchor_class_terms", "knn",
]
__all__ += _ELEMENT_OPS
__all__ += _CONTRASTIVE_OPS
__all__ += ["pair_margin_mining", "batch_easy_hard_mining", "distance_weighted_mining", "angular_mining",
            "hdc_mining", "uniform_histogram_mining", "packaged_triplets_mining"]
__all__ += _MARGIN_SOFTMAX_OPS
__all__ += _ROW_STATS_OPS

from .seed_methods import __all__ as _SEED_OPS  # noqa: E402
from .seed_methods import *  # noqa: F401,F403,E402 - language guidance, DML-DA (seeds 002 §6.1, 001)
__all__ += _SEED_OPS

from .direction import __all__ as _DIRECTION_OPS  # noqa: E402
from .direction import *  # noqa: F401,F403,E402 - the direction-regularised losses (seed 002 eq. 33–35)
__all__ += _DIRECTION_OPS

from .ranking_losses import __all__ as _RANKING_OPS  # noqa: E402
from .ranking_losses import *  # noqa: F401,F403,E402 - the ranking / histogram family and its element ops
__all__ += _RANKING_OPS

from ..._registry import register  # noqa: E402

for _name in __all__:  # the reference backend: every function here is the op of the same name
    register(_name, "reference")(globals()[_name])

from . import embedding_losses as _embedding_losses  # noqa: E402 - Angular, Instance, Manifold, VICReg

for _name in _embedding_losses.__all__:
    register(_name, "reference")(getattr(_embedding_losses, _name))

from . import proxy_gml  # noqa: E402,F401 - ProxyGML (seed 002 §5.3); the module registers its ops
