"""The nested configuration of locate-then-edit: where the edit sits and how v*/z is found.

ROME, MEMIT and AlphaEdit share the same key/value machinery (``keys``, ``values``,
``templates``). Its settings live in one dataclass, :class:`ValueHyperParams`, that each
method's hyperparameters hold as the field ``value``; the method's own fields (ROME's
``layer``, MEMIT's ``layers`` and λ, the statistics) stay beside it.

Before this package existed the same settings were flat fields of ``ROMEHyperParams`` and
``MEMITHyperParams`` with a ``v_`` prefix (``v_lr``, ``v_num_grad_steps``, ...). Patches and
results saved then store that flat form, so :class:`LocateHyperParams` still reads it (and
still accepts the flat names as constructor keywords and attributes), with a
``DeprecationWarning`` naming the new spelling.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

from editkit.errors import InvalidHyperParamsError
from editkit.hparams import HyperParams
from editkit.tokens import context_length

FACT_TOKENS = ("subject_last", "last")
#: How ``num_grad_steps`` is counted (see :class:`ValueHyperParams`).
STEP_COUNTS = ("updates", "reference")
#: Where generated context prefixes start: the end-of-text token (the reference) or one of
#: a few start words (editkit ≤ 0.x's sampler, kept for reproducing older results).
TEMPLATE_STARTS = ("eos", "words")
#: The reference's context prefixes: 10 generated prefixes of 5 tokens and 10 of 10 tokens.
DEFAULT_CONTEXT_LENGTHS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))

#: Flat field names used before the nested config → their name inside ``value``.
LEGACY_FIELDS: dict[str, str] = {
    "fact_token": "fact_token",
    "context_template_length_params": "context_template_length_params",
    "context_template_seed": "context_template_seed",
    "v_num_grad_steps": "num_grad_steps",
    "v_lr": "lr",
    "v_loss_layer": "loss_layer",
    "v_weight_decay": "weight_decay",
    "clamp_norm_factor": "clamp_norm_factor",
    "kl_factor": "kl_factor",
    "v_early_stop_loss": "early_stop_loss",
}

MOM2_DTYPES = ("float32", "float64")
#: Statistics of C for shallow (tiny or test) models without a preset: the offline Python
#: docs, fewer and shorter texts than the paper's 100k wikitext samples.
SMALL_MODEL_STATISTICS: dict[str, Any] = {
    "mom2_dataset": "pydoc", "mom2_n_samples": 10_000, "mom2_max_length": 128}

L = TypeVar("L", bound="LocateHyperParams")


def scaled_layer(n_layers: int) -> int:
    """The critical MLP layer of a model without a preset: ≈ n/3 (the published ROME layers
    sit at 0.33 of the depth for GPT-2 medium, large and XL)."""
    return min(n_layers - 1, max(0, round(n_layers / 3)))


def check_statistics(hp) -> None:
    """Validate the ``mom2_*`` fields (statistics of C) that ROME and MEMIT share."""
    if hp.mom2_dtype not in MOM2_DTYPES:
        raise InvalidHyperParamsError(f"mom2_dtype={hp.mom2_dtype!r}; use one of {MOM2_DTYPES}")
    n = hp.mom2_n_samples
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidHyperParamsError(f"mom2_n_samples={n!r} must be a positive integer")
    if hp.mom2_max_length is not None and (
            not isinstance(hp.mom2_max_length, int) or hp.mom2_max_length <= 0):
        raise InvalidHyperParamsError(
            f"mom2_max_length={hp.mom2_max_length!r} must be a positive integer or None")
    if not isinstance(hp.mom2_dataset, str) or not hp.mom2_dataset:
        raise InvalidHyperParamsError(
            f"mom2_dataset={hp.mom2_dataset!r}; use 'wikitext', 'pydoc', 'fact_world', "
            "'generated' or a path to a .txt/.jsonl file")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class ValueHyperParams(HyperParams):
    """Where the edit is located and how the target value is optimised.

    The key (ROME eq. 3) and the value (ROME eq. 4; MEMIT's z, eq. 16) are read at
    ``fact_token`` behind the context prefixes; the value is ``v₀ + δ`` with

        δ = argmin 1/N Σⱼ −log p(o* | xⱼ + p) + kl_factor · KL(essence drift)
                   + weight_decay · ‖δ‖ / ‖v₀‖²

    Attributes:
        fact_token: Token whose key/value is edited: ``"subject_last"`` (the papers) or
            ``"last"`` (the prompt's last token).
        context_template_length_params: ``(length in tokens, count)`` pairs of generated
            context prefixes (ROME §3.1: "we sample ~20 text prefixes").
        context_template_seed: Seed of the prefix sampler (prefixes are cached per model).
        num_grad_steps: Adam steps on δ.
        lr: Adam learning rate on δ.
        loss_layer: Block whose output is read out (final norm + unembedding) for the loss;
            ``None`` means the last block, i.e. the model's own logits.
        weight_decay: Weight of ``‖δ‖ / ‖v₀‖²`` in the loss (the reference's decay term).
        clamp_norm_factor: ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖v₀‖`` after each step
            (ROME: v₀ is the MLP output; MEMIT: the residual stream h).
        kl_factor: Weight of the essence-drift term ``KL(p(·|"{s} is a") after ‖ before)``.
        early_stop_loss: Stop once the total loss falls below this.
        count_steps: How ``num_grad_steps`` is counted. ``"updates"``: that many Adam
            updates of δ, then one more forward pass (no backward) that measures the loss at
            the returned δ. ``"reference"``: as kmeng01/rome's ``compute_v``, whose loop
            evaluates the loss ``num_grad_steps`` times but breaks before the last update, so
            its "20 steps" are 19 Adam updates; δ then equals ``"updates"`` with one step
            fewer, bit for bit.
        context_template_start: Where generated prefixes start: ``"eos"`` (the reference:
            sampled from the end-of-text token, a prefix of ``length`` tokens holds
            ``length - 1`` generated ones) or ``"words"`` (editkit's former sampler: from
            one of five start words, which split into several tokens on small vocabularies).
    """

    fact_token: str = "subject_last"
    context_template_length_params: tuple[tuple[int, int], ...] = DEFAULT_CONTEXT_LENGTHS
    context_template_seed: int = 0
    num_grad_steps: int = 20
    lr: float = 0.5
    loss_layer: int | None = None
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    count_steps: str = "updates"
    context_template_start: str = "eos"

    @property
    def num_updates(self) -> int:
        """Adam updates of δ at most (without early stopping): ``num_grad_steps`` counted
        as ``count_steps`` says. The loop evaluates the loss ``num_updates + 1`` times."""
        return self.num_grad_steps - 1 if self.count_steps == "reference" else self.num_grad_steps

    def __post_init__(self) -> None:
        # JSON gives lists back; keep the canonical tuple-of-pairs form.
        try:
            self.context_template_length_params = tuple(
                (int(length), int(count)) for length, count in self.context_template_length_params
            )
        except (TypeError, ValueError) as exc:
            raise InvalidHyperParamsError(
                f"context_template_length_params={self.context_template_length_params!r} must "
                "be a list of (length, count) integer pairs, e.g. [[5, 10], [10, 10]]"
            ) from exc

    def read_layer(self, n_layers: int) -> int:
        """The block whose output the loss reads (``loss_layer`` or the last)."""
        return n_layers - 1 if self.loss_layer is None else self.loss_layer

    def validate(self, model, adapter, edit_layer: int | None = None) -> None:
        """Check the ranges; ``edit_layer`` (where δ is added) must not lie above the loss."""
        if self.loss_layer is not None:
            adapter.check_layer(model, self.loss_layer, "value.loss_layer")
            if edit_layer is not None and self.loss_layer < edit_layer:
                raise InvalidHyperParamsError(
                    f"value.loss_layer={self.loss_layer} is below the edited layer "
                    f"{edit_layer}; the loss must be read at or after it (use None for the "
                    "last block)")
        if self.fact_token not in FACT_TOKENS:
            raise InvalidHyperParamsError(
                f"value.fact_token={self.fact_token!r}; use one of {FACT_TOKENS}")
        steps = self.num_grad_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise InvalidHyperParamsError(
                f"value.num_grad_steps={steps!r} must be a positive integer")
        if self.count_steps not in STEP_COUNTS:
            raise InvalidHyperParamsError(
                f"value.count_steps={self.count_steps!r}; use one of {STEP_COUNTS}")
        if self.context_template_start not in TEMPLATE_STARTS:
            raise InvalidHyperParamsError(
                f"value.context_template_start={self.context_template_start!r}; use one of "
                f"{TEMPLATE_STARTS}")
        self.check_positive(lr=self.lr, clamp_norm_factor=self.clamp_norm_factor)
        for name in ("weight_decay", "kl_factor", "early_stop_loss"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise InvalidHyperParamsError(f"value.{name}={value!r} must be a number ≥ 0")
        limit = context_length(model)
        for length, count in self.context_template_length_params:
            if length <= 0 or count <= 0:
                raise InvalidHyperParamsError(
                    f"value.context_template_length_params has ({length}, {count}); lengths "
                    "and counts must be positive")
            if limit is not None and length >= limit // 2:
                # A prefix must leave room for the prompt and the target behind it.
                raise InvalidHyperParamsError(
                    f"value.context_template_length_params has a prefix of {length} tokens "
                    f"but the model's context size is {limit}; use lengths below {limit // 2}")


def _legacy_warning(names: list[str]) -> None:
    new = ", ".join(f"{n} → value.{LEGACY_FIELDS[n]}" for n in names)
    warnings.warn(f"flat locate-then-edit hyperparameters are deprecated; they now live in "
                  f"the nested 'value' config ({new})", DeprecationWarning, stacklevel=4)


def _fold_legacy(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move flat legacy keys of ``kwargs`` into a ``value`` dict (returned, a new dict)."""
    flat = [k for k in kwargs if k in LEGACY_FIELDS]
    if not flat:
        return kwargs
    _legacy_warning(flat)
    out = {k: v for k, v in kwargs.items() if k not in LEGACY_FIELDS}
    value = out.get("value")
    if isinstance(value, ValueHyperParams):
        value = dataclasses.asdict(value)
    moved = {LEGACY_FIELDS[k]: kwargs[k] for k in flat}
    out["value"] = {**(value or {}), **moved}
    return out


@dataclasses.dataclass
class LocateHyperParams(HyperParams):
    """Base of the hyperparameters of locate-then-edit methods: holds ``value``.

    A subclass declares the field ``value`` (last, so positional arguments keep their
    meaning) with its own default (MEMIT's z optimisation takes more steps and a tighter
    clamp than ROME's v*) and is decorated with :func:`accepts_flat_fields` above
    ``@dataclass``. Partial dicts given for ``value`` (presets, JSON) fill in over that
    default, so a preset lists only what differs.
    """

    def __post_init__(self) -> None:
        default = self._default_value()
        if isinstance(self.value, Mapping):
            unknown = sorted(set(self.value) - {f.name for f in dataclasses.fields(default)})
            if unknown:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.value has unknown keys {unknown}; the value "
                    f"optimisation takes {[f.name for f in dataclasses.fields(default)]}")
            self.value = dataclasses.replace(default, **dict(self.value))
        elif not isinstance(self.value, ValueHyperParams):
            raise InvalidHyperParamsError(
                f"{type(self).__name__}.value must be a ValueHyperParams or a dict, got "
                f"{type(self.value).__name__}")

    @classmethod
    def _default_value(cls) -> ValueHyperParams:
        field = next(f for f in dataclasses.fields(cls) if f.name == "value")
        return field.default_factory()  # type: ignore[misc]

    @classmethod
    def from_dict(cls: type[L], data: Mapping[str, Any]) -> L:
        """Read the nested form, or the flat form of editkit before ``value`` existed."""
        return super().from_dict(_fold_legacy(dict(data)))

    def __setattr__(self, name: str, value: Any) -> None:
        # Old code assigning ``hp.v_lr = ...`` must reach the nested config, not a stray
        # attribute that nothing reads.
        if name in LEGACY_FIELDS and name not in {f.name for f in dataclasses.fields(self)}:
            warnings.warn(f"{type(self).__name__}.{name} is deprecated; set "
                          f"value.{LEGACY_FIELDS[name]}", DeprecationWarning, stacklevel=2)
            setattr(self.value, LEGACY_FIELDS[name], value)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: old code reading ``hp.v_lr``.
        if name in LEGACY_FIELDS and "value" in self.__dict__:
            warnings.warn(f"{type(self).__name__}.{name} is deprecated; read "
                          f"value.{LEGACY_FIELDS[name]}", DeprecationWarning, stacklevel=2)
            return getattr(self.__dict__["value"], LEGACY_FIELDS[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def accepts_flat_fields(cls: type[L]) -> type[L]:
    """Class decorator (above ``@dataclass``): the generated ``__init__`` also takes the
    old flat keywords (``ROMEHyperParams(v_lr=0.1)``) and folds them into ``value``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_fold_legacy(kwargs))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls
