"""Built-in editing methods, one folder each (hyperparameters beside the algorithm).

``editkit.methods.ROME``, ``editkit.methods.MEND`` ... resolve lazily through the method
registry, so importing this package does not import every method.
"""

from __future__ import annotations


def __getattr__(name: str):
    from editkit.registry import METHODS

    if name.startswith("_"):
        raise AttributeError(name)

    for method in METHODS.names():
        cls = METHODS.get(method)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'editkit.methods' has no attribute {name!r}")
