"""Miners that return triplets (a, p, n): batch-hard, triplet-margin, distance-weighted, angular, and
already-packaged triplets."""
from __future__ import annotations

import math

import torch

from .. import _registry
from .. import functional as F
from ..distances import parse_distance
from .._validation import check_embeddings, check_labels, check_ref
from ._base import _Miner, _PMLMiner, real


class BatchHardMiner(_Miner):
    """Returns (a, p, n): per anchor with both sets, its hardest positive and hardest negative."""

    _default_distance = "euclidean"

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        hard_pos, hard_neg = F.batch_hard_mining(embeddings, labels, ref_emb, ref_labels, **self._common())
        anchors = torch.where(hard_pos >= 0)[0]
        return anchors, hard_pos[anchors], hard_neg[anchors]


class TripletMarginMiner(_Miner):
    """Returns (a, p, n) with t = D_an − D_ap (similarity: S_ap − S_an): all t ≤ m, hard t ≤ min(m, 0),
    semihard 0 < t ≤ m, easy t > m. Reference implementation only (its output is up to N·M² triplets)."""

    _default_distance = "euclidean"

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        super().__init__(**kwargs)
        if type_of_triplets not in ("all", "hard", "semihard", "easy"):
            raise ValueError(f"type_of_triplets must be 'all', 'hard', 'semihard' or 'easy', got {type_of_triplets!r}")
        self.margin, self.type_of_triplets = margin, type_of_triplets

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        check_embeddings(embeddings, check_values=self.check_inputs)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        ref, ref_labels, _ = check_ref(embeddings, labels, ref_emb, ref_labels, check_values=self.check_inputs)
        dist = parse_distance(self.distance, self.normalize_embeddings, default=self._default_distance)
        return _registry.call("triplet_margin_mining", self.backend, embeddings.device.type, embeddings, labels, ref,
                              ref_labels, margin=float(self.margin), type_of_triplets=self.type_of_triplets,
                              distance=dist)


class DistanceWeightedMiner(_PMLMiner):
    """PML's DistanceWeightedMiner (Wu et al., "Sampling matters", 2017), random (torch's RNG, PML's draws):
    per anchor, as many triplets as its label has references, a uniform positive and a negative drawn with
    weight 1/q(D), the inverse density of distances on the unit sphere (D clamped below at ``cutoff``, zero
    from ``nonzero_loss_cutoff`` up). Needs the default distance (normalised euclidean)."""

    _fixed_distance = "euclidean"

    def __init__(self, cutoff=0.5, nonzero_loss_cutoff=1.4, **kwargs):
        super().__init__(**kwargs)
        self.cutoff = real("cutoff", cutoff)
        self.nonzero_loss_cutoff = real("nonzero_loss_cutoff", nonzero_loss_cutoff)

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        self._resolve_distance()
        return self._call("distance_weighted_mining", embeddings, labels, ref, ref_labels,
                          cutoff=real("cutoff", self.cutoff),
                          nonzero_loss_cutoff=real("nonzero_loss_cutoff", self.nonzero_loss_cutoff))


class AngularMiner(_PMLMiner):
    """PML's AngularMiner: every triplet whose angle at the negative, atan(‖a − p‖ / (2‖n − (a + p)/2‖)),
    exceeds ``angle`` degrees (stored in radians as ``self.angle``, as in PML), measured — as in PML — on the
    raw embeddings. Needs the default distance (normalised euclidean)."""

    _fixed_distance = "euclidean"

    def __init__(self, angle=20, **kwargs):
        super().__init__(**kwargs)
        self.angle = math.radians(real("angle", angle))

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        self._resolve_distance()
        return self._call("angular_mining", embeddings, labels, ref, ref_labels, angle=real("angle", self.angle))


class EmbeddingsAlreadyPackagedAsTriplets(_PMLMiner):
    """PML's EmbeddingsAlreadyPackagedAsTriplets: the batch is (anchor, positive, negative) row triples, so
    the triplets are rows (0, 1, 2), (3, 4, 5), ... Labels are not read (and may be None); the batch size must
    be a multiple of 3. The indices are on the embeddings' device (PML creates them on the CPU)."""

    def mine(self, embeddings, labels=None, ref_emb=None, ref_labels=None):
        check_embeddings(embeddings, check_values=False)
        if embeddings.shape[0] % 3:
            raise ValueError(f"embeddings has {embeddings.shape[0]} rows; EmbeddingsAlreadyPackagedAsTriplets needs "
                             "a multiple of 3 (anchor, positive, negative, anchor, ...)")
        return self._call("packaged_triplets_mining", embeddings)

    def forward(self, embeddings, labels=None, ref_emb=None, ref_labels=None):
        return super().forward(embeddings, labels, ref_emb, ref_labels)
