"""Model adapters: the only place in editkit that knows module names.

Built-in families are registered through the ``editkit.adapters`` entry points in
``pyproject.toml`` (key = ``config.model_type``), the same way plugins register theirs.
An adapter also owns the family's head, block call and embedding scale (see
:mod:`editkit.models.adapter`); :mod:`editkit.models.compat` holds every difference between
transformers releases that editkit depends on.
"""

from editkit.models.adapter import ModelAdapter, WeightLayout

__all__ = ["ModelAdapter", "WeightLayout"]
