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


def model_name(model) -> str:
    """Base name of a model (``gpt2-xl`` from ``openai-community/gpt2-xl`` or a path)."""
    config = getattr(model, "config", None)
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


class JSONDataclass:
    """JSON round trip for dataclasses, stamped with the editkit version; unknown keys warn."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[J], data: Mapping[str, Any]) -> J:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"editkit_version"})
        if unknown:
            warnings.warn(f"ignoring unknown {cls.__name__} keys {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise InvalidHyperParamsError(f"{cls.__name__}: {exc}") from exc

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({**self.to_dict(), "editkit_version": __version__}, indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls: type[J], path_or_text: str | Path) -> J:
        text = str(path_or_text)
        data = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
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

