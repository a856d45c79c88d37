"""Registers every reference function as the ``reference`` backend of the op of the same name."""
from . import reference
from ._backends import register

for _name in reference.__all__:
    register(_name, "reference")(getattr(reference, _name))
