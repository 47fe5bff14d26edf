"""Small hook helpers: capture module inputs/outputs, edit outputs, stop a forward early.

Hooks exist only inside a ``with`` block and are removed in ``finally``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed module has run."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (attention modules return ``(out, weights)``,
    blocks a tuple in transformers 4.x). Replaying a block goes through the adapter's
    ``call_block`` instead (:mod:`editkit.models.compat` keeps the version differences)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``hidden``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A call's hidden state: its first positional argument or ``hidden_states`` keyword if a
    tensor (a mask passed first by keyword must not be taken for it), else ``None``."""
    x = args[0] if args else kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def as_tokens(t: torch.Tensor, grid: torch.Size | None) -> torch.Tensor:
    """``t`` viewed as ``(*grid, d)`` if it is a ``(rows, d)`` matrix of ``prod(grid)`` rows.

    Some families run a sublayer on the residual stream flattened to (batch·tokens, d) rows
    (OPT's ``fc1``/``fc2``); ``grid`` is the (batch, tokens) of the enclosing module's input,
    so hooks index a token as they do in every other family. Anything else is unchanged.
    """
    if grid is None or t.dim() != 2 or len(grid) < 2 or math.prod(grid) != t.shape[0]:
        return t
    return t.view(*grid, t.shape[-1])


EditFn = Callable[[str, torch.Tensor], torch.Tensor]


class HookSet:
    """Hooks that exist only inside a ``with`` block.

    A subclass registers its hooks in :meth:`install` and appends the handles to
    ``self._handles``; they are removed when the block ends, or at once if installing fails.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def install(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> HookSet:
        try:
            self.install()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False


class Trace(HookSet):
    """Hook several modules of ``model`` by name for the duration of a ``with`` block.

    - ``retain_input`` / ``retain_output``: store the (first positional) input and (a copy of)
      the hidden output of each module in ``self.inputs[name]`` / ``self.outputs[name]``.
    - ``edit_output(name, hidden) -> hidden``: replace each module's hidden output.
    - ``stop``: raise ``StopForward`` after the last listed module (in forward order) has run;
      the ``with`` block swallows it, so ``with Trace(..., stop=True): model(x)`` just ends early.
    - ``detach``: store detached tensors (default) or keep the graph.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        self.names = list(dict.fromkeys(names))
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._model = model
        self._retain_input, self._retain_output = retain_input, retain_output
        self._edit, self._stop, self._detach = edit_output, stop, detach
        self._remaining: set[str] = set()
        # (batch, tokens) of each hooked module's parent's last input: see as_tokens
        self._parent = {name: name.rpartition(".")[0] for name in self.names}
        self._grid: dict[str, torch.Size] = {}

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self._detach else t

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
            grid = self._grid.get(self._parent[name])
            if self._retain_input:
                x = args[0] if args else next(iter(kwargs.values()))
                self.inputs[name] = self._keep(as_tokens(x, grid))
            if self._edit is not None:
                h = hidden_of(output)
                new = self._edit(name, as_tokens(h, grid))
                output = with_hidden(output, new.reshape(h.shape) if new.dim() != h.dim()
                                     else new)
            if self._retain_output:
                # a copy: a family's forward may add to a module's output in place after the
                # module returns (Falcon: ``mlp_output += attention_output``)
                self.outputs[name] = self._keep(as_tokens(hidden_of(output), grid)).clone()
            self._remaining.discard(name)
            if self._stop and not self._remaining:
                raise StopForward
            return output

        return hook

    def _grid_hook(self, parent: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args, kwargs)
            if x is not None and x.dim() >= 3:
                self._grid[parent] = x.shape[:-1]
        return hook

    def install(self) -> None:
        self._remaining = set(self.names)
        for parent in dict.fromkeys(self._parent.values()):
            if parent:  # a block (the model itself is called with token ids)
                self._handles.append(self._model.get_submodule(parent).register_forward_pre_hook(
                    self._grid_hook(parent), with_kwargs=True))
        for name in self.names:
            module = self._model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def __enter__(self) -> Trace:
        super().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is StopForward


def run_until(model: nn.Module, names: Iterable[str], *, retain_input: bool = False,
              retain_output: bool = True, **inputs: Any) -> Trace:
    """Run ``model(**inputs)`` only as far as the deepest of ``names``; return the ``Trace``."""
    with Trace(model, names, retain_input=retain_input, retain_output=retain_output,
               stop=True) as trace:
        model(**inputs)
    return trace
