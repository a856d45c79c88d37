"""Input checks shared by every public function. Errors name the argument and say what was expected.

Shape, dtype and device checks read only metadata (no host sync). Value checks (NaN/inf, label range,
index range) read data and therefore sync; they run only with ``check_inputs=True`` (the default).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(x, name="embeddings", *, check_values=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, embedding_size), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows); a loss needs at least one sample")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0")
    if check_values and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf (pass check_inputs=False to skip this check)")


def check_labels(labels, n, device, name="labels", *, required=True):
    """Labels must be a 1-D integer tensor of length n; CPU labels are moved to ``device`` (as PML does)."""
    if labels is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has length {labels.shape[0]} but the embeddings have {n} rows")
    if labels.device != device:
        if labels.device.type != "cpu":
            raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
        labels = labels.to(device)
    return labels.long()


def check_same_device(x, other, name):
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but the embeddings are on {x.device}")


def check_ref(embeddings, labels, ref_emb, ref_labels, *, check_values=True):
    """Validate ``ref_emb`` / ``ref_labels``; returns (ref_emb, ref_labels, self_mode)."""
    if ref_emb is None and ref_labels is None:
        return None, None, True
    if ref_emb is None:
        raise ValueError("ref_labels was given without ref_emb")
    check_embeddings(ref_emb, "ref_emb", check_values=check_values)
    check_same_device(embeddings, ref_emb, "ref_emb")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_emb has embedding size {ref_emb.shape[1]} but embeddings have {embeddings.shape[1]}")
    if ref_emb.dtype != embeddings.dtype:
        raise TypeError(f"ref_emb is {ref_emb.dtype} but embeddings are {embeddings.dtype}")
    if ref_labels is None:
        if labels is not None:
            raise ValueError("ref_emb was given without ref_labels")
        return ref_emb, None, ref_emb is embeddings
    ref_labels = check_labels(ref_labels, ref_emb.shape[0], embeddings.device, "ref_labels")
    # PML excludes self-pairs only when the references are the queries themselves.
    if ref_emb is embeddings and ref_labels is labels:
        return None, None, True
    return ref_emb, ref_labels, False


def check_indices_tuple(indices_tuple, n, m, *, check_values=True, device=None):
    """A PML 3-tuple (a, p, n) or 4-tuple (a1, p, a2, n) of 1-D integer tensors with indices in range."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a PML 3-tuple (anchors, positives, negatives), a 4-tuple "
                         "(a1, p, a2, n) or a PackedPairMask")
    out = []
    for k, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{k}] must be a 1-D integer tensor")
        out.append(t.to(device).long() if device is not None else t.long())
    lens = [len(t) for t in out]
    if len(out) == 3 and not lens[0] == lens[1] == lens[2]:
        raise ValueError(f"indices_tuple triplet tensors have different lengths {lens}")
    if len(out) == 4 and (lens[0] != lens[1] or lens[2] != lens[3]):
        raise ValueError(f"indices_tuple pair tensors have mismatched lengths {lens}")
    if check_values:
        bounds = [n, m, m] if len(out) == 3 else [n, m, n, m]
        for k, (t, b) in enumerate(zip(out, bounds)):
            if len(t) and (bool(t.min() < 0) or bool(t.max() >= b)):
                raise ValueError(f"indices_tuple[{k}] has indices outside [0, {b})")
    return tuple(out)


def check_proxy_labels(labels, num_classes, *, check_values=True):
    if check_values and (bool(labels.min() < 0) or bool(labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}) for a proxy loss "
                         f"(got min {int(labels.min())}, max {int(labels.max())})")


def check_proxies(x, proxies, *, check_values=True):
    check_embeddings(proxies, "proxies", check_values=check_values)
    check_same_device(x, proxies, "proxies")
    if proxies.shape[1] != x.shape[1]:
        raise ValueError(f"embedding size {x.shape[1]} does not match the proxies' size {proxies.shape[1]} "
                         f"(embedding_size given to the loss)")
