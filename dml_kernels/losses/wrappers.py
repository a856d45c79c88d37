"""PML's loss wrappers: :class:`CrossBatchMemory`, :class:`MultipleLosses`, :class:`SelfSupervisedLoss`
(PML 2.9's names, arguments, state and values). They wrap dml_kernels losses and PML's alike.

CrossBatchMemory's memory is a preallocated ring buffer (``embedding_memory``, ``label_memory``); each step
writes the enqueued rows into it in place (one or two slice copies, no host sync) and the inner loss reads
the filled part of it, a view, as ``ref_emb`` — as in PML, no copy of memory + batch is made. Where PML
hands the inner loss every (query, slot) pair as int64 index tuples (32 bytes per pair, PML #421/#604),
a dml_kernels loss gets a :class:`~dml_kernels.PackedPairMask` (1 bit per pair, built in row chunks), which
MultiSimilarityLoss and GeneralizedLiftedStructureLoss consume on their fused backends.
"""
from __future__ import annotations

import torch
from torch import nn

from .._pairs import PackedPairMask

_XBM_LOSSES = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
               "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
               "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss",
               "TupletMarginLoss")
_SELF_SUPERVISED_LOSSES = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                           "IntraPairVarianceLoss", "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss",
                           "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss", "NCALoss",
                           "TupletMarginLoss")

_MASK_CHUNK = 1 << 22  # (rows × memory slots) per chunk when building the packed all-pairs mask


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """rows × M bool → rows × ceil(M/8) uint8 (bit k % 8 of byte k // 8)."""
    r, m = bits.shape
    nbytes = (m + 7) // 8
    if m % 8:
        bits = torch.cat([bits, bits.new_zeros(r, nbytes * 8 - m)], 1)
    weights = (2 ** torch.arange(8, device=bits.device)).to(torch.uint8)
    return (bits.view(r, nbytes, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _all_pairs_mask(labels, ref_labels, self_cols=None) -> PackedPairMask:
    """Every (query, reference) pair as a PackedPairMask: positives share a label, negatives do not; the
    positive (i, self_cols[i]) of each query i is left out (its own slot in the memory)."""
    n, m = labels.shape[0], ref_labels.shape[0]
    nbytes = (m + 7) // 8
    pos = torch.empty(n, nbytes, dtype=torch.uint8, device=labels.device)
    neg = torch.empty_like(pos)
    rows = max(1, _MASK_CHUNK // max(m, 1))  # transient bool/uint8 chunks of ~4 MiB each
    for s in range(0, n, rows):
        e = min(s + rows, n)
        same = labels[s:e, None] == ref_labels[None, :]
        neg[s:e] = _pack(~same)
        if self_cols is not None:
            same[torch.arange(e - s, device=labels.device), self_cols[s:e]] = False
        pos[s:e] = _pack(same)
    return PackedPairMask(pos, neg, m)


def _is_ours(loss):
    """A dml_kernels loss (or a subclass of one): it takes a PackedPairMask as indices_tuple."""
    return any(c.__module__.startswith("dml_kernels.losses.") for c in type(loss).__mro__)


def _check_support(wrapper, name, names):
    if name not in names:
        raise ValueError(f"{wrapper} not supported for {name}; supported (as in PML): {', '.join(names)}")


class CrossBatchMemory(nn.Module):
    """PML's CrossBatchMemory (XBM): every step enqueues the batch (or the rows picked by ``enqueue_mask``)
    into a ring buffer of ``memory_size`` embeddings, then computes ``loss(queries, labels, indices_tuple,
    memory, memory_labels)`` with every (query, memory slot) pair except each query's own slot (or the pairs
    ``miner(queries, labels, memory, memory_labels)`` returns, with the own slots removed), plus a passed
    ``indices_tuple`` (whose positives / negatives are memory slots, as in PML) appended after them.

    Deliberate differences from PML 2.9 (each tested): an all-False ``enqueue_mask`` leaves the queue
    unfilled (PML marks it filled and compares against the zero-initialised memory); enqueuing more rows
    than ``memory_size`` in one call is a ``ValueError`` also with a mask (PML overwrites within the call);
    a one-row batch has its own slot removed (PML's ``remove_self_comparisons`` misses it at B = 1); an
    unsupported inner loss is a ``ValueError`` (PML: a bare ``Exception``).
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, collect_stats=None):
        super().__init__()
        self.check_loss_support(type(loss).__name__)
        self.loss = loss
        self.miner = miner
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        if self.embedding_size < 1 or self.memory_size < 1:
            raise ValueError(f"embedding_size and memory_size must be positive, got {embedding_size}, {memory_size}")
        self.collect_stats = bool(collect_stats) if collect_stats is not None else False
        self._record_these = ["embedding_size", "memory_size", "queue_idx"]
        self.reset_queue()

    @staticmethod
    def supported_losses():
        return list(_XBM_LOSSES)

    @classmethod
    def check_loss_support(cls, loss_name):
        _check_support("CrossBatchMemory", loss_name, _XBM_LOSSES)

    def reset_queue(self):
        """Fresh zero memory (CPU, float32, as in PML) and an empty queue."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            if len(enqueue_mask) != len(embeddings):
                raise ValueError(f"enqueue_mask has length {len(enqueue_mask)} but the embeddings have "
                                 f"{len(embeddings)} rows")
        elif len(embeddings) > self.memory_size:
            raise ValueError(f"a batch of {len(embeddings)} rows does not fit a memory of {self.memory_size}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be N × {self.embedding_size}, got {tuple(embeddings.shape)}")
        device = embeddings.device
        labels = labels.to(device)
        self._follow(embeddings, labels)

        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device=device, dtype=torch.bool)
            emb_for_queue, labels_for_queue = embeddings[enqueue_mask], labels[enqueue_mask]
            queries, q_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            if len(emb_for_queue) > self.memory_size:
                raise ValueError(f"enqueue_mask selects {len(emb_for_queue)} rows, more than the memory holds "
                                 f"({self.memory_size})")
            remove_self = False
        else:
            emb_for_queue, labels_for_queue = embeddings, labels
            queries, q_labels = embeddings, labels
            remove_self = True

        self.add_to_memory(emb_for_queue, labels_for_queue, len(emb_for_queue))
        if self.has_been_filled:
            e_mem, l_mem = self.embedding_memory, self.label_memory
        else:
            e_mem, l_mem = self.embedding_memory[:self.queue_idx], self.label_memory[:self.queue_idx]
        if len(queries) == 0 or len(e_mem) == 0:
            return torch.sum(embeddings * 0)

        tuple_ = self.create_indices_tuple(queries, q_labels, e_mem, l_mem, indices_tuple, remove_self)
        return self.loss(queries, q_labels, tuple_, e_mem, l_mem)

    def _follow(self, embeddings, labels):
        """The memory follows the embeddings' device and dtype (not under autocast) and the labels' dtype,
        reassigned to the buffers as PML does; in place otherwise."""
        dtype = self.embedding_memory.dtype if torch.is_autocast_enabled() else embeddings.dtype
        if self.embedding_memory.device != embeddings.device or self.embedding_memory.dtype != dtype:
            self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=dtype)
        if self.label_memory.device != labels.device or self.label_memory.dtype != labels.dtype:
            self.label_memory = self.label_memory.to(device=labels.device, dtype=labels.dtype)

    def add_to_memory(self, embeddings, labels, batch_size):
        """Write the rows at ``queue_idx`` onwards (wrapping), as slice copies; ``curr_batch_idx`` = their slots."""
        q, m = self.queue_idx, self.memory_size
        self.curr_batch_idx = torch.arange(q, q + batch_size, device=labels.device) % m
        first = min(batch_size, m - q)
        with torch.no_grad():
            self.embedding_memory[q:q + first] = embeddings[:first].detach()
            self.label_memory[q:q + first] = labels[:first]
            if batch_size > first:
                self.embedding_memory[:batch_size - first] = embeddings[first:].detach()
                self.label_memory[:batch_size - first] = labels[first:]
        self.queue_idx = (q + batch_size) % m
        if batch_size > 0 and not self.has_been_filled and self.queue_idx <= q:
            self.has_been_filled = True

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple,
                             do_remove_self_comparisons):
        """The pairs the inner loss gets (PML's method, same arguments): a PackedPairMask of all pairs for a
        dml_kernels loss without a miner or a passed tuple; otherwise PML's index tuples."""
        self_cols = self.curr_batch_idx if do_remove_self_comparisons else None
        if self.miner is None and input_indices_tuple is None and _is_ours(self.loss):
            return _all_pairs_mask(labels, L_mem, self_cols)
        if self.miner is not None:
            indices = tuple(self.miner(embeddings, labels, E_mem, L_mem))
        else:
            same = labels[:, None] == L_mem[None, :]
            a1, p = torch.where(same)
            a2, n = torch.where(~same)
            indices = (a1, p, a2, n)
        if self_cols is not None:  # drop each query's own slot: (a, p) with p == self_cols[a]
            keep = indices[1] != self_cols[indices[0]]
            if len(indices) == 3:
                indices = tuple(t[keep] for t in indices)
            else:
                indices = (indices[0][keep], indices[1][keep], indices[2], indices[3])
        if input_indices_tuple is not None:
            extra = tuple(input_indices_tuple)
            if len(extra) == 3 and len(indices) == 4:
                extra = (extra[0], extra[1], extra[0], extra[2])
            elif len(extra) == 4 and len(indices) == 3:
                a1, p, a2, n = extra
                p_idx, n_idx = torch.where(a1.unsqueeze(1) == a2)
                extra = (a1[p_idx], p[p_idx], n[n_idx])
            indices = tuple(torch.cat([x, y.to(x.device)]) for x, y in zip(indices, extra))
        return indices

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"


class MultipleLosses(nn.Module):
    """PML's MultipleLosses: the weighted **sum** of several losses on the same batch, each with its own
    miner (optional). ``losses`` is a list or a dict; ``miners`` and ``weights`` the same container type
    (a list of the same length, ``None`` entries allowed for miners; a dict whose keys are a subset of the
    losses' for miners, exactly the losses' for weights). Mismatches are an ``AssertionError`` as in PML."""

    def __init__(self, losses, miners=None, weights=None):
        super().__init__()
        self.is_dict = isinstance(losses, dict)
        self.losses = nn.ModuleDict(losses) if self.is_dict else nn.ModuleList(losses)
        if miners is not None:
            self._check(miners, match_all_keys=False)
            self.miners = nn.ModuleDict(miners) if self.is_dict else nn.ModuleList(miners)
        else:
            self.miners = None
        if weights is not None:
            self._check(weights, match_all_keys=True)
            self.weights = weights
        else:
            self.weights = {k: 1 for k in self.losses.keys()} if self.is_dict else [1] * len(losses)

    def forward(self, embeddings, labels, indices_tuple=None):
        if self.miners:
            assert indices_tuple is None, "MultipleLosses with miners takes no indices_tuple"
        total = 0
        items = self.losses.items() if self.is_dict else enumerate(self.losses)
        for i, loss_fn in items:
            total += loss_fn(embeddings, labels, self.get_indices_tuple(i, embeddings, labels, indices_tuple)) \
                * self.weights[i]
        return total

    def get_indices_tuple(self, i, embeddings, labels, indices_tuple):
        if self.miners:
            if (self.is_dict and i in self.miners) or (not self.is_dict and self.miners[i] is not None):
                indices_tuple = self.miners[i](embeddings, labels)
        return indices_tuple

    def _check(self, x, match_all_keys):
        if self.is_dict:
            assert isinstance(x, dict), "losses is a dict, so miners / weights must be dicts"
            if match_all_keys:
                assert sorted(x.keys()) == sorted(self.losses.keys()), "weights must have exactly the losses' keys"
            else:
                assert all(k in self.losses.keys() for k in x.keys()), "every miner key must be a loss key"
        else:
            assert isinstance(x, (list, tuple)), "losses is a list, so miners / weights must be lists"
            assert len(x) == len(self.losses), "miners / weights must have one entry per loss"


class SelfSupervisedLoss(nn.Module):
    """PML's SelfSupervisedLoss: ``forward(embeddings, ref_emb)`` with row i of ``ref_emb`` an augmented
    view of row i of ``embeddings``. Labels are ``arange(N)``; ``symmetric=True`` (default) computes the loss
    on the 2N rows ``cat([embeddings, ref_emb])`` (each row's one positive is its other view);
    ``symmetric=False`` computes ``loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())``.
    The labels are made on the embeddings' device (PML makes them on the CPU; the values are the same)."""

    def __init__(self, loss, symmetric=True):
        super().__init__()
        self.check_loss_support(type(loss).__name__)
        self.loss = loss
        self.symmetric = symmetric

    @staticmethod
    def supported_losses():
        return list(_SELF_SUPERVISED_LOSSES)

    @classmethod
    def check_loss_support(cls, loss_name):
        _check_support("SelfSupervisedLoss", loss_name, _SELF_SUPERVISED_LOSSES)

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())


__all__ = ["CrossBatchMemory", "MultipleLosses", "SelfSupervisedLoss"]
