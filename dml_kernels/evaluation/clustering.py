"""k-means and the clustering scores, from libraries (nothing hand-written here).

:class:`KMeans` is the default ``kmeans_func`` of :class:`~dml_kernels.evaluation.AccuracyCalculator`:
faiss's k-means when faiss is installed (what PML's default ``FaissKMeans(niter=20)`` runs), else
scikit-learn's ``KMeans``. NMI / AMI are scikit-learn's ``normalized_mutual_info_score`` /
``adjusted_mutual_info_score``.
"""
from __future__ import annotations

import numpy as np
import torch


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


class KMeans:
    """``kmeans_func(x, num_clusters) -> cluster index per row`` (int64, on x's device).

    ``library="auto"`` uses faiss when it imports, else scikit-learn; ``"faiss"`` / ``"sklearn"`` force one.
    ``niter`` is faiss's iteration count (scikit-learn runs to convergence, at most ``max_iter``); ``seed``
    makes either deterministic."""

    def __init__(self, niter=20, seed=0, library="auto", max_iter=300, gpu=False):
        if library not in ("auto", "faiss", "sklearn"):
            raise ValueError(f"library must be 'auto', 'faiss' or 'sklearn', got {library!r}")
        if library == "faiss" and _faiss() is None:
            raise ImportError("KMeans(library='faiss') needs faiss (pip install faiss-cpu)")
        self.niter, self.seed, self.library, self.max_iter, self.gpu = niter, seed, library, max_iter, gpu

    def __call__(self, x, num_clusters):
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        data = np.ascontiguousarray((x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x),
                                    dtype=np.float32)
        faiss = _faiss() if self.library != "sklearn" else None
        if faiss is not None:
            km = faiss.Kmeans(data.shape[1], int(num_clusters), niter=self.niter, seed=self.seed, gpu=self.gpu)
            km.train(data)
            _, assign = km.index.search(data, 1)
            assign = assign[:, 0]
        else:
            from sklearn.cluster import KMeans as SKKMeans

            assign = SKKMeans(n_clusters=int(num_clusters), n_init="auto", max_iter=self.max_iter,
                              random_state=self.seed).fit_predict(data)
        return torch.as_tensor(np.asarray(assign, dtype=np.int64), device=device)

    def __repr__(self):
        lib = self.library if self.library != "auto" else ("faiss" if _faiss() is not None else "sklearn")
        return f"KMeans(library={lib!r}, seed={self.seed})"


def nmi(labels, cluster_labels) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(_np(labels), _np(cluster_labels)))


def ami(labels, cluster_labels) -> float:
    from sklearn.metrics import adjusted_mutual_info_score

    return float(adjusted_mutual_info_score(_np(labels), _np(cluster_labels)))


def _np(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
