"""Independent naive implementations for testing the reference: explicit Python loops over pairs and
triplets, built from 0-dim torch ops (so autograd gives gradients), sharing no code with dml_kernels."""
import math

import torch


def _vec(v, normalize):
    return v / v.norm().clamp_min(1e-12) if normalize else v


def value(xi, rk, name, normalize):
    """Similarity (cosine/dot) or distance (euclidean/squared_euclidean) of two vectors."""
    a, b = _vec(xi, normalize), _vec(rk, normalize)
    if name in ("cosine", "dot"):
        return (a * b).sum()
    sq = ((a - b) ** 2).sum()
    if name == "squared_euclidean":
        return sq
    return sq.sqrt() if sq > 0 else sq * 0


def is_sim(name):
    return name in ("cosine", "dot")


def margin(name, a, b):
    """PML's margin(a, b): a - b for a distance, b - a for a similarity."""
    return b - a if is_sim(name) else a - b


def pairs_of(i, labels, ref_labels, self_mode):
    pos = [k for k in range(len(ref_labels)) if ref_labels[k] == labels[i] and not (self_mode and k == i)]
    neg = [k for k in range(len(ref_labels)) if ref_labels[k] != labels[i]]
    return pos, neg


def log1p_sum_exp(values):
    return torch.log(1 + sum(torch.exp(v) for v in values)) if values else torch.zeros((), dtype=torch.float64)


def lse(values):
    return torch.log(sum(torch.exp(v) for v in values)) if values else torch.zeros((), dtype=torch.float64)


def _setup(x, labels, ref, ref_labels):
    self_mode = ref is None
    ref = x if self_mode else ref
    ref_labels = labels if self_mode else ref_labels
    return self_mode, ref, [int(v) for v in labels], [int(v) for v in ref_labels]


def ms_mined_pairs(x, labels, ref, ref_labels, epsilon, name, normalize=True):
    """Per row (kept positives, kept negatives) by PML's MultiSimilarityMiner rule."""
    self_mode, ref, labels, ref_labels = _setup(x, labels, ref, ref_labels)
    out = []
    for i in range(len(labels)):
        pos, neg = pairs_of(i, labels, ref_labels, self_mode)
        s = {k: float(value(x[i], ref[k], name, normalize).detach()) for k in pos + neg}
        if epsilon is None:
            out.append((pos, neg))
            continue
        if is_sim(name):
            hardest_neg = max([s[k] for k in neg], default=-math.inf)
            hardest_pos = min([s[k] for k in pos], default=math.inf)
            out.append(([k for k in pos if s[k] - epsilon < hardest_neg], [k for k in neg if s[k] + epsilon > hardest_pos]))
        else:
            hardest_neg = min([s[k] for k in neg], default=math.inf)
            hardest_pos = max([s[k] for k in pos], default=-math.inf)
            out.append(([k for k in pos if s[k] + epsilon > hardest_neg], [k for k in neg if s[k] - epsilon < hardest_pos]))
    return out


def multi_similarity(x, labels, ref=None, ref_labels=None, alpha=2, beta=50, base=0.5, epsilon=None,
                     name="cosine", normalize=True):
    mined = ms_mined_pairs(x, labels, ref, ref_labels, epsilon, name, normalize)
    r = x if ref is None else ref
    if sum(len(p) for p, _ in mined) <= 1 and sum(len(n) for _, n in mined) <= 1:
        return torch.zeros((), dtype=torch.float64)
    total = 0
    for i, (pos, neg) in enumerate(mined):
        pv = [alpha * margin(name, value(x[i], r[k], name, normalize), base) for k in pos]
        nv = [beta * margin(name, base, value(x[i], r[k], name, normalize)) for k in neg]
        total = total + log1p_sum_exp(pv) / alpha + log1p_sum_exp(nv) / beta
    return total / len(mined)


def generalized_lifted(x, labels, ref=None, ref_labels=None, neg_margin=1, pos_margin=0, name="euclidean",
                       normalize=True):
    self_mode, r, labels, ref_labels = _setup(x, labels, ref, ref_labels)
    rows = [pairs_of(i, labels, ref_labels, self_mode) for i in range(len(labels))]
    if sum(len(p) for p, _ in rows) <= 1 and sum(len(n) for _, n in rows) <= 1:
        return torch.zeros((), dtype=torch.float64)
    total = 0
    for i, (pos, neg) in enumerate(rows):
        pv = [margin(name, value(x[i], r[k], name, normalize), pos_margin) for k in pos]
        nv = [margin(name, neg_margin, value(x[i], r[k], name, normalize)) for k in neg]
        total = total + torch.relu(lse(pv) + lse(nv))
    return total / len(rows)


def lifted(x, labels, neg_margin=1, pos_margin=0, name="euclidean", normalize=True):
    labels = [int(v) for v in labels]
    n = len(labels)
    pos_pairs = [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    negs = {i: [k for k in range(n) if labels[k] != labels[i]] for i in range(n)}
    num_neg = sum(len(v) for v in negs.values())
    if not pos_pairs or num_neg == 0 or (len(pos_pairs) <= 1 and num_neg <= 1):
        return torch.zeros((), dtype=torch.float64)
    total = 0
    for i, j in pos_pairs:
        terms = [margin(name, neg_margin, value(x[a], x[k], name, normalize)) for a in (i, j) for k in negs[a]]
        log_term = lse(terms)
        total = total + torch.relu(log_term + margin(name, value(x[i], x[j], name, normalize), pos_margin)) ** 2 / 2
    return total / len(pos_pairs)


def avg_nonzero(values):
    kept = [v for v in values if v > 0]
    return sum(kept) / len(kept) if kept else torch.zeros((), dtype=torch.float64)


def contrastive(x, labels, ref=None, ref_labels=None, pos_margin=0, neg_margin=1, name="euclidean", normalize=True):
    self_mode, r, labels, ref_labels = _setup(x, labels, ref, ref_labels)
    pos_l, neg_l = [], []
    for i in range(len(labels)):
        pos, neg = pairs_of(i, labels, ref_labels, self_mode)
        pos_l += [torch.relu(margin(name, value(x[i], r[k], name, normalize), pos_margin)) for k in pos]
        neg_l += [torch.relu(margin(name, neg_margin, value(x[i], r[k], name, normalize))) for k in neg]
    if len(pos_l) <= 1 and len(neg_l) <= 1:
        return torch.zeros((), dtype=torch.float64)
    return avg_nonzero(pos_l) + avg_nonzero(neg_l)


def triplet(x, labels, ref=None, ref_labels=None, m=0.05, swap=False, smooth=False, batch_hard=False,
            name="euclidean", normalize=True):
    self_mode, r, labels, ref_labels = _setup(x, labels, ref, ref_labels)
    losses = []
    for a in range(len(labels)):
        pos, neg = pairs_of(a, labels, ref_labels, self_mode)
        if batch_hard:
            if not pos or not neg:
                continue
            key = (lambda k: float(value(x[a], r[k], name, normalize).detach()))
            # hardest positive: farthest (least similar); hardest negative: closest (most similar); lowest index on ties
            if is_sim(name):
                pos = [min(pos, key=key)]
                neg = [max(neg, key=key)]
            else:
                pos = [max(pos, key=key)]
                neg = [min(neg, key=key)]
        for p in pos:
            for n in neg:
                ap, an = value(x[a], r[p], name, normalize), value(x[a], r[n], name, normalize)
                if swap:
                    pn = value(r[p], r[n], name, normalize)
                    an = torch.maximum(an, pn) if is_sim(name) else torch.minimum(an, pn)
                v = margin(name, ap, an) + m
                losses.append(torch.nn.functional.softplus(v) if smooth else torch.relu(v))
    return avg_nonzero(losses)


def n_pairs(x, labels, name="dot", normalize=True):
    labels = [int(v) for v in labels]
    anchors, positives = [], []
    for c in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == c]
        if len(idx) >= 2:
            anchors.append(idx[0])
            positives.append(idx[1])
    if not anchors:
        return torch.zeros((), dtype=torch.float64)
    total = 0
    for t, a in enumerate(anchors):
        s = [value(x[a], x[p], name, normalize) for p in positives]
        s = s if is_sim(name) else [-v for v in s]
        total = total - (s[t] - lse(s))
    return total / len(anchors)


def proxy_nca(x, labels, proxies, scale=1, exclude_positive=False, name="squared_euclidean", normalize=True):
    total = 0
    for i, y in enumerate(int(v) for v in labels):
        logits = [value(x[i], proxies[c], name, normalize) for c in range(len(proxies))]
        logits = [scale * (v if is_sim(name) else -v) for v in logits]
        denom = [v for c, v in enumerate(logits) if not (exclude_positive and c == y)]
        total = total - (logits[y] - lse(denom))
    return total / len(labels)


def proxy_anchor(x, labels, proxies, m=0.1, alpha=32, name="cosine", normalize=True):
    labels = [int(v) for v in labels]
    pos_total, neg_total, with_pos = 0, 0, 0
    for c in range(len(proxies)):
        s = {i: value(x[i], proxies[c], name, normalize) for i in range(len(labels))}
        pv = [alpha * margin(name, s[i], m) for i in s if labels[i] == c]
        nv = [alpha * margin(name, -m, s[i]) for i in s if labels[i] != c]
        if pv:
            with_pos += 1
            pos_total = pos_total + log1p_sum_exp(pv)
        neg_total = neg_total + log1p_sum_exp(nv)
    return (pos_total / with_pos if with_pos else 0) + neg_total / len(proxies)


def triplet_margin_miner(x, labels, ref=None, ref_labels=None, m=0.2, kind="all", name="euclidean", normalize=True):
    self_mode, r, labels, ref_labels = _setup(x, labels, ref, ref_labels)
    out = set()
    for a in range(len(labels)):
        pos, neg = pairs_of(a, labels, ref_labels, self_mode)
        for p in pos:
            for n in neg:
                ap, an = float(value(x[a], r[p], name, normalize).detach()), float(value(x[a], r[n], name, normalize).detach())
                t = ap - an if is_sim(name) else an - ap
                keep = {"all": t <= m, "hard": t <= m and t <= 0, "semihard": 0 < t <= m, "easy": t > m}[kind]
                if keep:
                    out.add((a, p, n))
    return out
