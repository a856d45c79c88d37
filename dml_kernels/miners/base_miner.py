"""PML 2.9's ``BaseMiner``, for miners written against PML's API: subclass it, implement ``mine(embeddings,
labels, ref_emb, ref_labels)`` returning an index tuple (and, optionally, ``output_assertion``), and the miner
gets PML's forward: under ``torch.no_grad()``, shape checks, labels moved to the embeddings' device, ``ref_emb``
defaulting to the embeddings, ``mine``, then ``output_assertion`` (which records ``num_triplets`` or
``num_pos_pairs`` / ``num_neg_pairs``). ``distance=`` defaults to ``LpDistance(p=2)`` (an object, as in PML);
``collect_stats=`` and ``add_to_recordable_attributes`` as in PML. Such a miner runs its own code in plain
PyTorch. Every dml_kernels miner counts as an instance of :class:`BaseMiner`, as in PML.
"""
from __future__ import annotations

import torch

from .. import distances as _distances
from ..distances import parse_distance
from ..losses.base_classes import Records, _VirtualBase, check_shapes, set_ref_emb
from ._base import _Miner


class BaseMiner(Records, _Miner, metaclass=_VirtualBase):
    """PML's ``BaseMiner(collect_stats=None, distance=None)`` (plus dk's ``normalize_embeddings`` for a distance
    string, ``backend`` and ``check_inputs``, stored for subclasses that call dk ops)."""

    @staticmethod
    def _virtual(cls):
        return issubclass(cls, _Miner)

    def __init__(self, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self.collect_stats = bool(collect_stats)
        if self.distance is None:
            self.distance = self.get_default_distance()
        elif isinstance(self.distance, str):
            self.distance = parse_distance(self.distance, self.normalize_embeddings, default="euclidean").as_module()
        self.add_to_recordable_attributes(list_of_names=["num_pos_pairs", "num_neg_pairs", "num_triplets"],
                                          is_stat=True)

    def get_default_distance(self):
        return _distances.LpDistance(p=2)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """This has to be implemented: (a, p, n) or (a1, p, a2, n) index tensors."""
        raise NotImplementedError

    def output_assertion(self, output):
        """PML's check of ``mine``'s output: a 3-tuple of equal lengths or a 4-tuple of two equal-length pairs
        of tensors (``TypeError`` otherwise, as in PML; a length mismatch is an ``AssertionError``)."""
        if len(output) == 3:
            self.num_triplets = len(output[0])
            assert self.num_triplets == len(output[1]) == len(output[2]), "triplet index tensors differ in length"
        elif len(output) == 4:
            self.num_pos_pairs, self.num_neg_pairs = len(output[0]), len(output[2])
            assert self.num_pos_pairs == len(output[1]), "positive pair index tensors differ in length"
            assert self.num_neg_pairs == len(output[3]), "negative pair index tensors differ in length"
        else:
            raise TypeError(f"a miner returns (anchors, positives, negatives) or (a1, p, a2, n); got a tuple of "
                            f"{len(output)}")

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self.reset_stats()
        with torch.no_grad():
            check_shapes(embeddings, labels)
            labels = labels.to(embeddings.device)
            ref_emb, ref_labels = set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            output = self.mine(embeddings, labels, ref_emb, ref_labels)
        self.output_assertion(output)
        return output


__all__ = ["BaseMiner"]
