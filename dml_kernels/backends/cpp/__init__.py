"""C++/CUDA extension backends ("cpu" and "cuda"): importing this package registers their ops.

Map (the same in every backend package; the engines themselves are C++, in ``csrc/``):

* ``loader.py``       — finds the ahead-of-time build or JIT-compiles ``csrc/``; :func:`unavailable_reason`.
* ``library.py``      — fake kernels and autograd of the compiled ops (``torch.library``).
* ``common.py``       — kernel dtype, distance codes, normalisation, pair packing, registration helpers.
* ``similarity.py``   — the similarity matrix and the miners.
* ``pair_losses.py``  — the pair family.
* ``class_losses.py`` — the class-weight family (proxies), and one class shard's statistics.
* ``contrastive_losses.py`` — NCA, SupCon on ``pair_reduce`` (+ O(N) row terms; both also on cuda); Circle,
  ThresholdConsistentMargin, NT-Xent on row blocks (per-row statistics, the gradient formed in the same sweep).
* ``margin_softmax.py`` — NormalizedSoftmax, CosFace, ArcFace, LargeMargin, SphereFace (one ``pair_reduce``:
  target logit and the LSE of the rest per row, then the margin in O(B)), P2SGrad.
* ``row_stats.py``    — per-row reduction statistics of contrastive / triplet elements for a non-default reducer.
* ``row_blocks.py``   — the row-block engine in torch (BLAS tiles of a block of rows × all references, forward
  under no_grad, backward recomputes each block): direction, ProxyGML and other row-local losses.
* ``mining.py``       — per-row miners (batch easy/hard; pair margin as packed bits) in O(block × M), row blocks.
* ``pair_margin_losses.py`` — TupletMargin, Margin (all / given triplets), SNR contrastive on row blocks.
* ``intra_pair_variance.py`` — IntraPairVariance on row blocks (class-sum means, one signed hinge tile per block).
* ``grouped_columns.py`` — SubCenterArcFace, SoftTriple (K centres per class) in O(B × chunk), torch.mm tiles.
* ``pair_terms.py``   — the contrastive family on the ``pair_terms`` op (one engine, loss-specific pair terms of
  ``csrc/pair_terms.h``): the cuda backend's NT-Xent, Circle, ThresholdConsistentMargin, IntraPairVariance,
  TupletMargin, SNR, Margin; device-agnostic, tested on CPU tensors through the op's CPU kernel.
* ``grouped_kernels.py`` — SubCenterArcFace, SoftTriple on the ``grouped_class_rows`` op (cuda backend; the same
  functions tested on CPU tensors).
* ``evaluation.py``   — k-nearest neighbours in O(block × chunk) memory (torch.mm + top-k merge, no C++).
"""
from . import class_losses, contrastive_losses, evaluation, margin_softmax, pair_losses, similarity  # noqa: F401
from . import row_stats  # noqa: F401,E402  (per-row reduction statistics: hinge_stats, triplet_stats)
from .loader import unavailable_reason  # noqa: F401  (the registry's availability hook)
from . import language_guidance  # noqa: F401,E402 - language guidance (seed 002 eq. 29) in O(block × B), torch.mm tiles
from . import ranking_losses  # noqa: F401,E402 - FastAP / RankedList in O(block × N): torch.mm row blocks, per-row statistics
from . import direction, proxy_gml  # noqa: F401,E402 - direction regularisation, ProxyGML in O(block × M): row blocks
from . import mining  # noqa: F401,E402 - per-row miners (batch easy/hard, pair margin) in O(block × M): torch row blocks
from . import pair_margin_losses  # noqa: F401,E402 - TupletMargin, Margin, SNR contrastive in O(block × M): row blocks
from . import intra_pair_variance  # noqa: F401,E402 - IntraPairVariance in O(block × M): one row-block sweep
from . import grouped_columns  # noqa: F401,E402 - SubCenterArcFace / SoftTriple in O(B × chunk): whole-class column chunks
from . import pair_terms  # noqa: F401,E402 - the contrastive family on the pair_terms op (registered for cuda; CPU-tested)
from . import grouped_kernels  # noqa: F401,E402 - SubCenterArcFace / SoftTriple on the grouped_class_rows op (cuda backend)
