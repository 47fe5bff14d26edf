"""Typed errors. Every error editkit raises on bad input is an ``EditkitError``.

Subclasses also inherit the builtin a caller would expect (``ValueError``, ``KeyError``,
``RuntimeError``) so existing ``except`` habits keep working. Messages name the bad value
and say how to fix it.
"""

from __future__ import annotations


class EditkitError(Exception):
    """Base class of every error editkit raises deliberately."""


class InvalidRequestError(EditkitError, ValueError):
    """An ``EditRequest`` is malformed (placeholder, empty or non-string fields)."""


class UnsupportedObjectiveError(InvalidRequestError):
    """A request's editing objective (``erase``, ``force``, ...) is one this method cannot
    optimise (see ``Editor.objectives``)."""


class SubjectNotFoundError(EditkitError, ValueError):
    """The subject's tokens cannot be located in the tokenized prompt."""


class UnsupportedModelError(EditkitError, KeyError):
    """No ``ModelAdapter`` is registered for the model's ``config.model_type``."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0]) if self.args else ""


class ReplayMismatchError(UnsupportedModelError):
    """Re-running a model's blocks and head does not reproduce the model's own forward.

    The model's ``ModelAdapter`` misses part of the family's forward (a logit soft-cap or
    scale, a block call convention), so anything computed on the replay (a v* optimisation, a
    causal trace) would be computed on the wrong logits. Raised before anything is edited.
    """


class UnknownMethodError(EditkitError, KeyError):
    """No editing method is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidHyperParamsError(EditkitError, ValueError):
    """A hyperparameter is out of range for the method or the model."""


class EditFailedError(EditkitError, RuntimeError):
    """Computing or applying an update failed; the model was left unchanged."""


class PatchMismatchError(EditkitError, ValueError):
    """A patch does not fit the model it is applied to (names, shapes or base weights)."""


class StatsError(EditkitError, RuntimeError):
    """Second-moment statistics could not be computed or loaded."""


class DatasetFormatError(EditkitError, ValueError):
    """A dataset record does not have the expected format."""


class HistoryError(EditkitError, ValueError):
    """A revert names an edit that is not in the editor's history."""


class TokenizerError(EditkitError, ValueError):
    """No tokenizer was given and none could be loaded for the model."""


class DatasetUnavailableError(DatasetFormatError):
    """A dataset cannot be loaded (hub unreachable, ``datasets`` not installed, no such file)."""


class UnknownMetricError(EditkitError, KeyError):
    """No evaluation metric is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HypernetworkMissingError(EditkitError, ValueError):
    """A learned editor (MEND, KE) has no trained hypernetwork to edit with."""


class HypernetworkMismatchError(EditkitError, ValueError):
    """A saved hypernetwork was trained for another base model or another configuration."""


class ModelUnavailableError(EditkitError, ImportError):
    """A built-in model's files or the packages needed to load them are not installed."""
