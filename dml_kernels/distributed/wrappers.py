"""PML's DistributedLossWrapper and DistributedMinerWrapper (see the package docstring for the differences)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .collectives import _world, all_gather, is_distributed


def _pml_order(sizes: list[int], rank: int, device) -> torch.Tensor:
    """Position in the rank-ordered gathered batch of each row of PML's local-first gathered batch."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    order = [rank] + [r for r in range(len(sizes)) if r != rank]
    return torch.cat([torch.arange(starts[r], starts[r] + sizes[r], device=device) for r in order])


def _translate(indices_tuple, to_global, columns_too=True):
    """A PML indices tuple over PML's local-first order → over the rank-ordered gathered batch. With
    ``columns_too=False`` only the anchors (first, and third of a 4-tuple) are kept local."""
    if indices_tuple is None:
        return None
    out = []
    for k, t in enumerate(indices_tuple):
        anchor = k == 0 or (len(indices_tuple) == 4 and k == 2)
        out.append(to_global[t] if (columns_too or not anchor) else t)
    return tuple(out)


def _all_pairs_but_self(labels, ref_labels, offset, count):
    """PML's efficient-mode tuple: every (local query, gathered reference) pair except the positive pair
    (i, offset + i) of query i with row i of this rank's references (i < count, their number)."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    not_self = torch.ones_like(same)
    rows = torch.arange(min(labels.shape[0], count), device=labels.device)
    not_self[rows, offset + rows] = False
    a1, p = torch.where(same & not_self)
    a2, n = torch.where(~same)
    return a1, p, a2, n


def _is_cross_batch_memory(loss) -> bool:
    return type(loss).__name__ == "CrossBatchMemory"


class DistributedLossWrapper(nn.Module):
    """PML's ``DistributedLossWrapper``: ``loss`` on the global batch × world size (see the module docstring).

    ``efficient=True``: local queries × gathered references, all pairs but each query's own row; no rank
    forms the global × global matrix. ``process_group=`` (keyword-only) selects the ranks.
    """

    def __init__(self, loss, efficient=False, *, process_group=None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss module, got {type(loss).__name__}")
        if efficient and _is_cross_batch_memory(loss):
            raise ValueError("CrossBatchMemory is not supported with efficient=True")
        self.loss, self.efficient, self.process_group = loss, efficient, process_group

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        xbm = _is_cross_batch_memory(self.loss)
        if xbm and (ref_emb is not None or ref_labels is not None):
            raise ValueError("CrossBatchMemory takes no ref_emb / ref_labels")
        if not is_distributed(self.process_group):
            warnings.warn("DistributedLossWrapper: torch.distributed is not initialised; computing the local loss",
                          RuntimeWarning, stacklevel=2)
            return self._call(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, xbm)
        world, rank = _world(self.process_group)
        if world == 1:
            return self._call(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, xbm)
        group = self.process_group
        if labels is not None:
            labels = labels.to(embeddings.device)
        all_emb, sizes = all_gather(embeddings, group)
        all_labels = None if labels is None else all_gather(labels, group, sizes=sizes)[0]
        to_global = _pml_order(sizes, rank, embeddings.device)
        if ref_emb is not None:
            all_ref, ref_sizes = all_gather(ref_emb, group)
            all_ref_labels = None if ref_labels is None else all_gather(ref_labels.to(ref_emb.device), group,
                                                                         sizes=ref_sizes)[0]
        if not self.efficient:
            it = _translate(indices_tuple, to_global)
            if xbm:
                mask = None if enqueue_mask is None else all_gather(enqueue_mask.to(embeddings.device), group,
                                                                     sizes=sizes)[0]
                loss = self.loss(all_emb, all_labels, it, mask)
            elif ref_emb is None:
                loss = self.loss(all_emb, all_labels, it)
            else:
                loss = self.loss(all_emb, all_labels, it, all_ref, all_ref_labels)
            return loss * world
        # efficient: local queries against the gathered references (the gathered embeddings, or ref_emb's)
        refs, ref_l = (all_emb, all_labels) if ref_emb is None else (all_ref, all_ref_labels)
        if indices_tuple is None:
            if labels is None or ref_l is None:
                raise ValueError("efficient=True without indices_tuple needs labels (and ref_labels with ref_emb)")
            ref_counts = sizes if ref_emb is None else ref_sizes  # this rank's rows start at sum(ref_counts[:rank])
            indices_tuple = _all_pairs_but_self(labels, ref_l, sum(ref_counts[:rank]), ref_counts[rank])
        else:
            ref_order = to_global if ref_emb is None else _pml_order(ref_sizes, rank, embeddings.device)
            indices_tuple = _translate(indices_tuple, ref_order, columns_too=False)
        # The queries are this rank's rows *of the gathered batch*, so that their gradient, too, goes through
        # the gather's backward (summed over ranks / world): each rank then holds Σ_r' ∂L_r'/∂x_r.
        start = sum(sizes[:rank])
        queries = all_emb[start: start + sizes[rank]]
        return self.loss(queries, labels, indices_tuple, refs, ref_l) * world

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, xbm):
        if xbm:
            return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
        return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


class DistributedMinerWrapper(nn.Module):
    """PML's ``DistributedMinerWrapper``. Returned indices refer to PML's local-first gathered order, as in
    PML (so they can be passed to ``DistributedLossWrapper``, which translates them); with
    ``efficient=True`` the anchors are local rows and the other indices point into the gathered batch."""

    def __init__(self, miner, efficient=False, *, process_group=None):
        super().__init__()
        if not callable(miner):
            raise TypeError(f"miner must be a callable miner module, got {type(miner).__name__}")
        self.miner, self.efficient, self.process_group = miner, efficient, process_group

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        if not is_distributed(self.process_group):
            raise ValueError("DistributedMinerWrapper needs an initialised torch.distributed process group")
        world, rank = _world(self.process_group)
        if world == 1:
            return self.miner(embeddings, labels, ref_emb, ref_labels)
        group = self.process_group
        labels = labels.to(embeddings.device)
        all_emb, sizes = all_gather(embeddings, group)
        all_labels = all_gather(labels, group, sizes=sizes)[0]
        to_global = _pml_order(sizes, rank, embeddings.device)
        from_global = torch.empty_like(to_global)
        from_global[to_global] = torch.arange(to_global.numel(), device=to_global.device)
        if ref_emb is None:
            refs, ref_l, back = all_emb, all_labels, from_global
        else:
            refs, ref_sizes = all_gather(ref_emb, group)
            ref_l = all_gather(ref_labels.to(ref_emb.device), group, sizes=ref_sizes)[0]
            order = _pml_order(ref_sizes, rank, embeddings.device)
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
        if not self.efficient:
            if ref_emb is None:
                out = self.miner(all_emb, all_labels)
            else:
                out = self.miner(all_emb, all_labels, refs, ref_l)
            # rows and (in self mode) columns back to PML's local-first order
            return tuple(from_global[t] if (k == 0 or (len(out) == 4 and k == 2) or ref_emb is None) else back[t]
                         for k, t in enumerate(out))
        out = self.miner(embeddings, labels, refs, ref_l)
        # PML removes each anchor's own (local) row from its positives: row i of the local refs
        own = sum((sizes if ref_emb is None else ref_sizes)[:rank])
        if len(out) == 3:
            keep = out[1] != out[0] + own
            out = tuple(t[keep] for t in out)
        else:
            keep = out[1] != out[0] + own
            out = (out[0][keep], out[1][keep], out[2], out[3])
        return tuple(t if (k == 0 or (len(out) == 4 and k == 2)) else back[t] for k, t in enumerate(out))
