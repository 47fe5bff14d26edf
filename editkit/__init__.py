"""editkit: edit, trace and evaluate facts stored in transformer language models.

    from editkit import EditRequest
    from editkit.methods.ft import FTL
    editor = FTL(model, tokenizer).apply(EditRequest("{} plays the sport of", "LeBron James",
                                                     "football"))
    editor.revert()
"""

from __future__ import annotations

from editkit._version import __version__
from editkit.editor import AppliedEdit, EditHistory, Editor, apply_patch, revert
from editkit.errors import (
    DatasetFormatError,
    EditFailedError,
    EditkitError,
    HistoryError,
    InvalidHyperParamsError,
    InvalidRequestError,
    PatchMismatchError,
    StatsError,
    SubjectNotFoundError,
    TokenizerError,
    UnknownMethodError,
    UnsupportedModelError,
)
from editkit.hparams import HyperParams
from editkit.layouts import Dense, LowRank, WeightLayout
from editkit.models.adapter import ModelAdapter
from editkit.patch import Patch, load_patch
from editkit.registry import (
    ADAPTERS,
    METHODS,
    TEXT_SOURCES,
    get_adapter,
    get_method,
    list_adapters,
    list_methods,
)
from editkit.requests import EditRequest, Objective

__all__ = [
    "ADAPTERS", "METHODS", "AppliedEdit", "DatasetFormatError", "Dense", "EditFailedError",
    "EditHistory", "EditRequest", "EditkitError", "Editor", "HistoryError", "HyperParams",
    "InvalidHyperParamsError", "InvalidRequestError", "LowRank", "ModelAdapter", "Objective",
    "Patch",
    "PatchMismatchError", "StatsError", "SubjectNotFoundError", "TEXT_SOURCES", "TokenizerError",
    "UnknownMethodError", "UnsupportedModelError", "WeightLayout", "__version__", "apply_patch",
    "get_adapter", "get_method", "list_adapters", "list_methods", "load_patch", "revert",
]


def __getattr__(name: str):
    # Methods (``editkit.ROME``, ``editkit.MEND`` ...) load lazily through the registry.
    if not name.startswith("_"):
        import importlib

        try:
            return getattr(importlib.import_module("editkit.methods"), name)
        except AttributeError:
            pass
    raise AttributeError(f"module 'editkit' has no attribute {name!r}")
