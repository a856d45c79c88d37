"""``python -m dml_kernels verify | bench | ops | train``."""
import sys


def ops_table() -> str:
    """Markdown table of which backends register which op (loads every backend that can load here)."""
    from . import _registry
    from ._ops import OPS

    lines = ["| op | " + " | ".join(_registry.BACKENDS) + " |", "|---|" + "---|" * len(_registry.BACKENDS)]
    for op in OPS:
        have = _registry.implemented(op)
        lines.append(f"| `{op}` | " + " | ".join("✓" if b in have else "—" for b in _registry.BACKENDS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m dml_kernels {verify,bench,ops,train} [options]\n"
             "  verify  check every available backend against the float64 reference (and PML) and print a table\n"
             "  bench   run the benchmark harness (see --help)\n"
             "  ops     print the op × backend table (which backends implement which op) as Markdown\n"
             "  train   train an embedding net on scikit-learn's digits 0-4, evaluate on unseen 5-9 (see --help)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as verify_main
        return verify_main(rest)
    if command == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if command == "train":
        from .train import main as train_main
        return train_main(rest)
    if command == "ops":
        print(ops_table())
        return 0
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
