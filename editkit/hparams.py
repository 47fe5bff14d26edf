"""``HyperParams``: typed, validated, JSON round-tripping method configuration.

A method's hyperparameters hold layer indices and numbers, never module paths (the adapter
owns those). Defaults for a known model come from a *preset*: data (method, model identity,
values, source) registered by whoever owns it: each method package registers the published
values of its paper, the testbed registers the values tuned on its own models, and plugins
register theirs through the ``editkit.presets`` entry-point group (a callable that calls
:func:`register_preset`). Other models get defaults derived in ``scaled``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from editkit._version import __version__
from editkit.errors import InvalidHyperParamsError

logger = logging.getLogger(__name__)
H = TypeVar("H", bound="HyperParams")
J = TypeVar("J", bound="JSONDataclass")


#: Config field naming what a model *is* (``"fact-world"``, ``"smollm2-135m-instruct"``),
#: set by the loaders of known models. ``save_pretrained`` writes it into ``config.json``,
#: so a saved copy in a directory of any name keeps its presets.
IDENTITY_FIELD = "editkit_model"


def model_name(model) -> str:
    """Base name of a model: its ``config.editkit_model`` identity if a loader set one, else
    the last part of ``name_or_path`` (``gpt2-xl`` from ``openai-community/gpt2-xl``)."""
    config = getattr(model, "config", None)
    identity = getattr(config, IDENTITY_FIELD, None)
    if isinstance(identity, str) and identity.strip():
        return identity.strip().lower()
    name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", ""))
    return name.rstrip("/").split("/")[-1].lower()


#: Entry-point group of preset providers: each entry is a callable taking no argument that
#: calls :func:`register_preset` (the testbed's ``register`` is one).
PRESET_GROUP = "editkit.presets"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Default hyperparameters of one method for one model, and where they come from.

    Attributes:
        method: The method's registry name (``"rome"``, ``"memit"``, ...).
        model: The model identity: a base name matched against the end of the model's
            ``name_or_path`` (``"gpt2-xl"`` matches ``openai-community/gpt2-xl``), or a
            label of ``matches`` when that is given.
        values: Keyword arguments of the method's ``HyperParams`` (nested configs as dicts).
        source: Where the values come from (paper, reference file, document in this repo).
        matches: Optional predicate on the model replacing the name match (e.g. "was loaded
            from a fact-world directory").
    """

    method: str
    model: str
    values: Mapping[str, Any]
    source: str
    matches: Callable[[Any], bool] | None = None

    def applies_to(self, model) -> bool:
        if self.matches is not None:
            return bool(self.matches(model))
        name = model_name(model)
        return bool(name) and (name == self.model or name.endswith(self.model))


_PRESETS: dict[tuple[str, str], Preset] = {}
_plugins_loaded = False


def register_preset(preset: Preset, replace: bool = False) -> Preset:
    """Add ``preset``; the same (method, model) twice is refused unless ``replace``."""
    key = (preset.method, preset.model)
    old = _PRESETS.get(key)
    if old is not None and old != preset and not replace:
        raise InvalidHyperParamsError(
            f"a {preset.method!r} preset for {preset.model!r} is already registered (source: "
            f"{old.source}); pass replace=True to override it")
    _PRESETS[key] = preset
    return preset


def _load_preset_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=PRESET_GROUP):
        try:
            ep.load()()
        except Exception as exc:  # a broken plugin must not stop editing with other presets
            logger.warning("skipping preset provider %s (%s: %s)", ep.value,
                           type(exc).__name__, exc)


def presets(method: str | None = None) -> list[Preset]:
    """Registered presets (of ``method`` if given), entry-point providers included."""
    _load_preset_plugins()
    return [p for p in _PRESETS.values() if method is None or p.method == method]


def find_preset(method: str, model) -> Preset | None:
    """The preset of ``method`` for ``model``: predicate presets first, then the longest
    matching name (so ``gpt2-xl`` wins over a hypothetical ``xl``)."""
    candidates = [p for p in presets(method) if p.applies_to(model)]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.matches is not None, len(p.model)))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (numbers finite, ints not bools).

    Covers what hyperparameter fields use: bool, int, float, str, ``X | None``, tuples and
    lists of those, nested dataclasses; any other annotation is accepted as is.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """What to give for ``hint``, with its article: ``"an integer"``, ``"a finite number"``."""
    text = str(hint).replace("typing.", "")
    return {"<class 'float'>": "a finite number", "<class 'int'>": "an integer",
            "<class 'bool'>": "a boolean (true/false)", "<class 'str'>": "a string",
            "float | None": "a finite number or null", "int | None": "an integer or null",
            "str | None": "a string or null"}.get(text, f"a value of type {text}")


class JSONDataclass:
    """JSON round trip for dataclasses, stamped with the editkit version.

    Reading is strict: an unknown key, a value of the wrong type or a non-finite number is an
    :class:`InvalidHyperParamsError` naming the field (a typo would otherwise silently leave
    the default in place, and NaN would only fail deep inside an edit).
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_types(self, prefix: str | None = None) -> None:
        """Raise :class:`InvalidHyperParamsError` for a field whose value does not have its
        annotated type (NaN and inf are not numbers here); nested configs are checked too."""
        where = prefix or type(self).__name__
        try:
            hints = typing.get_type_hints(type(self))
        except Exception:  # noqa: BLE001 - an annotation that does not resolve is not checked
            logger.debug("cannot resolve the annotations of %s", type(self).__name__)
            return
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, JSONDataclass):
                value.check_types(f"{where}.{f.name}")
            elif f.name in hints and not _conforms(value, hints[f.name]):
                bad = ("not finite" if isinstance(value, float) and not math.isfinite(value)
                       else f"a {type(value).__name__}")
                raise InvalidHyperParamsError(
                    f"{where}.{f.name}={value!r} is {bad}; give {_describe(hints[f.name])}")

    @classmethod
    def from_dict(cls: type[J], data: Mapping[str, Any]) -> J:
        if not isinstance(data, Mapping):
            raise InvalidHyperParamsError(
                f"{cls.__name__} must be read from a JSON object (a dict of field: value), got "
                f"{type(data).__name__} {str(data)[:80]!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names - {"editkit_version"})
        if unknown:
            raise InvalidHyperParamsError(
                f"unknown {cls.__name__} keys {unknown}; check their spelling, the known keys "
                f"are {sorted(names)}")
        try:
            out = cls(**{k: v for k, v in data.items() if k in names})
        except InvalidHyperParamsError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidHyperParamsError(f"{cls.__name__}: {exc}; check the values' types"
                                          ) from exc
        out.check_types()
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({**self.to_dict(), "editkit_version": __version__}, indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls: type[J], path_or_text: str | Path) -> J:
        """Read a JSON object given as text (starting with ``{``) or as a file path."""
        text = str(path_or_text)
        if text.lstrip().startswith("{"):
            where = "the JSON text"
        else:
            where = repr(text)
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidHyperParamsError(
                    f"cannot read {cls.__name__} from {where} ({type(exc).__name__}: {exc}); "
                    "pass the path of an existing JSON file or the JSON text itself") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidHyperParamsError(
                f"{where} is not valid JSON for {cls.__name__} ({exc}); fix the file, e.g. "
                '{"layer": 5}') from exc
        except RecursionError as exc:
            raise InvalidHyperParamsError(
                f"{where} is nested too deeply to be {cls.__name__}; fix the file") from exc
        return cls.from_dict(data)


@dataclasses.dataclass
class HyperParams(JSONDataclass):
    """Base class: subclass as a dataclass; override ``scaled`` and ``validate``; set
    ``PRESET_METHOD`` to the method name whose registered presets apply (or list published
    values by model name in ``PUBLISHED``)."""

    PUBLISHED: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    PRESET_METHOD: ClassVar[str | None] = None

    # ---------------------------------------------------------------- lookup
    @classmethod
    def preset_for(cls: type[H], model) -> H | None:
        """The registered preset (or ``PUBLISHED`` entry) for ``model``, or None."""
        if cls.PRESET_METHOD is not None:
            preset = find_preset(cls.PRESET_METHOD, model)
            if preset is not None:
                logger.info("%s for %s from the preset %r (%s)", cls.__name__,
                            model_name(model), preset.model, preset.source)
                return cls.from_dict(preset.values)
        name = model_name(model)
        for key, values in cls.PUBLISHED.items():
            if name == key or name.endswith(key):
                return cls(**values)
        return None

    @classmethod
    def for_model(cls: type[H], model, adapter) -> H:
        """Preset defaults for ``model`` if known, else ``scaled`` defaults (with a warning)."""
        name = model_name(model)
        found = cls.preset_for(model)
        if found is not None:
            return found
        hp = cls.scaled(adapter.num_layers(model))
        warnings.warn(
            f"no published {cls.__name__} for model {name or '<unnamed>'!r}; using defaults "
            f"scaled to its {adapter.num_layers(model)} layers: {hp.to_dict()}. Pass hparams= "
            "to choose your own.",
            stacklevel=3,
        )
        return hp

    @classmethod
    def scaled(cls: type[H], n_layers: int) -> H:
        return cls()

    def validate(self, model, adapter) -> None:
        """Raise ``InvalidHyperParamsError`` if a value is out of range for ``model``."""

    def check_positive(self, **values: float) -> None:
        for name, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise InvalidHyperParamsError(
                    f"{type(self).__name__}.{name}={value!r} must be a positive number"
                )

