"""Every public class of PML's ``losses``, ``miners``, ``reducers``, ``regularizers``, ``distances`` (and the
``utils.distributed`` wrappers) exists in the same-named dml_kernels module under the same name, is a class,
and takes PML's named constructor arguments with PML's defaults (when PML is installed)."""
import inspect

import pytest

import dml_kernels as dk

pml = pytest.importorskip("pytorch_metric_learning")
import importlib  # noqa: E402

# PML module (under pytorch_metric_learning) → dml_kernels module
FAMILIES = {"losses": dk.losses, "miners": dk.miners, "reducers": dk.reducers, "regularizers": dk.regularizers,
            "distances": dk.distances, "utils.distributed": dk.distributed}


def pml_public_classes(family):
    """The classes a PML user reaches as ``pytorch_metric_learning.<family>.<Name>`` (defined in PML)."""
    mod = importlib.import_module(f"pytorch_metric_learning.{family}")
    names = []
    for name in dir(mod):
        obj = getattr(mod, name)
        if name.startswith("_") or not isinstance(obj, type) or not obj.__module__.startswith("pytorch_metric_learning"):
            continue
        if family == "utils.distributed" and obj.__module__ != mod.__name__:
            continue  # classes distributed.py merely imports (BaseMetricLossFunction, ...) belong to other families
        names.append(name)
    return sorted(names)


def test_pml_lists_are_read():
    assert "ContrastiveLoss" in pml_public_classes("losses") and "BaseMiner" in pml_public_classes("miners")
    assert "DistributedLossWrapper" in pml_public_classes("utils.distributed")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pml_class_exists(family):
    ours = FAMILIES[family]
    missing = [n for n in pml_public_classes(family) if not isinstance(getattr(ours, n, None), type)]
    assert not missing, f"PML's {family} classes missing from dml_kernels.{ours.__name__.split('.', 1)[1]}: {missing}"


def _named_params(cls):
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _same_default(a, b):
    if inspect.isfunction(a) and inspect.isfunction(b):  # e.g. PerAnchorReducer's aggregation_func: ours, same rule
        return a.__name__ == b.__name__
    return type(a) is type(b) and a == b if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) \
        else a == b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_constructor_arguments_and_defaults(family):
    """PML's named constructor arguments exist in ours (or ours takes **kwargs) with PML's default values."""
    pml_mod, ours = importlib.import_module(f"pytorch_metric_learning.{family}"), FAMILIES[family]
    problems = []
    for name in pml_public_classes(family):
        cls = getattr(ours, name, None)
        if not isinstance(cls, type):
            continue  # reported by test_every_pml_class_exists
        theirs, mine = _named_params(getattr(pml_mod, name)), _named_params(cls)
        var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
        for arg, p in theirs.items():
            if arg not in mine:
                if not var_kw:
                    problems.append(f"{name}: no argument {arg!r}")
                continue
            if p.default is not p.empty and not _same_default(mine[arg].default, p.default):
                problems.append(f"{name}({arg}=...): default {mine[arg].default!r}, PML's {p.default!r}")
    assert not problems, "\n".join(problems)
