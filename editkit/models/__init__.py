"""Model adapters: the only place in editkit that knows module names.

Built-in families are registered through the ``editkit.adapters`` entry points in
``pyproject.toml`` (key = ``config.model_type``), the same way plugins register theirs.
"""

from editkit.models.adapter import ModelAdapter, WeightLayout

__all__ = ["ModelAdapter", "WeightLayout"]
