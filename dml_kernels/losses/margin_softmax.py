"""The margin-softmax family's modules (PML 2.9's NormalizedSoftmaxLoss, CosFaceLoss, ArcFaceLoss,
LargeMarginSoftmaxLoss, SphereFaceLoss): each owns ``self.W``, an ``nn.Parameter`` of PML's shape
(embedding_size, num_classes) and initialisation (N(0, 1), or ``weight_init_func(W)``), so PML's state_dicts
load with ``strict=True``. ``weight_regularizer=`` sees Wᵀ (C×D), as PML's. Functional forms in
``dml_kernels/functional/margin_softmax.py``.

``process_group=`` (keyword-only; a ``torch.distributed`` group, e.g. ``torch.distributed.group.WORLD``) shards
the weight over the group's ranks: ``W`` holds the columns of this rank's classes (``dk.distributed.shard_range``;
K columns per class for SubCenterArcFace / SoftTriple), the embeddings and labels passed are the local batch and
the loss is the unsharded loss of the global batch (``dk.distributed.sharded_margin_softmax_loss``; default
reducer, no miner, no regularizer). ``sample_rate=`` (with a process group, not P2SGrad): Partial FC's sampling —
the positives of the global batch plus random negatives of each shard, int(sample_rate · shard classes) in all,
drawn on the device from a generator seeded from (``sample_seed``, rank, ``self.sample_step``), the step counting
the calls: the same seed, step and labels give the same classes. ``dk.distributed.gather_full_state_dict`` /
``load_full_state_dict`` move between the shards and PML's full state_dict. ``get_logits`` of a sharded loss
gives the logits of this rank's classes. Under DDP the backbone's gradients are averaged over the ranks, so it
receives 1/W of the global loss's gradient while the shards receive theirs: a backbone learning rate W times the
weight's reproduces single-process training (tests/test_distributed_margin_softmax.py).

Dtype: W becomes float64 (in place, once) for float64 embeddings, as PML's; it is never cast in place for
fp16 / bf16 embeddings (PML casts it permanently).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from ..backends.reference import margin_softmax as _ref
from ..distances import parse_distance
from ..functional import margin_softmax as _fm
from ._base import _MetricLoss


class _WeightLoss(_MetricLoss):
    _has_weight_regularizer = True
    _weight_name = "W"

    def __init__(self, num_classes, embedding_size, *, weight_init_func=None, _columns=None, process_group=None,
                 sample_rate=None, sample_seed=0, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.weight_init_func = weight_init_func
        columns = self.num_classes if _columns is None else _columns
        self._group_size = columns // self.num_classes
        self.process_group, self.sample_rate, self.sample_seed, self.sample_step = _sharding(
            process_group, sample_rate, sample_seed, type(self).__name__)
        if process_group is not None:
            from ..distributed import shard_range

            start, stop = shard_range(self.num_classes, process_group)
            columns = (stop - start) * self._group_size
        setattr(self, self._weight_name, nn.Parameter(torch.empty(self.embedding_size, columns)))
        self.reset_parameters()

    def _weight(self):
        return getattr(self, self._weight_name)

    def _default_init(self, w):
        nn.init.normal_(w)  # PML's WeightMixin default

    def reset_parameters(self):
        if self.weight_init_func is not None:
            self.weight_init_func(self._weight())
        else:
            self._default_init(self._weight())

    def _W_for(self, embeddings):
        w = self._weight()
        if embeddings.dtype == torch.float64 and w.dtype != torch.float64:
            w.data = w.data.double()
        return w

    def _kw(self):
        return dict(backend=self.backend, check_inputs=self.check_inputs)

    def _sharded(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, loss, **params):
        """The loss of the global batch with this rank's shard of the weight (``process_group=``)."""
        from ..distributed import sample_generator, sharded_margin_softmax_loss

        _sharded_inputs(self, embeddings, indices_tuple, ref_emb, ref_labels, self._weight().t())
        generator = None
        if self.sample_rate is not None:
            rank = torch.distributed.get_rank(self.process_group)
            generator = sample_generator(self.sample_seed, rank, self.sample_step, embeddings.device)
            self.sample_step += 1
        return sharded_margin_softmax_loss(embeddings, labels, self._W_for(embeddings), loss=loss,
                                           num_classes=self.num_classes, group_size=self._group_size,
                                           process_group=self.process_group, sample_rate=self.sample_rate,
                                           generator=generator, **self._kw(), **params)


def _sharding(process_group, sample_rate, sample_seed, name):
    if sample_rate is not None:
        if process_group is None:
            raise ValueError(f"{name}: sample_rate needs process_group= (one process: a group of one rank)")
        if not 0 < float(sample_rate) <= 1:
            raise ValueError(f"{name}: sample_rate must be in (0, 1], got {sample_rate}")
    return process_group, None if sample_rate is None else float(sample_rate), int(sample_seed), 0


def _sharded_inputs(module, embeddings, indices_tuple, ref_emb, ref_labels, weight_rows):
    name = type(module).__name__
    if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{name}(process_group=...) takes no indices_tuple / ref_emb / ref_labels")
    red = module._reduction(embeddings, weight_rows)
    if red["reducer"] is not None or red["_extra"]:
        raise ValueError(f"{name}(process_group=...) supports the default reducer only, without regularizers")


class NormalizedSoftmaxLoss(_WeightLoss):
    _default_distance = "dot"
    _op = "normalized_softmax_loss"

    def __init__(self, num_classes, embedding_size, temperature=0.05, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = temperature

    def _distance(self):
        return parse_distance(self.distance, self.normalize_embeddings, default="dot")

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None:
            return self._sharded(embeddings, labels, indices_tuple, ref_emb, ref_labels, self._op,
                                 temperature=float(self.temperature), distance=self._distance())
        return F.normalized_softmax_loss(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb,
                                         ref_labels, temperature=self.temperature, **self._common(),
                                         **self._reduction(embeddings, self.W.t()))

    def get_logits(self, embeddings):
        return _ref.normalized_softmax_logits(embeddings, self.W, temperature=self.temperature,
                                              distance=self._distance())


class _MarginLoss(_WeightLoss):
    _kind = None

    def __init__(self, num_classes, embedding_size, margin, scale, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        _fm._cosine_only(self.distance, type(self).__name__)
        self.margin, self.scale = margin, scale
        self.init_margin()

    def init_margin(self):
        self.margin = _fm._int_margin(self.margin, type(self).__name__)

    def _op_margin(self):
        return self.margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None:
            margin = self._fn_margin()
            if self._kind == "arcface":
                margin = math.radians(margin)
            elif self._kind in ("large_margin", "sphereface"):
                margin = _fm._int_margin(margin, type(self).__name__)
            else:
                margin = float(margin)
            return self._sharded(embeddings, labels, indices_tuple, ref_emb, ref_labels, self._op, margin=margin,
                                 scale=float(self.scale))
        fn = getattr(_fm, self._op)
        return fn(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb, ref_labels,
                  margin=self._fn_margin(), scale=self.scale, distance=self.distance, **self._kw(),
                  **self._reduction(embeddings, self.W.t()))

    def _fn_margin(self):
        return self.margin

    def get_logits(self, embeddings):
        """PML's ``get_logits``: the logits without the margin."""
        return _ref.margin_logits(self._kind, embeddings, None, self.W, margin=self._op_margin(), scale=self.scale)


class LargeMarginSoftmaxLoss(_MarginLoss):
    _op = "large_margin_softmax_loss"
    _kind = "large_margin"

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    _op = "sphereface_loss"
    _kind = "sphereface"


class ArcFaceLoss(_MarginLoss):
    """``self.margin`` is in radians after construction (PML's ``init_margin``); the argument is in degrees."""
    _op = "arcface_loss"
    _kind = "arcface"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def init_margin(self):
        self._degrees = self.margin
        self.margin = math.radians(self.margin)

    def _fn_margin(self):
        return self._degrees if math.radians(self._degrees) == self.margin else math.degrees(self.margin)


class CosFaceLoss(_MarginLoss):
    _op = "cosface_loss"
    _kind = "cosface"

    def __init__(self, *args, margin=0.35, scale=64, **kwargs):
        super().__init__(*args, margin=margin, scale=scale, **kwargs)

    def init_margin(self):
        pass


class SubCenterArcFaceLoss(ArcFaceLoss):
    """PML's SubCenterArcFaceLoss: ``W`` is (embedding_size, num_classes·sub_centers), column c·K + k; the class
    cosine is the max over its K sub-centres. Fused on triton and cpu (grouped columns: the K sub-centres of a
    class in one tile, never a B×C·K buffer)."""
    _op = "subcenter_arcface_loss"

    def __init__(self, num_classes, embedding_size, *, margin=28.6, scale=64, sub_centers=3, **kwargs):
        self.sub_centers = int(sub_centers)
        if self.sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        _WeightLoss.__init__(self, num_classes, embedding_size, _columns=int(num_classes) * self.sub_centers,
                             **kwargs)
        _fm._cosine_only(self.distance, type(self).__name__)
        self.margin, self.scale = margin, scale
        self.init_margin()

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None:
            return self._sharded(embeddings, labels, indices_tuple, ref_emb, ref_labels, self._op,
                                 margin=math.radians(self._fn_margin()), scale=float(self.scale),
                                 sub_centers=self.sub_centers)
        return _fm.subcenter_arcface_loss(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb,
                                          ref_labels, sub_centers=self.sub_centers, margin=self._fn_margin(),
                                          scale=self.scale, distance=self.distance, **self._kw(),
                                          **self._reduction(embeddings, self.W.t()))

    def get_logits(self, embeddings):
        return _ref.subcenter_cosine(embeddings, self.W, self.sub_centers) * self.scale

    def get_outliers(self, embeddings, labels, threshold=75, return_dominant_centers=True):
        """PML's ``get_outliers``: per class in the batch, the dominant sub-centre (argmax for most of its samples,
        ties to the lowest index) and the samples whose cosine to it is below cos(threshold°). Returns
        ``(outliers, dominant_centers)`` — always the tuple, as PML 2.9 does (operator precedence in PML); columns
        of absent classes are 0 (PML leaves them uninitialised)."""
        if self.process_group is not None:
            raise ValueError("SubCenterArcFaceLoss(process_group=...).get_outliers: this rank holds a shard of W; "
                             "use a module with the full weight (dk.distributed.gather_full_state_dict)")
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError("embeddings and labels must have the same number of rows")
        W = self._W_for(embeddings).detach().to(embeddings.dtype)
        cos_threshold = math.cos(math.radians(threshold))
        dominant = torch.zeros(W.shape[0], self.num_classes, dtype=embeddings.dtype, device=embeddings.device)
        outliers = []
        with torch.no_grad():
            x_hat = torch.nn.functional.normalize(embeddings, p=2, dim=1)
            w_hat = torch.nn.functional.normalize(W.t(), p=2, dim=1)
            for label in torch.unique(labels).tolist():
                rows = torch.nonzero(labels == label).flatten()
                centres = W[:, label * self.sub_centers:(label + 1) * self.sub_centers]
                sims = x_hat[rows] @ w_hat[label * self.sub_centers:(label + 1) * self.sub_centers].t()
                best = torch.argmax(torch.bincount(torch.argmax(sims, dim=1)))
                dominant[:, label] = centres[:, best]
                outliers.extend(rows[sims[:, best] < cos_threshold].tolist())
        return torch.tensor(outliers, dtype=torch.long, device=embeddings.device), dominant


class SoftTripleLoss(_WeightLoss):
    """PML's SoftTripleLoss: ``fc`` is (embedding_size, num_classes·centers_per_class), column c·K + k, initialised
    kaiming_uniform_(a=√5) as PML's. ``self.gamma`` is 1/gamma, as PML stores it. Fused on triton and cpu
    (grouped columns)."""
    _op = "soft_triple_loss"
    _weight_name = "fc"
    _default_distance = "cosine"

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01, **kwargs):
        self.centers_per_class = int(centers_per_class)
        super().__init__(num_classes, embedding_size, _columns=int(num_classes) * self.centers_per_class, **kwargs)
        if not parse_distance(self.distance, self.normalize_embeddings, default="cosine").is_similarity:
            raise ValueError("SoftTripleLoss needs a similarity (PML asserts distance.is_inverted)")
        self.la, self.gamma, self.margin = la, 1.0 / gamma, margin

    def _default_init(self, w):
        if self.process_group is None:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        else:  # the bound of kaiming_uniform_(a=√5) on the full D × C·K weight: 1/√(C·K)
            with torch.no_grad():
                w.uniform_(-1.0 / math.sqrt(self.num_classes * self.centers_per_class),
                           1.0 / math.sqrt(self.num_classes * self.centers_per_class))

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None:
            return self._sharded(embeddings, labels, indices_tuple, ref_emb, ref_labels, self._op,
                                 centers_per_class=self.centers_per_class, la=float(self.la),
                                 gamma=1.0 / self.gamma, margin=float(self.margin),
                                 distance=parse_distance(self.distance, self.normalize_embeddings, default="cosine"))
        return _fm.soft_triple_loss(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb, ref_labels,
                                    centers_per_class=self.centers_per_class, la=self.la, gamma=1.0 / self.gamma,
                                    margin=self.margin, **self._common(), **self._reduction(embeddings, self.fc.t()))

    def get_logits(self, embeddings):
        return _ref.soft_triple_logits(embeddings, self.fc, centers_per_class=self.centers_per_class,
                                       gamma=1.0 / self.gamma,
                                       distance=parse_distance(self.distance, self.normalize_embeddings,
                                                               default="cosine"))


class P2SGradLoss(_MetricLoss):
    """PML's P2SGradLoss(descriptors_dim, num_classes): ``weight`` (descriptors_dim, num_classes), U(−1, 1) with unit
    columns; every call re-normalises the columns in place (PML's renorm) and checks their norms (a host sync,
    skipped with check_inputs=False). Fused on cpu / cuda as a D×D Gram (no N×C cosines;
    ``backends/cpp/margin_softmax.py``)."""
    _op = "p2sgrad_loss"

    def __init__(self, descriptors_dim, num_classes, *, process_group=None, **kwargs):
        super().__init__(**kwargs)
        self.descriptors_dim, self.num_classes = int(descriptors_dim), int(num_classes)
        self.process_group = process_group
        columns = self.num_classes
        if process_group is not None:  # this rank's columns (its classes), as the other losses' shards
            from ..distributed import shard_range

            start, stop = shard_range(self.num_classes, process_group)
            columns = stop - start
        self.weight = nn.Parameter(torch.empty(self.descriptors_dim, columns))
        with torch.no_grad():
            self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        w = self.weight
        w.data = w.data.renorm(2, 1, 1e-5).mul(1e5)
        if embeddings.dtype == torch.float64 and w.dtype != torch.float64:
            w.data = w.data.double()
        if self.check_inputs:
            rtol = 1e-2 if embeddings.dtype == torch.float16 else 1e-5
            if not bool(torch.all(torch.abs(w.detach().pow(2).sum(0).pow(0.5) - 1.0) < rtol)):
                raise ValueError("P2SGradLoss: a column of weight does not have unit norm after the renorm (a column "
                                 "with norm < 1e-5 is not rescaled)")
        if self.process_group is not None:
            from ..distributed import sharded_p2sgrad_loss

            _sharded_inputs(self, embeddings, indices_tuple, ref_emb, ref_labels, None)
            return sharded_p2sgrad_loss(embeddings, labels, w, num_classes=self.num_classes, backend=self.backend,
                                        check_inputs=self.check_inputs, process_group=self.process_group)
        return _fm.p2sgrad_loss(embeddings, labels, w, indices_tuple, ref_emb, ref_labels, backend=self.backend,
                                check_inputs=self.check_inputs,
                                **self._reduction(embeddings))
