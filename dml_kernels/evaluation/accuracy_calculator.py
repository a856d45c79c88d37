"""``AccuracyCalculator``: PML 2.9's retrieval and clustering metrics on the fused k-NN.

Same class name, constructor arguments, ``get_accuracy`` signature, result keys and numbers as PML's
``pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator``:

* ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``, ``mean_average_precision``,
  ``mean_reciprocal_rank`` from the k nearest references of every query, and ``NMI`` / ``AMI`` from k-means
  on the queries;
* ``reference=None`` (or ``ref_includes_query=True``): the queries are (the first rows of) the reference set
  and a query's own row is not its neighbour;
* R (the relevance cut of R-precision and MAP@R) is the number of references sharing the query's label,
  minus one when the query is among them; queries whose label has no other reference ("lone" queries, e.g.
  a class with one sample in a same-set evaluation) are left out of the k-NN metrics, and a metric with no
  query left is NaN;
* ``k``: ``None`` (PML 2.9's default: every reference), ``"max_bin_count"`` (the largest R: enough for
  R-precision and MAP@R, and much cheaper) or an int;
* ``avg_of_avgs`` (mean of the per-class means) and ``return_per_class`` (the per-class means, ordered by
  label);
* the extension points: a subclass's ``calculate_<name>(**kwargs)`` method is a metric (``requires_knn`` /
  ``requires_clustering`` say what it needs); the keyword arguments carry PML's names (``knn_labels``,
  ``query_labels``, ``not_lone_query_mask``, ``label_counts``, ``cluster_labels``, ...).

Extra keyword-only arguments: ``recall_at_k=(1, 2, 4, 8)`` adds ``recall_at_1``, ``recall_at_2``, ... (the
fraction of queries with a same-label reference among their K nearest — the Recall@K of the metric
learning papers; lone queries are left out as above, so ``recall_at_1 == precision_at_1``), and
``backend=`` for the default ``knn_func``.

Defaults that differ from PML only where PML needs faiss: the default ``knn_func`` is :class:`FusedKNN`
(squared L2 on the raw embeddings, the ranking of PML's default ``FaissKNN``), the default ``kmeans_func``
is :class:`~dml_kernels.evaluation.clustering.KMeans` (faiss when installed, else scikit-learn).
``mean_reciprocal_rank`` and ``recall_at_*`` count as k-NN metrics (PML 2.9 leaves ``mean_reciprocal_rank``
out of ``requires_knn``, so asking for it alone fails there). Labels are compared as given (PML first casts
them to float32, which merges integer labels above 2**24).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from . import clustering
from .knn import FusedKNN

LOGGER = logging.getLogger("dml_kernels.evaluation")

_KNN_METRICS = ("precision_at_1", "mean_average_precision", "mean_average_precision_at_r", "r_precision",
                "mean_reciprocal_rank")
_R_METRICS = ("r_precision", "mean_average_precision_at_r")


def _as_tensor(v, device):
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    elif not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    return v.to(device)


class AccuracyCalculator:
    def __init__(self, include=(), exclude=(), avg_of_avgs=False, return_per_class=False, k=None,
                 label_comparison_fn=None, device=None, knn_func=None, kmeans_func=None, *, recall_at_k=(),
                 backend="auto"):
        self.recall_at_k = tuple(recall_at_k)
        if any(not isinstance(K, int) or isinstance(K, bool) or K < 1 for K in self.recall_at_k):
            raise ValueError(f"recall_at_k must hold positive integers, got {recall_at_k!r}")
        self.function_keyword = "calculate_"
        every = {name[len(self.function_keyword):]: getattr(self, name) for name in dir(self)
                 if name.startswith(self.function_keyword)}
        for K in self.recall_at_k:
            every[f"recall_at_{K}"] = functools.partial(self._calculate_recall_at, K=K)
        self.original_function_dict = every
        self.check_primary_metrics(include, exclude)
        self.original_function_dict = self.get_function_dict(include, exclude)
        self.curr_function_dict = self.get_function_dict()

        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        self.avg_of_avgs = avg_of_avgs
        self.return_per_class = return_per_class

        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.knn_func = FusedKNN(backend=backend) if knn_func is None else knn_func
        self.kmeans_func = clustering.KMeans(niter=20, gpu=self.device.type == "cuda") if kmeans_func is None \
            else kmeans_func

        if not ((isinstance(k, int) and not isinstance(k, bool) and k > 0) or k in (None, "max_bin_count")):
            raise ValueError("k must be an integer greater than 0, or None, or 'max_bin_count'")
        self.k = k

        self.label_comparison_fn = label_comparison_fn
        if label_comparison_fn is not None and any(m in self.requires_clustering() for m in self.get_curr_metrics()):
            raise NotImplementedError("Unsupported: clustering + custom label comparison")

    # ----------------------------------------------------------------------------------- metric sets

    def get_function_dict(self, include=(), exclude=()):
        names = list(include) if len(include) else list(self.original_function_dict)
        return {k: v for k, v in self.original_function_dict.items() if k in names and k not in exclude}

    def get_curr_metrics(self):
        return list(self.curr_function_dict)

    def requires_clustering(self):
        return ["NMI", "AMI"]

    def requires_knn(self):
        return list(_KNN_METRICS) + [f"recall_at_{K}" for K in self.recall_at_k]

    def check_primary_metrics(self, include=(), exclude=()):
        known = list(self.original_function_dict)
        for names in (include, exclude):
            if not isinstance(names, (tuple, list)):
                raise TypeError(f"Arguments must be of type tuple, not {type(names)}.")
            if not set(names) <= set(known):
                raise ValueError(f"Primary metrics must be one or more of: {known}.")

    def description(self):
        return "avg_of_avgs" if self.avg_of_avgs else ""

    # ------------------------------------------------------------------------------------- k and labels

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        """The number of neighbours the k-NN metrics are computed from (PML's rule)."""
        own = int(ref_includes_query)
        largest = int(bin_counts.max().item()) if bin_counts.numel() else 0
        if self.k == "max_bin_count":
            return largest - own
        if self.k is None:
            return num_reference_embeddings - own
        if self.k < largest and set(self.get_curr_metrics()) & set(_R_METRICS):
            LOGGER.warning(f"k={self.k} is less than the largest number of references of one label ({largest}): "
                           f"{sorted(set(self.get_curr_metrics()) & set(_R_METRICS))} will be wrong; use "
                           "k='max_bin_count' (or 'mean_average_precision' for MAP@k)")
        return self.k

    def _same(self, query_labels, knn_labels):
        """N×k: does neighbour j of query i share its label (per ``label_comparison_fn``)?"""
        q = query_labels[:, None]
        if self.label_comparison_fn is not None:
            return self.label_comparison_fn(q, knn_labels).bool()
        eq = q == knn_labels
        return eq.reshape(eq.shape[0], eq.shape[1], -1).all(-1) if eq.dim() > 2 else eq

    def _label_counts(self, query_labels, reference_labels):
        """(sorted unique query labels, references per label, label index of every query)."""
        unique, inverse = torch.unique(query_labels, dim=0, return_inverse=True)
        if self.label_comparison_fn is None:
            eq = unique[:, None] == reference_labels[None]
            eq = eq.reshape(eq.shape[0], eq.shape[1], -1).all(-1) if eq.dim() > 2 else eq
            counts = eq.sum(1)
        else:
            counts = torch.stack([self.label_comparison_fn(unique[i:i + 1], reference_labels).sum()
                                  for i in range(len(unique))]).long() if len(unique) else \
                torch.zeros(0, dtype=torch.long, device=query_labels.device)
        return unique, counts, inverse

    def _lone(self, unique, counts, inverse, ref_includes_query):
        """(labels with no other reference, mask of the queries that are not lone)."""
        if ref_includes_query:
            if self.label_comparison_fn is None:
                itself = torch.ones_like(counts)
            else:
                itself = self.label_comparison_fn(unique, unique).long()
                itself = itself.reshape(itself.shape[0], -1).all(-1).long() if itself.dim() > 1 else itself
            lone = counts - itself <= 0
        else:
            lone = counts == 0
        return unique[lone], ~lone[inverse]

    # -------------------------------------------------------------------------------------- get_accuracy

    def get_accuracy(self, query, query_labels, reference=None, reference_labels=None, ref_includes_query=False,
                     include=(), exclude=()):
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        # PML evaluates float32 embeddings (``.type(torch.float)``); labels keep their dtype here.
        query, reference = (_as_tensor(t, self.device).float() for t in (query, reference))
        query_labels, reference_labels = (_as_tensor(t, self.device) for t in (query_labels, reference_labels))
        if len(query) != len(query_labels) or len(reference) != len(reference_labels):
            raise ValueError("embeddings and labels must have the same length")
        n = len(query)
        if ref_includes_query and not (len(reference) >= n and torch.allclose(query, reference[:n])
                                       and torch.equal(query_labels, reference_labels[:n])):
            raise ValueError("When ref_includes_query is True, the first len(query) elements of reference must be "
                             "equal to query.\nLikewise, the first len(query_labels) elements of reference_labels "
                             "must be equal to query_labels.\n")

        self.curr_function_dict = self.get_function_dict(include, exclude)
        metrics = self.get_curr_metrics()
        kwargs = {"query": query, "reference": reference, "query_labels": query_labels,
                  "reference_labels": reference_labels, "ref_includes_query": ref_includes_query,
                  "label_comparison_fn": self.label_comparison_fn}

        if any(m in self.requires_knn() for m in metrics):
            unique, counts, inverse = self._label_counts(query_labels, reference_labels)
            lone_labels, not_lone = self._lone(unique, counts, inverse, ref_includes_query)
            available = len(reference) - int(ref_includes_query)
            num_k = min(self.determine_k(counts, len(reference), ref_includes_query), available)
            wanted = [K for K in self.recall_at_k if f"recall_at_{K}" in metrics]
            search_k = min(max([num_k] + wanted), available)
            distances, indices = self.knn_func(query, search_k, reference, ref_includes_query)
            knn_labels = reference_labels[indices]
            if not bool(not_lone.any()):
                LOGGER.warning("None of the query labels are in the reference set.")
            kwargs.update(label_counts=(unique, counts), knn_labels=knn_labels[:, :num_k],
                          knn_distances=distances[:, :num_k], lone_query_labels=lone_labels,
                          not_lone_query_mask=not_lone, _knn_labels_all=knn_labels, _label_index=inverse,
                          _ranking={})

        if any(m in self.requires_clustering() for m in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)

        return self._get_accuracy(self.curr_function_dict, **kwargs)

    def _get_accuracy(self, function_dict, **kwargs):
        return {name: fn(**kwargs) for name, fn in function_dict.items()}

    def get_cluster_labels(self, query, query_labels, **kwargs):
        return self.kmeans_func(query, len(torch.unique(query_labels.flatten())))

    # --------------------------------------------------------------------------------- per-query scores

    def _ranking(self, kwargs):
        """Shared per-query quantities of the k-NN metrics, over the non-lone queries (computed once)."""
        cache = kwargs["_ranking"]
        if not cache:
            keep = kwargs["not_lone_query_mask"]
            labels = kwargs["query_labels"][keep]
            same_all = self._same(labels, kwargs["_knn_labels_all"][keep])
            k = kwargs["knn_labels"].shape[1]
            # R: references sharing the label, minus the query's own row when it is among them.
            r = kwargs["label_counts"][1][kwargs["_label_index"][keep]] - int(kwargs["ref_includes_query"])
            cache.update(labels=labels, same=same_all[:, :k], same_all=same_all, r=r, empty=labels.shape[0] == 0)
        return cache

    def _average(self, per_query, labels):
        """PML's reduction: the mean over queries, or per class (mean of class means / the list)."""
        if not (self.avg_of_avgs or self.return_per_class):
            return torch.mean(per_query).item()
        _, cls = torch.unique(labels, dim=0, return_inverse=True)
        sums = torch.zeros(int(cls.max().item()) + 1, dtype=per_query.dtype, device=per_query.device)
        sums.index_add_(0, cls, per_query)
        per_class = sums / torch.bincount(cls, minlength=len(sums)).to(per_query.dtype)
        return per_class.cpu().tolist() if self.return_per_class else torch.mean(per_class).item()

    def _knn_metric(self, kwargs, score):
        rk = self._ranking(kwargs)
        if rk["empty"]:
            n = len(kwargs["label_counts"][0])
            return [float("nan")] * n if self.return_per_class else float("nan")
        return self._average(score(rk), rk["labels"])

    @staticmethod
    def _precision_weighted(same, r, at_r):
        """Σ_j hit_j · precision@(j+1) / R over the first k (or the first R when ``at_r``) neighbours."""
        k = same.shape[1]
        rank = torch.arange(1, k + 1, device=same.device)
        hits = same & (rank[None, :] <= r[:, None]) if at_r else same
        precision = hits.cumsum(1).double() / rank
        return (precision * hits).sum(1) / r

    # --------------------------------------------------------------------------------------- the metrics

    def calculate_precision_at_1(self, **kwargs):
        return self._knn_metric(kwargs, lambda rk: rk["same"][:, :1].sum(1).double())

    def calculate_r_precision(self, **kwargs):
        def score(rk):
            same, r = rk["same"], rk["r"]
            in_r = torch.arange(1, same.shape[1] + 1, device=same.device)[None, :] <= r[:, None]
            return (same & in_r).sum(1).double() / in_r.sum(1)

        return self._knn_metric(kwargs, score)

    def calculate_mean_average_precision_at_r(self, **kwargs):
        return self._knn_metric(kwargs, lambda rk: self._precision_weighted(rk["same"], rk["r"], True))

    def calculate_mean_average_precision(self, **kwargs):
        return self._knn_metric(kwargs, lambda rk: self._precision_weighted(rk["same"], rk["r"], False))

    def calculate_mean_reciprocal_rank(self, **kwargs):
        def score(rk):
            same = rk["same"]
            if same.shape[1] == 0:
                return torch.zeros(same.shape[0], dtype=torch.float64, device=same.device)
            first = same.int().argmax(1).double() + 1  # the first hit (argmax of a 0/1 row: its first 1)
            return torch.where(same.any(1), 1.0 / first, 0.0)

        return self._knn_metric(kwargs, score)

    def _calculate_recall_at(self, K, **kwargs):
        return self._knn_metric(kwargs, lambda rk: rk["same_all"][:, :K].any(1).double())

    def calculate_NMI(self, query_labels, cluster_labels, **kwargs):
        return clustering.nmi(query_labels, cluster_labels)

    def calculate_AMI(self, query_labels, cluster_labels, **kwargs):
        return clustering.ami(query_labels, cluster_labels)
