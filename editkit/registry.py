"""Registries of editing methods, model adapters and statistics text sources, filled from
Python entry points.

Built-in methods, adapters and the fact-world text source are declared in editkit's own
``pyproject.toml`` under the entry-point groups ``editkit.methods``, ``editkit.adapters`` and
``editkit.text_sources``, exactly as a third-party plugin declares its own. Discovery is lazy
and happens once per registry; a broken plugin is skipped with a warning, and a plugin cannot
silently replace a built-in name. The registry is core: it imports no editor, adapter or
statistics code, and checks what it loads by interface.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from editkit.errors import StatsError, UnknownMethodError, UnsupportedModelError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BUILTIN_DIST = "editkit"


def _load_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Name → object registry whose values load lazily (``"module:attr"`` or entry point)."""

    def __init__(
        self,
        kind: str,
        group: str,
        check: Callable[[Any], bool],
        missing_error: type[Exception],
        how_to_register: str,
    ) -> None:
        self.kind, self.group = kind, group
        self._check, self._missing_error, self._how = check, missing_error, how_to_register
        self._refs: dict[str, Any] = {}  # name -> entry point, "module:attr" or loaded object
        self._loaded: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._discovered = False

    # ---------------------------------------------------------------- filling
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        eps = sorted(entry_points(group=self.group), key=lambda ep: ep.dist is None or
                     ep.dist.name != _BUILTIN_DIST)  # built-ins first
        for ep in eps:
            is_builtin = ep.dist is not None and ep.dist.name == _BUILTIN_DIST
            if ep.name in self._refs and not is_builtin:
                origin = ep.dist.name if ep.dist else "?"
                warnings.warn(
                    f"{self.kind} {ep.name!r} from plugin {origin!r} is ignored: the name is "
                    "already registered. Choose another entry-point name.",
                    stacklevel=3,
                )
                continue
            self._refs[ep.name] = ep
            if is_builtin:
                self._builtin.add(ep.name)

    def register(self, name: str, obj: T | str, *, override: bool = False) -> None:
        """Register ``obj`` (or a lazy ``"module:attr"`` string) under ``name`` at run time."""
        self._discover()
        if name in self._refs and not override:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pass override=True to replace it"
            )
        if name in self._builtin and override:
            warnings.warn(f"overriding built-in {self.kind} {name!r}", stacklevel=2)
        self._refs[name] = obj
        self._loaded.pop(name, None)

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        self._discover()
        return sorted(self._refs)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._refs

    def get(self, name: str) -> T:
        self._discover()
        if name not in self._refs and isinstance(name, str):
            name = {n.lower().replace("-", "_"): n for n in self._refs}.get(
                name.lower().replace("-", "_").replace("+", "_"), name)
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._refs:
            close = difflib.get_close_matches(str(name), self._refs, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise self._missing_error(
                f"no {self.kind} registered as {name!r}; known: {self.names()}.{hint} "
                f"{self._how}"
            )
        ref = self._refs[name]
        if hasattr(ref, "load") and hasattr(ref, "group"):
            obj = ref.load()
        elif isinstance(ref, str):
            obj = _load_ref(ref)
        else:
            obj = ref
        if not self._check(obj):
            raise TypeError(f"{self.kind} {name!r} loaded {obj!r}, which is not a valid {self.kind}")
        self._loaded[name] = obj
        return obj


#: What a registered method class must offer (the ``Editor`` interface). The registry sits
#: below ``editor`` and ``models`` in the layering, so it checks the interface, not the class.
_EDITOR_INTERFACE = ("hparams_class", "compute_update", "apply", "revert", "prepare")
#: What a registered adapter must offer (the ``ModelAdapter`` interface).
_ADAPTER_INTERFACE = ("name", "layers", "layout", "module_name", "weight_name", "module",
                      "kv_view", "num_layers")


def _is_editor_class(obj: Any) -> bool:
    return isinstance(obj, type) and all(hasattr(obj, a) for a in _EDITOR_INTERFACE)


def _is_adapter(obj: Any) -> bool:
    return not isinstance(obj, type) and all(hasattr(obj, a) for a in _ADAPTER_INTERFACE)


def _is_text_source_factory(obj: Any) -> bool:
    return callable(obj)


METHODS: Registry[Any] = Registry(
    "method",
    "editkit.methods",
    _is_editor_class,
    UnknownMethodError,
    'Register a method with an entry point in group "editkit.methods" '
    '(name = "package.module:EditorClass") or editkit.METHODS.register(name, cls).',
)
ADAPTERS: Registry[Any] = Registry(
    "model adapter",
    "editkit.adapters",
    _is_adapter,
    UnsupportedModelError,
    'To support another architecture, register a ModelAdapter under its config.model_type '
    'with an entry point in group "editkit.adapters" or editkit.ADAPTERS.register(type, adapter) '
    '(see docs/adapters.md).',
)
TEXT_SOURCES: Registry[Any] = Registry(
    "text source",
    "editkit.text_sources",
    _is_text_source_factory,
    StatsError,
    'Register a named statistics text source with an entry point in group '
    '"editkit.text_sources" (name = "package.module:factory") or '
    'editkit.TEXT_SOURCES.register(name, factory); a factory takes keyword arguments '
    'n_samples, model, tokenizer, generated_length and returns an editkit.stats.TextSource.',
)


def get_method(name: str) -> type:
    """The ``Editor`` subclass registered as ``name`` (e.g. ``"rome"``, ``"ft"``)."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


def list_adapters() -> list[str]:
    return ADAPTERS.names()


def get_adapter(model_or_type: Any) -> Any:
    """The ``ModelAdapter`` for a model (by ``config.model_type``) or a model-type string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedModelError(
                f"{type(model_or_type).__name__} has no config.model_type; pass adapter=... "
                f"explicitly. Known model types: {ADAPTERS.names()}"
            )
    return ADAPTERS.get(model_type)
