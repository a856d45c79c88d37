// The op schemas of the dml_kernels extension, declared once for every device (see dml_kernels.h).
#include <torch/library.h>

TORCH_LIBRARY(dml_kernels, m) {
  // N×M value matrix (similarity or distance), and its backward (grad_q, grad_r; grad_r is 0×D in
  // self mode).
  m.def("pair_values(Tensor q, Tensor? r, int dist) -> Tensor");
  m.def("pair_values_backward(Tensor grad, Tensor values, Tensor q, Tensor? r, int dist) -> (Tensor, Tensor)");
  // Per-row reductions over the positive and the negative pairs of each query row (dml_kernels.h):
  // (red_pos (N,), red_neg (N,), thresholds (2, N) [hardest pos, hardest neg; 0 without mining],
  //  counts (4, N) int64 [pos pairs, neg pairs, nonzero pos terms, nonzero neg terms]).
  // col_mask (M,) bool: references outside it are in neither set (N-pairs: only the chosen positives).
  m.def("pair_reduce(Tensor q, Tensor? r, Tensor? labels, Tensor? ref_labels, Tensor? pos_bits, "
        "Tensor? neg_bits, int dist, int kind, float pos_scale, float pos_center, float neg_scale, "
        "float neg_center, float? eps, Tensor? col_mask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pair_reduce_backward(Tensor grad_pos, Tensor grad_neg, Tensor q, Tensor? r, Tensor? labels, "
        "Tensor? ref_labels, Tensor? pos_bits, Tensor? neg_bits, int dist, int kind, float pos_scale, "
        "float pos_center, float neg_scale, float neg_center, float? eps, Tensor red_pos, Tensor red_neg, "
        "Tensor thresholds, Tensor? col_mask=None, bool need_r=True) -> (Tensor, Tensor)");
  // MultiSimilarityMiner pass 1: per row (hardest positive value, hardest negative value).
  m.def("ms_thresholds(Tensor q, Tensor? r, Tensor? labels, Tensor? ref_labels, Tensor? pos_bits, "
        "Tensor? neg_bits, int dist) -> (Tensor, Tensor)");
  // The pairs MultiSimilarityMiner(eps) keeps, bit-packed (N × ceil(M/8) uint8 each).
  m.def("ms_mask(Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, float eps) -> (Tensor, Tensor)");
  // BatchHardMiner: per row, index of the hardest positive and hardest negative (-1 if a set is empty).
  m.def("batch_hard(Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist) -> (Tensor, Tensor)");
  // Triplet margin loss over every valid triplet (a, p, n) of each anchor row, without the N×M×M set:
  // per anchor, the sum of relu(violation) and the number of violating triplets (sorting + prefix sums).
  m.def("triplet_all(Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, float margin) -> (Tensor, Tensor)");
  // LiftedStructureLoss, positive-pair pass (self mode, label masks): per row i, Σ over its positives k of
  // ½ relu(pair_ik + margin(v_ik, pos_margin))² with pair_ik = logaddexp of the rows' negative LSEs a_i, a_k
  // (only those with has_neg), and the number of positives. Differentiable in q and a.
  m.def("lifted_pos(Tensor q, Tensor labels, Tensor a, Tensor has_neg, int dist, float pos_margin) -> (Tensor, Tensor)");
  m.def("lifted_pos_backward(Tensor grad_sum, Tensor q, Tensor labels, Tensor a, Tensor has_neg, int dist, "
        "float pos_margin) -> (Tensor, Tensor)");
  m.def("triplet_all_backward(Tensor grad_total, Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, "
        "float margin) -> (Tensor, Tensor)");
  // Per-row reduction statistics (SPEC §7; cpu/stats_ops.cpp): per anchor row, Σ l, Σ l·[lo < l < hi] and their
  // counts of the pair hinges l = relu(a(v − c)) (rows: pos Σ, pos band Σ, neg Σ, neg band Σ; counts int64 alike)
  // or of the triplet elements relu(violation) over every valid triplet (rows: Σ, band Σ). ±inf = unbounded.
  m.def("hinge_stats(Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, float pa, float pc, "
        "float na, float nc, float pos_low, float pos_high, float neg_low, float neg_high) -> (Tensor, Tensor)");
  m.def("hinge_stats_backward(Tensor grad_sums, Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, "
        "float pa, float pc, float na, float nc, float pos_low, float pos_high, float neg_low, float neg_high, "
        "bool need_r) -> (Tensor, Tensor)");
  m.def("triplet_stats(Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, float margin, float low, "
        "float high) -> (Tensor, Tensor)");
  m.def("triplet_stats_backward(Tensor grad_sums, Tensor q, Tensor? r, Tensor labels, Tensor? ref_labels, int dist, "
        "float margin, float low, float high) -> (Tensor, Tensor)");
  // The contrastive family's loss-specific pair terms (pair_terms.h: loss codes, params, row statistics), per
  // query row and set: sums (2, N) [pos, neg] = Σ or log Σ e^ (per loss) of the terms, counts (4, N) int64 [pos
  // pairs, neg pairs, active pos terms, active neg terms]; row_stats (K, N), K the loss's statistics count.
  m.def("pair_terms(Tensor q, Tensor? r, Tensor? labels, Tensor? ref_labels, Tensor? pos_bits, Tensor? neg_bits, "
        "int dist, int loss, float[] params, Tensor row_stats) -> (Tensor, Tensor)");
  m.def("pair_terms_backward(Tensor grad_sums, Tensor q, Tensor? r, Tensor? labels, Tensor? ref_labels, "
        "Tensor? pos_bits, Tensor? neg_bits, int dist, int loss, float[] params, Tensor row_stats, Tensor sums, "
        "bool need_r) -> (Tensor, Tensor, Tensor)");
  // The CPU class engine's row work on one block of class logits (cpu/class_ops.cpp; CPU only): A (n×C) is
  // overwritten with the non-target softmax numerators exp(logit − m) (0 at the target and at clamped squared
  // distances; times col_scale with scale_out); returns (4, n) rows [target value, m, Σ_{c≠y} exp, Σ of the row].
  m.def("class_rows(Tensor(a!) A, Tensor labels, float scale, Tensor? col_scale, Tensor? qn, Tensor? rn, "
        "bool scale_out=False) -> Tensor");
  // Grouped-column class losses (SubCenterArcFace, SoftTriple; grouped_classes.h): x (B×D), W (D×C·K, PML's layout,
  // any strides), K centres per class reduced by mode (0 = max, 1 = softmax over the centres at 1/γ), params =
  // [a, 1/γ, w_eps (> 0: W's columns normalised)]. Per row: (t = the target class's value, rest = LSE_{c≠y} a·v_c).
  m.def("grouped_class_rows(Tensor x, Tensor W, Tensor labels, int K, int mode, float[] params) -> (Tensor, Tensor)");
  m.def("grouped_class_rows_backward(Tensor grad_t, Tensor grad_rest, Tensor x, Tensor W, Tensor labels, Tensor rest, "
        "int K, int mode, float[] params, bool need_x, bool need_w) -> (Tensor, Tensor)");
}
