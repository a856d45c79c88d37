"""The class-weight family's modules: losses that own per-class weights (``nn.Parameter``); functional forms
in ``dml_kernels/functional/class_losses.py``."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ..distances import parse_distance
from ._base import _MetricLoss


class _ProxyLoss(_MetricLoss):
    """A loss that owns its proxies: ``self.proxies`` is an ``nn.Parameter`` (num_classes × embedding_size).
    ``weight_regularizer=`` (PML's WeightRegularizerMixin) is applied to the proxies (C × D).

    ``process_group=`` (keyword-only; a ``torch.distributed`` group, e.g. ``torch.distributed.group.WORLD``)
    shards the proxies over the group's ranks: ``self.proxies`` holds this rank's rows
    (``dk.distributed.shard_range``), the embeddings and labels passed are the local batch, and the loss is the
    unsharded loss of the global batch (``dk.distributed.sharded``). ``dk.distributed.gather_full_weight``
    rebuilds the full C × D weight; ``shard_rows`` cuts a full (PML) weight for ``load_state_dict``.

    Dtype: the proxies are never cast in place for fp16 / bf16 embeddings (PML #293, #309); for float64
    embeddings they become float64 on the first such call, as PML's do (a float64 run is an accuracy check).
    """

    _has_weight_regularizer = True

    def __init__(self, num_classes, embedding_size, *, process_group=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.process_group = process_group
        rows = self.num_classes
        if process_group is not None:
            from ..distributed import shard_range

            start, stop = shard_range(self.num_classes, process_group)
            rows = stop - start
        self.proxies = nn.Parameter(torch.empty(rows, self.embedding_size))
        self.reset_parameters()

    def _proxies_for(self, embeddings):
        """The proxies, made float64 (in place, once) when the embeddings are float64 — PML's cast_types in
        float64 only."""
        if embeddings.dtype == torch.float64 and self.proxies.dtype != torch.float64:
            self.proxies.data = self.proxies.data.double()
        return self.proxies

    def _sharded(self, fn, embeddings, labels, indices_tuple, ref_emb, ref_labels, **kw):
        if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
            raise ValueError(f"{type(self).__name__}(process_group=...) takes no indices_tuple / ref_emb / ref_labels")
        red = self._reduction(embeddings, self.proxies)
        if red["reducer"] is not None or red["_extra"]:
            raise ValueError(f"{type(self).__name__}(process_group=...) supports the default reducer only, without "
                             "regularizers")
        return fn(embeddings, labels, self._proxies_for(embeddings), num_classes=self.num_classes,
                  process_group=self.process_group, **self._common(), **kw)

    def get_logits(self, embeddings):
        """PML's ``get_logits``: the distance / similarity matrix of embeddings against the proxies. It is
        materialised by definition, so with ``backend="auto"`` it is computed as PML computes it (the
        distance's own class: normalise, then a matmul or ``torch.cdist``) — the fused path rounds differently
        (up to 4.8e-7 in float32, where PML's own test allows 1e-8). An explicit backend is used as given."""
        proxies = self.proxies.to(embeddings.dtype)
        if self.backend == "auto":
            dist = self.distance if isinstance(self.distance, nn.Module) else parse_distance(
                self.distance, self.normalize_embeddings, default=self._default_distance).as_module()
            return dist(embeddings, proxies)
        return F.pairwise_similarity(embeddings, proxies, self.distance or self._default_distance,
                                     normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                                     check_inputs=self.check_inputs)


class ProxyNCALoss(_ProxyLoss):
    _default_distance = "squared_euclidean"
    _op = "proxy_nca_loss"

    def __init__(self, num_classes, embedding_size, softmax_scale=1, *, exclude_positive=False, direction_gamma=0,
                 sample_rate=None, sample_seed=0, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.softmax_scale, self.exclude_positive = softmax_scale, exclude_positive
        self.direction_gamma = direction_gamma  # ≠ 0: the direction regulariser (seed 002 eq. 35)
        # Partial FC (with process_group=): positives + random negatives of each shard, reproducible from
        # (sample_seed, rank, sample_step) — as the margin-softmax family's sample_rate=
        if sample_rate is not None:
            if self.process_group is None:
                raise ValueError(f"{type(self).__name__}: sample_rate needs process_group= (one process: a group of "
                                 "one rank)")
            if not 0 < float(sample_rate) <= 1:
                raise ValueError(f"{type(self).__name__}: sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.sample_seed, self.sample_step = int(sample_seed), 0

    def reset_parameters(self):
        nn.init.normal_(self.proxies)  # PML's default weight_init_func for ProxyNCALoss

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None and self.direction_gamma:
            raise ValueError("ProxyNCALoss(direction_gamma=...) with process_group= (sharded proxies) is not "
                             "implemented; use one of them")
        if self.process_group is not None:
            from ..distributed import sample_generator, sharded_proxy_nca_loss

            sampling = {}
            if self.sample_rate is not None:
                import torch.distributed as dist

                rank = dist.get_rank(self.process_group)
                sampling = dict(sample_rate=self.sample_rate, generator=sample_generator(
                    self.sample_seed, rank, self.sample_step, embeddings.device))
                self.sample_step += 1
            return self._sharded(sharded_proxy_nca_loss, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                 softmax_scale=self.softmax_scale, exclude_positive=self.exclude_positive, **sampling)
        if self.direction_gamma:
            return F.direction_proxy_nca_loss(
                embeddings, labels, self._proxies_for(embeddings), indices_tuple, ref_emb, ref_labels,
                direction_gamma=self.direction_gamma, softmax_scale=self.softmax_scale,
                exclude_positive=self.exclude_positive, **self._common(), **self._reduction(embeddings, self.proxies))
        return F.proxy_nca_loss(embeddings, labels, self._proxies_for(embeddings), indices_tuple, ref_emb, ref_labels,
                                softmax_scale=self.softmax_scale, exclude_positive=self.exclude_positive,
                                **self._common(), **self._reduction(embeddings, self.proxies))


class ProxyNCAPlusPlusLoss(ProxyNCALoss):
    """ProxyNCA++ (Teh et al. 2020): ProxyNCA at temperature T, i.e. softmax_scale = 1/T."""

    def __init__(self, num_classes, embedding_size, temperature=1 / 9, **kwargs):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(num_classes, embedding_size, softmax_scale=1.0 / temperature, **kwargs)
        self.temperature = temperature


class ProxyAnchorLoss(_ProxyLoss):
    _op = "proxy_anchor_loss"

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.alpha = margin, alpha

    def reset_parameters(self):
        # PML's init, kaiming_normal_(mode="fan_out") of the C × D weight: std sqrt(2 / C) — from the full C,
        # also when this rank holds a shard of it.
        with torch.no_grad():
            self.proxies.normal_(0.0, (2.0 / self.num_classes) ** 0.5)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.process_group is not None:
            from ..distributed import sharded_proxy_anchor_loss

            return self._sharded(sharded_proxy_anchor_loss, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                 margin=self.margin, alpha=self.alpha)
        return F.proxy_anchor_loss(embeddings, labels, self._proxies_for(embeddings), indices_tuple, ref_emb, ref_labels,
                                   margin=self.margin, alpha=self.alpha, **self._common(),
                                   **self._reduction(embeddings, self.proxies))
