"""The seeds' methods in ``python -m dml_kernels train``: their options, inputs and loss construction.

How each method is trained by the ``train`` command (all other options as for any loss):

* direction regularisation (seed 002 §6.2, eq. 33–35): ``--loss TripletMarginLoss | MultiSimilarityLoss |
  ProxyNCALoss --loss-args direction_gamma=0.3``;
* language guidance (seed 002 §6.1, eq. 28–30): ``--loss LanguageGuidanceLoss --loss-args weight=1
  --base-loss MultiSimilarityLoss``. Every step passes ``language_embeddings[labels]``, one row per sample,
  from a **toy text encoder** (:func:`digit_text_embeddings`): the project loads no language model, so the
  "text embedding" of digit c is a bag of the character trigrams of its English word ("zero" … "nine"),
  each trigram mapped to a fixed Gaussian vector seeded by its CRC-32 (a hashed random projection of the
  trigram counts, ``--language-dim`` wide, ``--language-seed``). It knows spelling, nothing about what digits
  look like: the words 0–4 share no trigram, so the teacher's similarities between different digits are
  near 0 and about equal. It is a stand-in that exercises the method's wiring, not a language model;
* DML-DA (seed 001, eq. 5–9): ``--loss DensityAdaptivityLoss --loss-args weight=10 --base-loss
  ContrastiveLoss``; ``num_classes`` (5) comes automatically and ``original_densities`` D⁽⁰⁾ is
  ``dk.functional.class_densities`` of the representation before the embedding — here the 64 raw pixels of
  all training digits (the paper: GoogLeNet pool5 features). The distractor features are left out of D⁽⁰⁾:
  they are class-independent noise, which adds about the same distractors·std² (16 by default) to every
  class's density;
* ProxyGML (seed 002 §5.3): ``--loss ProxyGMLLoss`` (``num_classes`` = 5 and ``embedding_size`` automatic).
  Note: with its defaults (N = 12 proxies per class, r = 0.05) five classes give K = ceil(0.05·60) = 3 < N
  selected proxies, so only own-class proxies are selected, the class term is 0 and the network gets no
  gradient (``dml_kernels/functional/proxy_gml.py`` says so); ``r=0.5`` (K = 30) is the run that trains.

``--base-loss NAME --base-loss-args KEY=VALUE ...`` builds the base loss of a wrapper loss (one that takes
``loss=``) as ``--loss`` builds any loss (proxy losses get their sizes) and passes it as ``loss=``.

``python -m dml_kernels.train_compare`` runs each method beside its base loss and tabulates the logs.
"""
from __future__ import annotations

import ast
import inspect
import zlib

import torch
from torch import nn

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WRAPPERS = ("LanguageGuidanceLoss", "DensityAdaptivityLoss")  # losses that take a base loss as loss=


def parse_loss_args(items):
    """``["epsilon=0.1", "distance='cosine'"]`` → ``{"epsilon": 0.1, "distance": "cosine"}`` (bare words stay str)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--loss-args: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip().replace("-", "_")] = value
    return out


def build_dk_loss(name, kwargs, embedding_size, num_classes, backend):
    from . import losses

    cls = getattr(losses, name, None)
    if cls is None or not isinstance(cls, type):
        raise SystemExit(f"--loss {name!r} is not a dk.losses class; choose one of {', '.join(losses.__all__)}")
    kwargs = dict(kwargs)
    params = inspect.signature(cls.__init__).parameters
    if "num_classes" in params:
        kwargs.setdefault("num_classes", num_classes)
    if "embedding_size" in params:
        kwargs.setdefault("embedding_size", embedding_size)
    if backend != "auto":
        kwargs.setdefault("backend", backend)
    try:
        return cls(**kwargs), kwargs
    except TypeError as e:
        raise SystemExit(f"--loss-args for {name}: {e}") from None


def add_arguments(p):
    """The train command's options for the seed methods."""
    p.add_argument("--base-loss", default=None, metavar="NAME",
                   help=f"base loss of a wrapper loss ({', '.join(WRAPPERS)}), passed as its loss=")
    p.add_argument("--base-loss-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor arguments of the base loss, values as Python literals")
    p.add_argument("--language-dim", type=int, default=256,
                   help="width of the toy text encoder's digit embeddings (LanguageGuidanceLoss; default %(default)s)")
    p.add_argument("--language-seed", type=int, default=0, help="seed of the toy text encoder's projection")


def check_arguments(p, args):
    if args.base_loss is not None and args.loss not in WRAPPERS:
        p.error(f"--base-loss applies to a wrapper loss ({', '.join(WRAPPERS)}), not to {args.loss}")
    if args.base_loss_args and args.base_loss is None:
        p.error("--base-loss-args needs --base-loss")
    if args.base_loss is not None and args.compare != "none":
        p.error("--compare pml: PML has no wrapper loss with a base loss (--base-loss)")
    if args.language_dim < 1:
        p.error("--language-dim must be at least 1")


def digit_text_embeddings(dim=256, seed=0, words=NUMBER_WORDS):
    """The toy text encoder: (len(words), dim) float64, row c = Σ over the character trigrams t of
    ``"#" + words[c] + "#"`` of g(t), g(t) ~ N(0, I/dim) drawn from a generator seeded by
    (CRC-32 of t) XOR ``seed``, then L2-normalised. Deterministic across processes and platforms (no Python
    ``hash``). A hashed random projection of the trigram counts: words sharing trigrams get cosine > 0."""
    rows = []
    for word in words:
        padded = f"#{word}#"
        v = torch.zeros(dim, dtype=torch.float64)
        for i in range(len(padded) - 2):
            gram = padded[i:i + 3]
            g = torch.Generator().manual_seed(zlib.crc32(gram.encode()) ^ int(seed))
            v += torch.randn(dim, generator=g, dtype=torch.float64) / dim ** 0.5
        rows.append(v / v.norm())
    return torch.stack(rows)


class WithLanguage(nn.Module):
    """``loss(embeddings, labels)`` → ``language_loss(embeddings, labels, table[labels])``: each sample gets its
    class's text embedding (labels are the digits, rows of ``table``)."""

    def __init__(self, language_loss, table):
        super().__init__()
        self.loss = language_loss
        self.register_buffer("table", table.detach().clone())

    def forward(self, embeddings, labels, indices_tuple=None):
        return self.loss(embeddings, labels, self.table[labels].to(embeddings.dtype), indices_tuple)


def build_loss(args, loss_kwargs, embedding_size, x_train, y_train, num_classes):
    """The loss module for ``args.loss`` (with its base loss and the method's inputs), the constructor
    arguments to log, and a dict describing the method's extras for the JSON log."""
    from . import functional as F

    method = {}
    kwargs = dict(loss_kwargs)
    if args.base_loss is not None:
        base_kwargs = parse_loss_args(args.base_loss_args)
        base, base_kwargs = build_dk_loss(args.base_loss, base_kwargs, embedding_size, num_classes, args.backend)
        kwargs["loss"] = base
        method["base_loss"] = args.base_loss
        method["base_loss_kwargs"] = {k: repr(v) for k, v in base_kwargs.items()}
    if args.loss == "DensityAdaptivityLoss" and "original_densities" not in kwargs:
        d0 = F.class_densities(x_train.double(), y_train, num_classes)
        kwargs["original_densities"] = d0
        method["original_densities"] = [float(v) for v in d0]
        method["original_densities_from"] = "dk.functional.class_densities of the 64 raw pixels of the training digits"
    loss, kwargs = build_dk_loss(args.loss, kwargs, embedding_size, num_classes, args.backend)
    if args.loss == "LanguageGuidanceLoss":
        table = digit_text_embeddings(args.language_dim, args.language_seed)
        loss = WithLanguage(loss, table)
        method["language_embeddings"] = (
            f"toy text encoder: hashed character-trigram bag of the words {', '.join(NUMBER_WORDS)} "
            f"projected to {args.language_dim} dims (seed {args.language_seed}); no language model")
        method["language_cosines_train_digits"] = (table[:num_classes] @ table[:num_classes].T).tolist()
    log_kwargs = {k: ("<base loss>" if k == "loss" else f"<{tuple(v.shape)} tensor>" if torch.is_tensor(v) else v)
                  for k, v in kwargs.items()}
    return loss, log_kwargs, method


def stem_parts(args):
    """Extra parts of the output file name: the base loss and its arguments, the seed when not 0."""
    tag = "".join(c if c.isalnum() or c in "=.-" else "_" for c in "_".join(args.base_loss_args))
    return [args.base_loss or "", tag, f"seed{args.seed}" if args.seed else ""]
