"""The C++/CUDA extension backends ("cpu" and "cuda"): loader, op registration, autograd, fake kernels.

The compiled library (``csrc/``) declares its ops once with ``TORCH_LIBRARY(dml_kernels, m)`` and
implements them per device (``TORCH_LIBRARY_IMPL(dml_kernels, CPU | CUDA, m)``). This module

* finds the library ``setup.py`` built ahead of time (``dml_kernels/_C*.so``), or else JIT-compiles the
  CPU part with ninja (``torch.utils.cpp_extension.load``) into a cache directory on first use
  (``$DML_KERNELS_CACHE``, default ``~/.cache/dml_kernels``). Nothing is compiled at import time: the
  first call of :func:`unavailable_reason` (which the registry makes before running an op) loads it;
* adds ``torch.library.register_fake`` and ``register_autograd`` to the ops, so ``torch.compile`` and
  ``torch.library.opcheck`` work;
* registers the canonical ops of ``_ops.py`` for the ``cpu`` and ``cuda`` backends on top of a few
  generic kernels: ``pair_values`` (the N×M value matrix), ``pair_reduce`` (per-row log-sum-exp or
  hinge sums over positive and negative pairs, with optional fused MultiSimilarity mining),
  ``ms_thresholds``, ``ms_mask`` and ``batch_hard``.

Environment: ``DML_KERNELS_NO_EXTENSION=1`` disables the extension (the backends report why);
``DML_KERNELS_JIT=1`` ignores an ahead-of-time build and JIT-compiles.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ._backends import Unsupported, register
from ._pairs import PackedPairMask, n_pairs_block

_PKG = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_STATE: dict = {}  # "error": None | str, "how": str

# dist codes of the kernels (csrc/dml_kernels.h)
_DIST = {"cosine": 0, "dot": 0, "euclidean": 1, "squared_euclidean": 2}
_LSE, _LSE1, _HINGE = 0, 1, 2

_CPU_SOURCES = ("registration.cpp", "cpu/pair_ops.cpp")
_CUDA_SOURCES = ("cuda/pair_ops.cu",)


# --------------------------------------------------------------------------------------- loading


def source_dir() -> Path | None:
    """Where the C++ sources are: the checkout's ``csrc/`` or the copy installed as ``dml_kernels/_csrc``."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (cand / "registration.cpp").is_file():
            return cand
    return None


def _prebuilt() -> str | None:
    found = sorted(glob.glob(str(_PKG / "_C*.so")) + glob.glob(str(_PKG / "_C*.pyd")))
    return found[0] if found else None


def _stale(lib: str, src: Path | None) -> bool:
    """True if the checkout's sources were edited after an in-place (editable) build of ``lib``."""
    if src is None or src != _PKG.parent / "csrc":
        return False  # an installed copy of the sources is as old as the library installed with it
    newest = max((p.stat().st_mtime for p in src.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")),
                 default=0.0)
    return newest > os.path.getmtime(lib)


def _nvidia_includes():
    """include/ folders of torch's nvidia-* wheels (headers a bare CUDA toolkit may lack)."""
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        return []
    return [str(p) for base in getattr(nvidia, "__path__", []) for p in sorted(Path(base).glob("*/include"))]


def _jit_load(src: Path) -> str:
    """JIT build: CPU + CUDA sources when a GPU, a CUDA torch and nvcc are present, else (or if the CUDA
    build fails) the CPU sources only."""
    from torch.utils import cpp_extension

    with_cuda = (torch.version.cuda is not None and torch.cuda.is_available()
                 and cpp_extension.CUDA_HOME is not None and all((src / s).is_file() for s in _CUDA_SOURCES))
    if with_cuda:
        try:
            return _jit_build(src, True)
        except Exception as e:  # noqa: BLE001 - keep the CPU kernels usable
            _STATE["cuda_error"] = f"{type(e).__name__}: {str(e)[-400:]}"
    return _jit_build(src, False)


def _jit_build(src: Path, with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    sources = [src / s for s in _CPU_SOURCES]
    if with_cuda:
        sources += [src / s for s in _CUDA_SOURCES]
    digest = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(p.name.encode() + p.read_bytes())
    digest.update(torch.__version__.encode() + str(with_cuda).encode())
    name = f"dml_kernels_ext_{digest.hexdigest()[:12]}"
    cache = Path(os.environ.get("DML_KERNELS_CACHE", Path.home() / ".cache" / "dml_kernels")) / name
    cache.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[str(s) for s in sources], build_directory=str(cache), is_python_module=False,
        extra_cflags=["-O3", "-fopenmp"], verbose=False, with_cuda=with_cuda,
        extra_cuda_cflags=["-O3"] + [f for d in _nvidia_includes()
                                     for f in ("-Xcompiler", "-idirafter", "-Xcompiler", d)])
    return f"JIT-compiled into {cache}" + (" (with CUDA)" if with_cuda else "")


def load() -> str | None:
    """Load the compiled library once; None if it loaded, else why not (a sentence with the fix)."""
    with _LOCK:
        if "error" in _STATE:
            return _STATE["error"]
        _STATE["error"] = _STATE["how"] = None
        if os.environ.get("DML_KERNELS_NO_EXTENSION") == "1":
            _STATE["error"] = "the C++ extension is disabled by DML_KERNELS_NO_EXTENSION=1"
            return _STATE["error"]
        src = source_dir()
        reasons = []
        lib = _prebuilt()
        if lib is not None and os.environ.get("DML_KERNELS_JIT") != "1" and not _stale(lib, src):
            try:
                torch.ops.load_library(lib)
                _STATE["how"] = f"ahead-of-time build {lib}"
            except Exception as e:  # noqa: BLE001 - e.g. built against another torch
                reasons.append(f"the installed library {lib} failed to load ({type(e).__name__}: {e})")
        if _STATE["how"] is None:
            if src is None:
                reasons.append("the C++ sources are not installed, so it cannot be JIT-compiled")
            else:
                try:
                    _STATE["how"] = _jit_load(src)
                except Exception as e:  # noqa: BLE001 - no compiler, no ninja, compile error...
                    msg = str(e).strip().splitlines()
                    reasons.append("JIT compilation failed (" + type(e).__name__ + ": "
                                   + " | ".join(msg[-6:])[-800:] + ")")
        if _STATE["how"] is None:
            _STATE["error"] = ("the dml_kernels C++ extension is not available: " + "; ".join(reasons)
                               + ". Fix: install a C++ compiler and ninja (pip install ninja) so it can be "
                               "JIT-compiled, or reinstall with one present (pip install --no-build-isolation .)")
            return _STATE["error"]
        _register_python_side()
        return None


def how_loaded() -> str | None:
    """How the library was loaded (ahead-of-time build or JIT cache), None before or on failure."""
    return _STATE.get("how")


def has_kernel(name: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dml_kernels::{name}", key)


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` ("cpu" or "cuda") has its compiled kernels loaded here, else why not."""
    why = load()
    if why is not None:
        return why
    if backend == "cpu" and not has_kernel("pair_reduce", "cpu"):
        return "the dml_kernels library was loaded without its CPU kernels; rebuild it"
    if backend == "cuda" and not has_kernel("pair_reduce", "cuda"):
        extra = f"; the CUDA JIT build failed: {_STATE['cuda_error']}" if _STATE.get("cuda_error") else ""
        return ("the dml_kernels library was built without CUDA kernels (" + str(how_loaded()) + extra + "); "
                "reinstall "
                "on a machine with nvcc and a CUDA build of torch: pip install --no-build-isolation . "
                "(FORCE_CUDA=1 builds them without a GPU)")
    return None


# --------------------------------------------------------------------------------------- fake + autograd

_PY_REGISTERED = False


def _register_python_side():
    """register_fake and register_autograd for every op (once, after the library is loaded)."""
    global _PY_REGISTERED
    if _PY_REGISTERED:
        return
    _PY_REGISTERED = True
    lib = torch.library

    def nrows(q, r):
        return q.shape[0] if r is None else r.shape[0]

    @lib.register_fake("dml_kernels::pair_values")
    def _(q, r, dist):
        return q.new_empty(q.shape[0], nrows(q, r))

    @lib.register_fake("dml_kernels::pair_values_backward")
    def _(grad, values, q, r, dist):
        return q.new_empty(q.shape), q.new_empty((0, q.shape[1]) if r is None else r.shape)

    @lib.register_fake("dml_kernels::pair_reduce")
    def _(q, r, labels, ref_labels, pos_bits, neg_bits, dist, kind, pa, pc, na, nc, eps, col_mask=None):
        n = q.shape[0]
        return q.new_empty(n), q.new_empty(n), q.new_empty(2, n), q.new_empty(4, n, dtype=torch.long)

    @lib.register_fake("dml_kernels::pair_reduce_backward")
    def _(gp, gn, q, r, labels, ref_labels, pos_bits, neg_bits, dist, kind, pa, pc, na, nc, eps, red_pos, red_neg,
          thr, col_mask=None, need_r=True):
        return q.new_empty(q.shape), q.new_empty((0, q.shape[1]) if r is None or not need_r else r.shape)

    @lib.register_fake("dml_kernels::ms_thresholds")
    def _(q, r, labels, ref_labels, pos_bits, neg_bits, dist):
        return q.new_empty(q.shape[0]), q.new_empty(q.shape[0])

    @lib.register_fake("dml_kernels::ms_mask")
    def _(q, r, labels, ref_labels, dist, eps):
        shape = (q.shape[0], (nrows(q, r) + 7) // 8)
        return q.new_empty(shape, dtype=torch.uint8), q.new_empty(shape, dtype=torch.uint8)

    @lib.register_fake("dml_kernels::batch_hard")
    def _(q, r, labels, ref_labels, dist):
        return q.new_empty(q.shape[0], dtype=torch.long), q.new_empty(q.shape[0], dtype=torch.long)

    @lib.register_fake("dml_kernels::triplet_all")
    def _(q, r, labels, ref_labels, dist, margin):
        return q.new_empty(q.shape[0]), q.new_empty(q.shape[0], dtype=torch.long)

    @lib.register_fake("dml_kernels::triplet_all_backward")
    def _(grad, q, r, labels, ref_labels, dist, margin):
        return q.new_empty(q.shape), q.new_empty((0, q.shape[1]) if r is None else r.shape)

    def triplet_setup(ctx, inputs, output):
        q, r, labels, ref_labels, dist, margin = inputs
        ctx.params = (dist, margin)
        ctx.has_r = r is not None
        ctx.save_for_backward(q, r, labels, ref_labels)

    def triplet_backward(ctx, g_total, _g_count):
        q, r, labels, ref_labels = ctx.saved_tensors
        dq, dr = torch.ops.dml_kernels.triplet_all_backward(g_total, q, r if ctx.has_r else None, labels,
                                                            ref_labels if ctx.has_r else None, *ctx.params)
        return dq, (dr if ctx.has_r else None), None, None, None, None

    lib.register_autograd("dml_kernels::triplet_all", triplet_backward, setup_context=triplet_setup)

    @lib.register_fake("dml_kernels::lifted_pos")
    def _(q, labels, a, has_neg, dist, pos_margin):
        return q.new_empty(q.shape[0]), q.new_empty(q.shape[0], dtype=torch.long)

    @lib.register_fake("dml_kernels::lifted_pos_backward")
    def _(grad, q, labels, a, has_neg, dist, pos_margin):
        return q.new_empty(q.shape), q.new_empty(q.shape[0])

    def lifted_setup(ctx, inputs, output):
        q, labels, a, has_neg, dist, pos_margin = inputs
        ctx.params = (dist, pos_margin)
        ctx.save_for_backward(q, labels, a, has_neg)

    def lifted_backward(ctx, g_sum, _g_count):
        q, labels, a, has_neg = ctx.saved_tensors
        dq, da = torch.ops.dml_kernels.lifted_pos_backward(g_sum, q, labels, a, has_neg, *ctx.params)
        return dq, None, da.to(a.dtype), None, None, None

    lib.register_autograd("dml_kernels::lifted_pos", lifted_backward, setup_context=lifted_setup)

    def values_setup(ctx, inputs, output):
        q, r, dist = inputs
        ctx.dist = dist
        ctx.has_r = r is not None
        ctx.save_for_backward(q, r, output)

    def values_backward(ctx, grad):
        q, r, out = ctx.saved_tensors
        dq, dr = torch.ops.dml_kernels.pair_values_backward(grad, out, q, r if ctx.has_r else None, ctx.dist)
        return dq, (dr if ctx.has_r else None), None

    lib.register_autograd("dml_kernels::pair_values", values_backward, setup_context=values_setup)

    def reduce_setup(ctx, inputs, output):
        q, r, labels, ref_labels, pos_bits, neg_bits = inputs[:6]
        ctx.params = inputs[6:13]
        col_mask = inputs[13] if len(inputs) > 13 else None
        ctx.has_r = r is not None
        red_pos, red_neg, thr, _ = output
        ctx.save_for_backward(q, r, labels, ref_labels, pos_bits, neg_bits, red_pos, red_neg, thr, col_mask)

    def reduce_backward(ctx, gp, gn, _gthr, _gcnt):
        q, r, labels, ref_labels, pos_bits, neg_bits, red_pos, red_neg, thr, col_mask = ctx.saved_tensors
        gp = torch.zeros_like(red_pos) if gp is None else gp
        gn = torch.zeros_like(red_neg) if gn is None else gn
        need_r = ctx.has_r and ctx.needs_input_grad[1]  # a detached memory bank: no reference-side pass
        dq, dr = torch.ops.dml_kernels.pair_reduce_backward(
            gp, gn, q, r if ctx.has_r else None, labels, ref_labels, pos_bits, neg_bits, *ctx.params,
            red_pos, red_neg, thr, col_mask, need_r)
        return (dq, dr if need_r else None) + (None,) * 12

    lib.register_autograd("dml_kernels::pair_reduce", reduce_backward, setup_context=reduce_setup)


# --------------------------------------------------------------------------------------- canonical ops

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
    temporaries of x's size (measured on a 32768×256 proxy matrix: 110 ms forward + backward against 43 ms)."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=1)
        s = 1.0 / norm.clamp_min(eps)
        out = x * s.unsqueeze(1)
        ctx.save_for_backward(out, s, norm >= eps)
        return out

    @staticmethod
    def backward(ctx, g):
        out, s, unclamped = ctx.saved_tensors
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


@_both
def pairwise_similarity(x, ref, *, distance):
    _need(x, "pair_values")
    q, r, code = _prep(x, ref, distance)
    out = torch.ops.dml_kernels.pair_values(q, r, code)
    return out if x.dtype in (torch.float32, torch.float64) else out.to(x.dtype)


@_both
def multi_similarity_thresholds(x, labels, ref, ref_labels, *, distance):
    _need(x, "ms_thresholds")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        hp, hn = torch.ops.dml_kernels.ms_thresholds(q, r, labels, ref_labels, None, None, code)
    return hp.to(x.dtype), hn.to(x.dtype)


@_both
def multi_similarity_mask(x, labels, ref, ref_labels, *, epsilon, distance):
    _need(x, "ms_mask")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        pb, nb = torch.ops.dml_kernels.ms_mask(q, r, labels, ref_labels, code, float(epsilon))
    return PackedPairMask(pb, nb, x.shape[0] if ref is None else ref.shape[0])


@_both
def batch_hard_mining(x, labels, ref, ref_labels, *, distance):
    _need(x, "batch_hard")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        return torch.ops.dml_kernels.batch_hard(q, r, labels, ref_labels, code)


@_both
def multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, epsilon=None, distance, pairs=None,
                          pair_rule=True):
    _need(x, "pair_reduce")
    pb, nb = _bits(pairs, x.device)
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, pb, nb, code, _LSE1, -sg * alpha, base, sg * beta, base,
        None if epsilon is None else float(epsilon))
    loss = (lp / alpha + ln / beta).mean()
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), _zero(x).to(loss.dtype), loss)
    return _out(loss, x)


@_both
def generalized_lifted_structure_loss(x, labels, ref, ref_labels, *, neg_margin, pos_margin, distance, pairs=None,
                                      pair_rule=True):
    _need(x, "pair_reduce")
    pb, nb = _bits(pairs, x.device)
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, pb, nb, code, _LSE, -sg, pos_margin, sg, neg_margin, None)
    loss = F.relu(lp + ln).mean()
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), _zero(x).to(loss.dtype), loss)
    return _out(loss, x)


@_both
def contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs=None, pair_rule=True):
    _need(x, "pair_reduce")
    if pairs is not None:
        raise Unsupported("the C++ contrastive_loss takes no explicit pairs (PML counts duplicate pairs)")
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    sp, sn, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _HINGE, -sg, pos_margin, sg, neg_margin, None)
    zero = _zero(x).to(sp.dtype)
    nzp, nzn = cnt[2].sum(), cnt[3].sum()
    pos_loss = torch.where(nzp > 0, sp.sum() / nzp.clamp_min(1), zero)
    neg_loss = torch.where(nzn > 0, sn.sum() / nzn.clamp_min(1), zero)
    loss = pos_loss + neg_loss
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), zero, loss)
    return _out(loss, x)


@_cpu_only
def lifted_structure_loss(x, labels, *, neg_margin, pos_margin, distance, pairs=None, pair_rule=True):
    """Exact in O(N²): per-row negative LSEs A_i (pair_reduce), then one pass over the positive pairs."""
    if pairs is not None:
        raise Unsupported("the C++ lifted_structure_loss takes no explicit pairs (PML counts duplicates)")
    _need(x, "lifted_pos")
    q, _, code = _prep(x, None, distance)
    sg = _sg(distance)
    _, a, _, cnt = torch.ops.dml_kernels.pair_reduce(q, None, labels, None, None, None, code, _LSE, 0.0, 0.0, sg,
                                                     neg_margin, None)
    total, count = torch.ops.dml_kernels.lifted_pos(q, labels, a, cnt[1] > 0, code, float(pos_margin))
    npos, nneg = count.sum(), cnt[1].sum()
    zero = _zero(x).to(total.dtype)
    loss = torch.where((npos > 0) & (nneg > 0), total.sum() / npos.clamp_min(1), zero)
    if pair_rule:
        loss = torch.where((npos <= 1) & (nneg <= 1), zero, loss)
    return _out(loss, x)


@_both
def n_pairs_loss(x, labels, *, distance, pairs=None):
    """PML's NPairsLoss: anchors = lowest index of each label with ≥ 2 samples, positives = second lowest;
    CE of each anchor over the positives' logits. One pair_reduce over the anchors × positives block only
    (:func:`dml_kernels._pairs.n_pairs_block`), the positive columns masked."""
    if pairs is not None:
        raise Unsupported("the C++ n_pairs_loss takes no explicit pairs")
    _need(x, "pair_reduce")
    rows, cols, row_is_anchor, col_is_positive = n_pairs_block(labels)
    if rows.numel() == 0:  # no label has two samples (known on the host: the exact CPU cut)
        return _out(_zero(x), x)
    q, r, code = _prep(x[rows], x[cols], distance)
    s = _sg(distance)
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels[rows], labels[cols], None, None, code, _LSE, s, 0.0, s, 0.0, None, col_is_positive)
    per_row = torch.where(cnt[1] > 0, torch.logaddexp(target, rest), target) - target
    k = row_is_anchor.sum()
    total = torch.where(row_is_anchor, per_row, 0).sum()
    loss = torch.where(k > 0, total / k.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


def _pair_value(a, b, ia, ib, code):
    """Values of the pairs (a[ia], b[ib]) with the reference's formula (differentiable, O(len · D))."""
    qa, rb = a[ia], b[ib]
    dot = (qa * rb).sum(1)
    if code == 0:
        return dot
    sq = ((qa * qa).sum(1) + (rb * rb).sum(1) - 2 * dot).clamp_min(0)
    if code == 2:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


@_both
def triplet_margin_loss(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                        distance, triplets=None):
    if triplets is not None:
        raise Unsupported("the C++ triplet_margin_loss takes no explicit triplets")
    if mining is None:
        return _triplet_all(x, labels, ref, ref_labels, margin=margin, swap=swap, smooth_loss=smooth_loss,
                            distance=distance)
    _need(x, "batch_hard")
    q, r, code = _prep(x, ref, distance)
    rr = q if r is None else r
    with torch.no_grad():
        hard_pos, hard_neg = torch.ops.dml_kernels.batch_hard(q.detach(), None if r is None else r.detach(), labels,
                                                              ref_labels, code)
    valid = hard_pos >= 0
    a = torch.arange(q.shape[0], device=q.device)
    p, n = hard_pos.clamp_min(0), hard_neg.clamp_min(0)
    ap, an = _pair_value(q, rr, a, p, code), _pair_value(q, rr, a, n, code)
    if swap:
        pn = _pair_value(rr, rr, p, n, code)
        an = torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)
    viol = distance.margin(ap, an) + margin
    losses = (F.softplus(viol) if smooth_loss else F.relu(viol)) * valid
    positive = losses > 0
    count = positive.sum()
    total = losses.where(positive, 0).sum()
    loss = torch.where(count > 0, total / count.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


def _triplet_all(x, labels, ref, ref_labels, *, margin, swap, smooth_loss, distance):
    """Every valid triplet of every anchor, without the N×M×M set (per-anchor sort + prefix sums)."""
    if swap or smooth_loss:
        raise Unsupported("the C++ all-triplets triplet_margin_loss has no swap / smooth_loss")
    _need(x, "triplet_all")
    q, r, code = _prep(x, ref, distance)
    total, count = torch.ops.dml_kernels.triplet_all(q, r, labels, ref_labels, code, float(margin))
    c = count.sum()
    loss = torch.where(c > 0, total.sum() / c.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


@_both
def proxy_nca_loss(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance, weights=None):
    _need(x, "pair_reduce")
    q, r, code = _prep(x, proxies.to(x.dtype), distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    s = softmax_scale * _sg(distance)
    # "positive" = the target proxy (its logit), "negative" = every other proxy (their LSE).
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    if exclude_positive:
        losses = rest - target
    else:
        losses = torch.where(cnt[1] > 0, torch.logaddexp(target, rest), target) - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return _out(losses.mean(), x)


@_both
def proxy_anchor_loss(x, labels, proxies, *, margin, alpha, distance, weights=None):
    _need(x, "pair_reduce")
    if weights is not None:
        raise Unsupported("the C++ proxy_anchor_loss takes no miner weights")
    num_classes = proxies.shape[0]
    # Transposed: rows = proxies, columns = embeddings, so each proxy's LSE is a row reduction.
    q, r, code = _prep(proxies.to(x.dtype), x, distance)
    classes = torch.arange(num_classes, device=x.device)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, classes, labels, None, None, code, _LSE1, -sg * alpha, margin, sg * alpha, -margin, None)
    num_with_pos = (cnt[0] > 0).sum()
    pos_loss = torch.where(num_with_pos > 0, lp.sum() / num_with_pos.clamp_min(1), _zero(lp))
    return _out(pos_loss + ln.sum() / num_classes, x)
