"""What every op of the C++ backends shares: kernel dtype, distance codes, normalisation, packing of
explicit pairs, the graph-attached zero, registration for one or both devices."""
from __future__ import annotations

import torch

from ..._pairs import PackedPairMask
from ..._registry import Unsupported, register
from .loader import has_kernel

# dist codes of the kernels (csrc/dml_kernels.h)
_DIST = {"cosine": 0, "dot": 0, "euclidean": 1, "squared_euclidean": 2}
# pair_reduce's reduction kinds: log-sum-exp, log(1 + sum exp), hinge sums
_LSE, _LSE1, _HINGE = 0, 1, 2


def _kernel_dtype(x):
    """The dtype the kernels run in: fp32/fp64 as given; fp16/bf16 are upcast and accumulate in fp32."""
    if x.dtype in (torch.float32, torch.float64):
        return x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    raise Unsupported(f"the C++ kernels compute in float32 or float64, not {x.dtype}")


def _need(x, *names):
    if torch.compiler.is_compiling():  # checked when the function first ran eagerly; keeps graphs whole
        return
    for name in names:
        if not has_kernel(name, x.device.type):
            raise Unsupported(f"the {x.device.type} extension has no {name!r} kernel")


class _NormalizeRows(torch.autograd.Function):
    """F.normalize(x, dim=1) (x / max(‖x‖, eps)) with a two-pass backward: dx = s·(g − x̂ (x̂·g)), the
    projection dropped where the norm is clamped. Autograd through F.normalize takes ~5 passes and as many
    temporaries of x's size (measured on a 32768×256 proxy matrix: 110 ms forward + backward against 43 ms).
    Under ``create_graph=True`` the backward is F.normalize's own (differentiable, exact to second order)."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=1)
        s = 1.0 / norm.clamp_min(eps)
        out = x * s.unsqueeze(1)
        ctx.eps = eps
        ctx.save_for_backward(x, out, s, norm >= eps)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out, s, unclamped = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: build a differentiable gradient
            with torch.enable_grad():
                y = torch.nn.functional.normalize(x, dim=1, eps=ctx.eps)
            return torch.autograd.grad(y, x, g, create_graph=True)[0], None
        xg = torch.linalg.vecdot(out, g) * unclamped
        return torch.addcmul(g, out, xg.neg().unsqueeze(1)).mul_(s.unsqueeze(1)), None


def _prep(x, ref, distance):
    """(q, r, dist code): inputs cast to the kernel dtype and normalised when the distance says so."""
    dt = _kernel_dtype(x)
    q = x.to(dt)
    r = None if ref is None else ref.to(dt)
    if distance.normalize:
        q = _NormalizeRows.apply(q, 1e-12)
        r = None if r is None else _NormalizeRows.apply(r, 1e-12)
    return q, r, _DIST[distance.name]


def _bits(pairs, device):
    if pairs is None:
        return None, None
    if not isinstance(pairs, PackedPairMask):
        raise Unsupported("the C++ backends take explicit pairs as a PackedPairMask, not index tuples")
    return pairs.pos_bits.to(device).contiguous(), pairs.neg_bits.to(device).contiguous()


def _zero(x, *others):
    z = (x * 0).sum()
    for o in others:
        z = z + (o * 0).sum()
    return z


def _sg(distance):
    return 1.0 if distance.is_similarity else -1.0


def _few_pairs(cnt):
    return (cnt[0].sum() <= 1) & (cnt[1].sum() <= 1)


def _out(loss, x):
    """Losses come back in the input dtype for fp32/fp64, in fp32 for fp16/bf16 (accumulated in fp32)."""
    return loss if x.dtype in (torch.float16, torch.bfloat16) else loss.to(x.dtype)


def _both(fn):
    """Ops with CPU and CUDA kernels (an argument combination a kernel lacks raises Unsupported)."""
    register(fn.__name__, "cpu")(fn)
    register(fn.__name__, "cuda")(fn)
    return fn


def _cpu_only(fn):
    """Ops whose kernels exist in the CPU library only (csrc/cpu)."""
    register(fn.__name__, "cpu")(fn)
    return fn
