"""Triton backend: importing this package registers its ops with the registry (``dml_kernels._registry``).

Map (the same in every backend package):

* ``tiles.py``        — the tile vocabulary both engines share: dot tiles over D chunks, fused normalisation
  scales, masked 64-bit-offset loads and stores, the online log-sum-exp update.
* ``pair_engine.py``  — the tiled N×M engine: query-row blocks × reference tiles, masks, online LSE,
  one gradient kernel (row form for queries, column form for a reference set) a loss plugs its tile
  gradient into.
* ``class_engine.py`` — the N×C engine of the class-weight losses: row LSEs over class (proxy) tiles,
  column LSEs per class block, the gradient kernel for both sides.
* ``similarity.py``   — the materialised similarity matrix and batch-hard mining.
* ``mining.py``       — the per-row miners on the pair engine: batch easy/hard, pair margin as packed bits.
* ``pair_losses.py``  — registers the pair family; each loss's epilogue is its own file
  (``multi_similarity.py``, ``lifted_structure.py``, ``contrastive.py``, ``n_pairs.py``, ``triplet.py``).
* ``class_losses.py`` — the class-weight family (ProxyNCA, Proxy Anchor): autograd Functions + launches.
* ``row_stats.py``     — per-row statistics of contrastive / triplet elements for a non-default reducer.
* ``knn.py``          — the k-NN op of ``dk.evaluation``: a similarity tile and a running per-row top-k.
* ``proxy_gml.py``    — ProxyGML on the class engine: a per-row top-K selection pass, grouped-column class
  sums and an online LSE over the active classes, backward by recomputation.
* ``contrastive_losses.py`` — the contrastive family (NT-Xent, SupCon, NCA, Circle, TCM, IPV) on the pair engine.
* ``margin_softmax.py`` — the margin-softmax family on the class engine (target-logit epilogue, grouped centres).
* ``ranking_losses.py`` — FastAP, RankedList, HistogramLoss: per-row (or global) histograms on the pair engine.
* ``direction.py``, ``direction_triplet.py``, ``language_guidance.py`` — the seeds' methods (two dot tiles per tile).
* ``aot_check.py``    — compiles every kernel variant for a GPU architecture without a GPU (``aot_fused.py``: the
  launches of the later families; ``aot_signatures.py``: their Triton signatures).
"""
import triton  # noqa: F401  (a clear ImportError if triton is missing)

from . import class_losses, knn, pair_losses, similarity  # noqa: F401,E402
from . import direction  # noqa: F401,E402 - the direction-regularised losses (seed 002 eq. 33–35)
from . import language_guidance  # noqa: F401,E402 - language-guidance distillation (seed 002 eq. 29), two dot tiles per tile
from . import proxy_gml  # noqa: F401,E402 - ProxyGML on the class engine (selection, grouped sums, LSE)
from . import row_stats  # noqa: F401,E402  (per-row reduction statistics: <loss>_row_stats)
from . import ranking_losses  # noqa: F401,E402 - FastAP: per-row soft histograms on the pair engine
from . import contrastive_losses  # noqa: F401,E402 - NT-Xent, SupCon, NCA, Circle, TCM, IPV: row statistics on the pair engine
from . import margin_softmax  # noqa: F401,E402 - the margin-softmax family on the class engine (target-logit epilogue, grouped centres)
from . import pair_margin_losses  # noqa: F401,E402 - TupletMargin, MarginLoss, SNR contrastive: row statistics on the pair engine
from . import mining  # noqa: F401,E402 - per-row miners (batch easy/hard, pair margin) on the pair engine, packed bits
