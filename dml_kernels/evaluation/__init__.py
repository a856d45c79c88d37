"""``dk.evaluation``: retrieval and clustering metrics on the fused k-nearest-neighbour op.

* :class:`AccuracyCalculator` — PML 2.9's class (name, constructor arguments, ``get_accuracy``, result keys,
  numbers), plus ``recall_at_k=(1, 2, 4, 8)`` for the papers' Recall@K (``accuracy_calculator.py``);
* :func:`knn` / :class:`FusedKNN` — the k nearest references of every query through the backend registry;
  the ``cpu`` and ``triton`` backends never form the N×M matrix (``knn.py``);
* :class:`KMeans`, :func:`nmi`, :func:`ami` — k-means from faiss (when installed) or scikit-learn, and
  scikit-learn's clustering scores (``clustering.py``).
"""
from .accuracy_calculator import AccuracyCalculator
from .clustering import KMeans, ami, nmi
from .knn import FusedKNN, knn

__all__ = ["AccuracyCalculator", "FusedKNN", "KMeans", "knn", "nmi", "ami"]
