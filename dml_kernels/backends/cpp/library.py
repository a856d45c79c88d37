"""Fake kernels (``torch.library.register_fake``) and autograd (``register_autograd``) of the compiled ops,
so ``torch.compile`` and ``torch.library.opcheck`` work. Registered once, after the library loaded."""
from __future__ import annotations

import torch


def refuse_double_backward(what):
    """Call at the top of every fused C++ / cpu backward (a kernel backward, a tile recompute, or saved gradients
    that are constants). Under ``create_graph=True`` (grad mode on inside backward) its result would be a gradient
    that is not itself differentiable — a wrong second-order gradient with only a PyTorch warning — so raise
    instead. ``what`` names the op or engine (the Triton side's twin is ``pair_engine.refuse_double_backward``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"double backward (create_graph=True) through the fused {what} is not supported; "
                           "use backend='reference' for second-order gradients")

_PY_REGISTERED = False


def register_python_side():
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
        refuse_double_backward("C++ op dml_kernels::triplet_all")
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
        refuse_double_backward("C++ op dml_kernels::lifted_pos")
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
        refuse_double_backward("C++ op dml_kernels::pair_values")
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
        refuse_double_backward("C++ op dml_kernels::pair_reduce")
        q, r, labels, ref_labels, pos_bits, neg_bits, red_pos, red_neg, thr, col_mask = ctx.saved_tensors
        gp = torch.zeros_like(red_pos) if gp is None else gp
        gn = torch.zeros_like(red_neg) if gn is None else gn
        need_r = ctx.has_r and ctx.needs_input_grad[1]  # a detached memory bank: no reference-side pass
        dq, dr = torch.ops.dml_kernels.pair_reduce_backward(
            gp, gn, q, r if ctx.has_r else None, labels, ref_labels, pos_bits, neg_bits, *ctx.params,
            red_pos, red_neg, thr, col_mask, need_r)
        return (dq, dr if need_r else None) + (None,) * 12

    lib.register_autograd("dml_kernels::pair_reduce", reduce_backward, setup_context=reduce_setup)

    # ---- per-row reduction statistics (hinge_stats, triplet_stats): sums are differentiable, counts are not
    @lib.register_fake("dml_kernels::hinge_stats")
    def _(q, r, labels, ref_labels, dist, pa, pc, na, nc, plo, phi, nlo, nhi):
        return q.new_empty(4, q.shape[0]), q.new_empty(4, q.shape[0], dtype=torch.long)

    @lib.register_fake("dml_kernels::hinge_stats_backward")
    def _(grad, q, r, labels, ref_labels, dist, pa, pc, na, nc, plo, phi, nlo, nhi, need_r):
        return q.new_empty(q.shape), q.new_empty((0, q.shape[1]) if r is None or not need_r else r.shape)

    def hinge_setup(ctx, inputs, output):
        q, r, labels, ref_labels = inputs[:4]
        ctx.params = inputs[4:]
        ctx.has_r = r is not None
        ctx.save_for_backward(q, r, labels, ref_labels)

    def hinge_backward(ctx, g_sums, _g_counts):
        refuse_double_backward("C++ op dml_kernels::hinge_stats")
        q, r, labels, ref_labels = ctx.saved_tensors
        need_r = ctx.has_r and ctx.needs_input_grad[1]
        dq, dr = torch.ops.dml_kernels.hinge_stats_backward(
            g_sums, q, r if ctx.has_r else None, labels, ref_labels if ctx.has_r else None, *ctx.params, need_r)
        return (dq, dr if need_r else None) + (None,) * 11

    lib.register_autograd("dml_kernels::hinge_stats", hinge_backward, setup_context=hinge_setup)

    @lib.register_fake("dml_kernels::triplet_stats")
    def _(q, r, labels, ref_labels, dist, margin, low, high):
        return q.new_empty(2, q.shape[0]), q.new_empty(2, q.shape[0], dtype=torch.long)

    @lib.register_fake("dml_kernels::triplet_stats_backward")
    def _(grad, q, r, labels, ref_labels, dist, margin, low, high):
        return q.new_empty(q.shape), q.new_empty((0, q.shape[1]) if r is None else r.shape)

    def tstats_setup(ctx, inputs, output):
        q, r, labels, ref_labels = inputs[:4]
        ctx.params = inputs[4:]
        ctx.has_r = r is not None
        ctx.save_for_backward(q, r, labels, ref_labels)

    def tstats_backward(ctx, g_sums, _g_counts):
        refuse_double_backward("C++ op dml_kernels::triplet_stats")
        q, r, labels, ref_labels = ctx.saved_tensors
        dq, dr = torch.ops.dml_kernels.triplet_stats_backward(
            g_sums, q, r if ctx.has_r else None, labels, ref_labels if ctx.has_r else None, *ctx.params)
        return (dq, dr if ctx.has_r else None) + (None,) * 6

    lib.register_autograd("dml_kernels::triplet_stats", tstats_backward, setup_context=tstats_setup)

    if torch._C._dispatch_has_kernel_for_dispatch_key("dml_kernels::class_rows", "CPU"):
        @lib.register_fake("dml_kernels::class_rows")
        def _(A, labels, scale, col_scale, qn, rn, scale_out=False):
            return A.new_empty(4, A.shape[0])
