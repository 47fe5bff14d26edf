"""``HyperParams``: typed, validated, JSON round-tripping method configuration.

A method's hyperparameters hold layer indices and numbers, never module paths (the adapter
owns those). Each subclass lists published defaults by model name in ``PUBLISHED`` and
derives defaults for other models in ``scaled``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping
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
    """Base class: subclass as a dataclass; override ``PUBLISHED``, ``scaled``, ``validate``."""

    PUBLISHED: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    # ---------------------------------------------------------------- lookup
    @classmethod
    def for_model(cls: type[H], model, adapter) -> H:
        """Published defaults for ``model`` if known, else ``scaled`` defaults (with a warning)."""
        name = model_name(model)
        for key, values in cls.PUBLISHED.items():
            if name == key or name.endswith(key):
                return cls(**values)
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

