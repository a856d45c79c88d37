"""Per-GPU memory model of class-sharded training (``dk.distributed.sharded_proxy_nca_loss``): bytes for the
weight shard, its gradient and optimiser state, the per-step logits or statistics, and the communication per
step — against the dense per-shard logits a PML-style or Partial FC step forms.

    python benchmarks/memory_model.py [--dim 512] [--batch-per-gpu 64] [--markdown]

A model from the algorithm's shapes, not a measurement (no multi-GPU machine has run it). Assumptions: fp32
weights (4 B), bf16 embeddings (2 B), Adam (2 fp32 states per weight), fp32 statistics; the fused path keeps
per row of the global batch a target logit, a log-sum-exp and a flag per rank (W × B_global values after the
gather), never a B_global × C/W block; ring collectives move 2(W−1)/W of an all-reduced buffer and (W−1)/W of
an all-gathered one per rank.
"""
from __future__ import annotations

import argparse

# Partial FC's published per-GPU logits at 10M classes, 64 GPUs, batch 64 per GPU (its paper's table; its
# "GB" are thousands of MiB: 4096 × 156,250 × 4 B = 2,441 MiB).
PARTIAL_FC_PUBLISHED_MIB = {"unsampled": 2440, "sampled 10%": 250}


def per_gpu(num_classes: int, world: int, dim: int, batch_per_gpu: int) -> dict:
    """Bytes per GPU for one training step."""
    shard = -(-num_classes // world)
    b_global = batch_per_gpu * world
    weights = shard * dim * 4
    return {
        "weights": weights,
        "weight grad": weights,
        "Adam state": 2 * weights,
        "dense logits (B_global × C/W, fp32)": b_global * shard * 4,
        "dense logits, 10% sampled": b_global * int(0.1 * shard) * 4,
        "fused statistics": world * b_global * (4 + 1) + 2 * b_global * 4,
        "gathered embeddings (bf16) + their fp32 grad": b_global * dim * (2 + 4),
        "communication per step": int(b_global * dim * 2 * (world - 1) / world  # all-gather embeddings
                                      + world * b_global * 5 * (world - 1) / world  # all-gather statistics
                                      + b_global * 4 * 2 * (world - 1) / world  # all-reduce target logits
                                      + b_global * dim * 4 * 2 * (world - 1) / world),  # embedding grads
    }


def _fmt(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(dim: int, batch_per_gpu: int) -> str:
    rows = [(c, w, per_gpu(c, w, dim, batch_per_gpu)) for c in (1_000_000, 10_000_000, 100_000_000) for w in (8, 64)]
    keys = list(rows[0][2])
    lines = ["| C | GPUs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for c, w, r in rows:
        lines.append(f"| {c:,} | {w} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    pfc = per_gpu(10_000_000, 64, dim, batch_per_gpu)
    lines.append("")
    mib = 2 ** 20
    lines.append(f"Partial FC at C = 10M, 64 GPUs, batch {batch_per_gpu}/GPU: published logits "
                 f"{PARTIAL_FC_PUBLISHED_MIB['unsampled']} MiB unsampled / {PARTIAL_FC_PUBLISHED_MIB['sampled 10%']} MiB"
                 f" at 10 % sampling; this model's dense logits "
                 f"{pfc['dense logits (B_global × C/W, fp32)'] / mib:.0f} MiB / "
                 f"{pfc['dense logits, 10% sampled'] / mib:.0f} MiB; the fused statistics "
                 f"{pfc['fused statistics'] / mib:.2f} MiB (dim {dim}).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch-per-gpu", type=int, default=64)
    args = p.parse_args(argv)
    print(table(args.dim, args.batch_per_gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
