"""``dk.distributed``: losses over the global batch of a ``torch.distributed`` job, and class weights
sharded across its ranks.

``DistributedLossWrapper(loss, efficient=False)`` and ``DistributedMinerWrapper(miner, efficient=False)``
have PML 2.9's arguments and values: the loss is computed on the gathered global batch (or, with
``efficient=True``, the local queries against the gathered references) and multiplied by the world
size, so that DDP's gradient averaging gives each rank the gradient of one global loss.

Built on ``torch.distributed`` collectives only (NCCL on GPUs, gloo on CPUs — nothing backend-specific
here). Differences from PML, deliberate (README, each tested in ``tests/test_distributed.py``):

* The gathered batch is in **rank order** on every rank (PML puts the local rows first, so every rank
  sees a different order: PML #639). A user ``indices_tuple`` keeps PML's meaning — it indexes PML's
  local-first gathered order — and is translated.
* The all-gather **carries autograd**: the gradient of every gathered copy is summed over the ranks
  (one all-reduce) and divided by the world size, then returned to the copy's owner. In the default
  mode this gives exactly PML's gradients; with ``efficient=True`` it also returns the gradient each
  rank's loss has with respect to *other* ranks' rows (PML drops it), so DDP-averaged gradients equal
  the gradient of the mean of the ranks' losses — single-process training of that loss.
* Local batch sizes may differ between ranks (PML's all_gather needs equal shapes): the sizes are
  exchanged first (one small all-gather and a host read of W integers), rows are padded to the largest.

Class-sharded weights (``sharded.py``): ``sharded_proxy_nca_loss`` / ``sharded_proxy_anchor_loss`` (and
``process_group=`` on the class-weight losses) — rank r holds rows [r·⌈C/W⌉, (r+1)·⌈C/W⌉) of the weights;
the embeddings are gathered, each rank computes its shard's per-row (ProxyNCA) or per-class (Proxy Anchor)
statistics with the fused kernels, and O(B_global) values are merged across ranks: the result is exactly
the unsharded loss of the global batch. ``shard_rows`` / ``gather_full_weight`` move between a PML-shaped
full weight and the shards.

The margin-softmax family (``process_group=`` on NormalizedSoftmax, CosFace, ArcFace, LargeMarginSoftmax,
SphereFace, SubCenterArcFace, SoftTriple, P2SGrad; ``sharded_margin_softmax_loss`` / ``sharded_p2sgrad_loss``):
the weight has PML's D×C·K layout, so a shard is the block of columns of the rank's classes
(``shard_columns``; ``gather_full_weight(..., dim=1)``). Each rank computes per row of the global batch the
target logit (margin applied, on the rank owning the target class) and the LSE of its shard's other logits
(op ``margin_softmax_row_stats``), merged with an all-reduce MAX and one all-reduce SUM of 2·B_global values.
``sample_rate=`` (Partial FC): every positive class plus random negatives of the shard, drawn on the device
(``sample_classes``). ``gather_full_state_dict`` / ``load_full_state_dict`` convert a sharded module's
state_dict to / from PML's full one (both families).

Modules: ``collectives.py`` (all-gather and all-reduce with autograd), ``wrappers.py``, ``sharded.py``.
"""
from .collectives import all_gather, all_reduce_sum, is_distributed
from .sharded import gather_full_weight, shard_range, shard_rows, sharded_proxy_anchor_loss, sharded_proxy_nca_loss
from .wrappers import DistributedLossWrapper, DistributedMinerWrapper
from .sharded import (gather_full_state_dict, load_full_state_dict, sample_classes, sample_generator, shard_columns,
                      sharded_margin_softmax_loss, sharded_p2sgrad_loss)

__all__ = ["DistributedLossWrapper", "DistributedMinerWrapper", "all_gather", "all_reduce_sum", "is_distributed",
           "shard_range", "shard_rows", "gather_full_weight", "sharded_proxy_nca_loss", "sharded_proxy_anchor_loss"]
__all__ += ["shard_columns", "sample_classes", "sample_generator", "sharded_margin_softmax_loss", "sharded_p2sgrad_loss",
            "gather_full_state_dict", "load_full_state_dict"]
