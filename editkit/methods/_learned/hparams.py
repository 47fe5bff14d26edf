"""Typed configuration shared by the learned editors (MEND, KE).

Two dataclasses per method:

- the **editor** hyperparameters (a :class:`~editkit.hparams.HyperParams`): which weights the
  hypernetwork edits (layer indices and adapter slots, never module paths), the hypernetwork's
  architecture, and where a trained hypernetwork is stored;
- the **training** configuration (:class:`LearnedTrainConfig`): optimisation, validation,
  early stopping, checkpointing and the size of the data given to each step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, TypeVar

from editkit.errors import InvalidHyperParamsError
from editkit.hparams import HyperParams, JSONDataclass

logger = logging.getLogger(__name__)

#: Adapter slots a learned editor may edit (linear projections with a keys→values view).
EDITABLE_SLOTS = ("mlp_in", "mlp_out", "mlp_gate", "attn_out")
#: How many of the last blocks are edited when ``layers`` is not given (MEND paper: 3).
DEFAULT_LAST_BLOCKS = 3

C = TypeVar("C", bound="LearnedTrainConfig")


@dataclasses.dataclass
class LearnedHyperParams(HyperParams):
    """Editor hyperparameters common to MEND and KE.

    ``layers``: block indices whose ``slots`` weights are edited; negative indices count from
    the end; ``None`` = the last three blocks (the MEND paper's choice).
    ``slots``: adapter slots edited in each of those blocks (default MLP input and output
    projections).
    ``hypernet_path``: directory of a trained hypernetwork (``hypernet.safetensors`` +
    ``hypernet.json``), written by ``train`` / ``editkit train-<method>``. ``None`` means: use
    the hypernetwork the editor was built with, else a shipped one trained for this exact
    base model, else raise ``HypernetworkMissingError`` explaining how to train one.
    ``check_fingerprint``: refuse a hypernetwork trained for other base weights.
    """

    layers: list[int] | None = None
    slots: tuple[str, ...] = ("mlp_in", "mlp_out")
    hypernet_path: str | None = None
    check_fingerprint: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.slots, str):
            self.slots = (self.slots,)
        self.slots = tuple(self.slots)
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            self.layers = list(self.layers)

    # ------------------------------------------------------------- layers
    def layer_indices(self, n_layers: int) -> list[int]:
        """The edited block indices for a model with ``n_layers`` blocks (sorted, unique)."""
        if self.layers is None:
            return list(range(max(0, n_layers - DEFAULT_LAST_BLOCKS), n_layers))
        out = []
        for layer in self.layers:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.layers contains {layer!r}; use integer block indices "
                    f"in [-{n_layers}, {n_layers - 1}]"
                )
            out.append(layer + n_layers if layer < 0 else layer)
        return sorted(dict.fromkeys(out))

    @classmethod
    def scaled(cls, n_layers: int):
        return cls(layers=list(range(max(0, n_layers - DEFAULT_LAST_BLOCKS), n_layers)))

    def validate(self, model, adapter) -> None:
        n = adapter.num_layers(model)
        layers = self.layer_indices(n)
        if not layers:
            raise InvalidHyperParamsError(f"{type(self).__name__}.layers is empty; give at least "
                                          "one block index")
        for layer in layers:
            adapter.check_layer(model, layer, "layers")
        if not self.slots:
            raise InvalidHyperParamsError(f"{type(self).__name__}.slots is empty; use some of "
                                          f"{EDITABLE_SLOTS}")
        for slot in self.slots:
            if slot not in EDITABLE_SLOTS:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.slots contains {slot!r}; use some of {EDITABLE_SLOTS}"
                )
            if slot == "mlp_gate" and adapter.mlp_gate is None:
                raise InvalidHyperParamsError(
                    f"slot 'mlp_gate' was requested but the {adapter.name} adapter has no gated "
                    "MLP; use 'mlp_in' and/or 'mlp_out'"
                )

    # ------------------------------------------------------------ defaults
    @classmethod
    def for_model(cls, model, adapter):
        """A shipped hypernetwork trained for exactly this model if there is one, else defaults.

        Unlike the base class this does not warn about missing published values: the editor
        has no useful default without a trained hypernetwork, and says so in ``prepare()``.
        """
        from editkit.methods._learned.io import find_shipped_hypernet

        method = getattr(cls, "METHOD", None)
        if method is not None:
            found = find_shipped_hypernet(method, model, adapter)
            if found is not None:
                path, stored = found
                logger.info("using the shipped %s hypernetwork %s for this model", method, path)
                return cls.from_dict({**stored, "hypernet_path": str(path)})
        return cls.scaled(adapter.num_layers(model))

    # Architecture fields: what a stored hypernetwork fixes (subclasses extend).
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("layers", "slots")


@dataclasses.dataclass
class LearnedTrainConfig(JSONDataclass):
    """Training configuration of a hypernetwork editor (JSON round-trip, validated).

    Data per step: ``batch_size`` edits; each contributes its rewrite prompt and up to
    ``n_paraphrases`` paraphrases to the edit loss, and ``n_locality`` unrelated prompts (half
    from its own neighbourhood prompts when it has some, the rest from the shared pool) to the
    locality loss.

    Stopping: ``max_steps`` steps or ``max_minutes`` of wall time, whichever comes first, or
    early stopping after ``patience`` validations without an improvement of at least
    ``min_delta`` in the validation objective. The best validated hypernetwork is returned.

    Checkpoints: every ``checkpoint_every`` steps (and on interruption) into
    ``out_dir/checkpoint``; with ``resume`` a later run with the same ``out_dir`` continues
    from there (weights, optimiser state, sampler state, log).
    """

    max_steps: int = 2000
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    grad_clip: float = 10.0
    n_paraphrases: int = 2
    n_locality: int = 4
    val_every: int = 100
    val_size: int = 64
    patience: int = 5
    min_delta: float = 1e-4
    checkpoint_every: int = 200
    out_dir: str | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_types()
        for name in ("max_steps", "batch_size", "val_every", "val_size", "checkpoint_every",
                     "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.{name}={value!r} must be a positive integer"
                )
        for name in ("n_paraphrases", "n_locality"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.{name}={value!r} must be an integer ≥ 0"
                )
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.{name}={value!r} must be a positive number"
                )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InvalidHyperParamsError(
                f"{type(self).__name__}.max_minutes={self.max_minutes!r} must be positive or None"
            )
        if self.min_delta < 0:
            raise InvalidHyperParamsError(
                f"{type(self).__name__}.min_delta={self.min_delta!r} must be ≥ 0"
            )

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
