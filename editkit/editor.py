"""The ``Editor`` base class and the edit history that makes revert exact.

A subclass implements:

- ``hparams_class``: its ``HyperParams`` dataclass;
- ``edited_parameters()``: names of the parameters it may change (from its hparams);
- ``compute_update(requests) -> Patch``: pure, the model is unchanged afterwards;
- optionally ``_prepare()``: one-time work per model (statistics, templates, hypernetwork);
- optionally ``validate_requests(requests)``: refuse unusable requests before any work;
- optionally ``sequential = False`` to receive a whole batch of requests in one
  ``compute_update`` call (batch methods such as MEMIT); by default ``apply`` edits a
  sequence one request at a time, each on top of the previous.

Everything else (transactions, history, revert, default hparams, tokenizer and adapter
lookup) lives here.
"""

from __future__ import annotations

import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from editkit.errors import EditFailedError, EditkitError, HistoryError, TokenizerError
from editkit.hparams import HyperParams
from editkit.patch import Patch, parameter_fingerprints
from editkit.registry import get_adapter
from editkit.requests import EditRequest, as_request_list

logger = logging.getLogger(__name__)

_edit_ids = itertools.count(1)


@dataclass
class AppliedEdit:
    """One entry of the history: a patch applied to the model, and why."""

    id: int
    method: str
    patch: Patch
    requests: list[EditRequest]
    seconds: float
    created: float = field(default_factory=time.time)


class EditHistory:
    """Applied patches of one model, with the original value of every touched parameter.

    Originals are copied once, on first touch, so memory is O(size of touched parameters).
    Removing any edit restores the originals and re-applies the remaining patches in order,
    so the weights are bit-for-bit those of applying the remaining patches to the base.
    """

    _ATTR = "_editkit_history"

    def __init__(self) -> None:
        self.edits: list[AppliedEdit] = []
        self.originals: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, model: nn.Module) -> EditHistory:
        """The history attached to ``model`` (shared by every editor of that model)."""
        history = model.__dict__.get(cls._ATTR)
        if history is None:
            history = cls()
            model.__dict__[cls._ATTR] = history
        return history

    @torch.no_grad()
    def push(self, model: nn.Module, patch: Patch, method: str, requests: list[EditRequest],
             seconds: float) -> AppliedEdit:
        params = dict(model.named_parameters())
        for name in patch.deltas:
            if name not in self.originals:
                self.originals[name] = params[name].detach().clone()
        patch.apply_to(model, force=True)
        edit = AppliedEdit(next(_edit_ids), method, patch, requests, seconds)
        self.edits.append(edit)
        return edit

    def find(self, edit_id: int) -> AppliedEdit:
        for e in self.edits:
            if e.id == edit_id:
                return e
        raise HistoryError(
            f"no applied edit with id {edit_id!r}; applied ids: {[e.id for e in self.edits]}"
        )

    @torch.no_grad()
    def remove(self, model: nn.Module, edit_ids: Sequence[int]) -> None:
        """Remove the given edits and rebuild the touched weights exactly."""
        doomed = {self.find(i).id for i in edit_ids}
        affected = {n for e in self.edits if e.id in doomed for n in e.patch.deltas}
        self.edits = [e for e in self.edits if e.id not in doomed]
        self._rebuild(model, affected)

    def _rebuild(self, model: nn.Module, names: set[str]) -> None:
        # Close ``names`` under "shares a parameter with a remaining edit": every such edit
        # is replayed, so every parameter it touches must first go back to its original.
        while True:
            replay = [e for e in self.edits if names & set(e.patch.deltas)]
            closed = names | {n for e in replay for n in e.patch.deltas}
            if closed == names:
                break
            names = closed
        params = dict(model.named_parameters())
        for name in names:
            params[name].copy_(self.originals[name])
        for e in replay:
            e.patch.apply_to(model, force=True)
        still_touched = {n for e in self.edits for n in e.patch.deltas}
        for name in list(self.originals):
            if name not in still_touched:
                del self.originals[name]


class Editor(ABC):
    """Abstract model editor. See the module docstring for what a subclass provides."""

    hparams_class: ClassVar[type[HyperParams]] = HyperParams
    name: ClassVar[str] = "editor"
    sequential: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer=None, hparams: HyperParams | None = None,
                 adapter=None) -> None:
        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(model)
        if hparams is None:
            hparams = self.hparams_class.for_model(model, self.adapter)
        elif isinstance(hparams, dict):
            hparams = self.hparams_class.from_dict(hparams)
        elif not isinstance(hparams, self.hparams_class):
            raise EditkitError(
                f"{type(self).__name__} needs {self.hparams_class.__name__}, got "
                f"{type(hparams).__name__}"
            )
        hparams.validate(model, self.adapter)
        self.hparams = hparams
        self._prepared = False

    @staticmethod
    def _load_tokenizer(model: nn.Module):
        name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(name)
        except Exception as exc:
            raise TokenizerError(
                f"no tokenizer given and none could be loaded from {name!r} ({exc}); pass "
                "tokenizer=AutoTokenizer.from_pretrained(<model dir>)"
            ) from exc

    # ------------------------------------------------------ subclass surface
    def _prepare(self) -> None:  # noqa: B027 - optional hook, empty by default
        """One-time work per model (statistics, templates, hypernetwork); optional."""

    @abstractmethod
    def edited_parameters(self) -> list[str]:
        """Names of the parameters this editor may change, as its hparams say."""

    @abstractmethod
    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        """The patch that performs the edit(s). Must leave the model unchanged."""

    def validate_requests(self, requests: list[EditRequest]) -> None:  # noqa: B027
        """Reject requests this method cannot edit, before any work; optional."""

    # --------------------------------------------------------------- public
    def prepare(self) -> Editor:
        if not self._prepared:
            self._prepare()
            self._prepared = True
        return self

    @property
    def history(self) -> list[AppliedEdit]:
        return list(EditHistory.of(self.model).edits)

    def _new_patch(self, deltas: dict, requests: list[EditRequest], **extra: Any) -> Patch:
        """A patch stamped with method, hparams, requests and the base fingerprint."""
        from editkit._version import __version__

        meta = {
            "method": self.name,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in requests],
            "editkit_version": __version__,
            "model_type": getattr(self.model.config, "model_type", None),
            "base_fingerprint": parameter_fingerprints(self.model, deltas),
            **extra,
        }
        return Patch(deltas, meta)

    def apply(self, requests: EditRequest | Sequence[EditRequest]) -> Editor:
        """Edit the model; on any failure every parameter is left bit-for-bit unchanged.

        Sequential methods apply a sequence one request at a time (each computed on the
        model edited by the previous ones, each its own history entry); batch methods get
        the whole sequence at once (one history entry).
        """
        items = as_request_list(requests)
        self.validate_requests(items)
        self.prepare()
        groups = [[r] for r in items] if self.sequential else [items]
        history = EditHistory.of(self.model)
        params = dict(self.model.named_parameters())
        guarded = list(dict.fromkeys(self.edited_parameters()))
        snapshot = {n: params[n].detach().clone() for n in guarded}
        n_before = len(history.edits)
        try:
            for group in groups:
                start = time.perf_counter()
                patch = self.compute_update(group)
                patch.check_finite()
                outside = sorted(set(patch.deltas) - set(guarded))
                if outside:
                    raise EditFailedError(
                        f"{self.name} returned deltas for {outside}, which edited_parameters() "
                        "does not declare; fix the method's edited_parameters()"
                    )
                patch.check_fits(self.model)
                history.push(self.model, patch, self.name, group, time.perf_counter() - start)
        except BaseException as exc:
            self._rollback(history, n_before, snapshot)
            if isinstance(exc, (EditkitError, KeyboardInterrupt, SystemExit)):
                raise
            raise EditFailedError(
                f"{self.name} failed while editing ({type(exc).__name__}: {exc}); the model was "
                "left unchanged"
            ) from exc
        return self

    @torch.no_grad()
    def _rollback(self, history: EditHistory, n_before: int, snapshot: dict) -> None:
        added = history.edits[n_before:]
        del history.edits[n_before:]
        params = dict(self.model.named_parameters())
        for name, value in snapshot.items():
            params[name].copy_(value)
        for name in {n for e in added for n in e.patch.deltas}:
            if not any(name in e.patch.deltas for e in history.edits):
                history.originals.pop(name, None)

    def revert(self, edit: int | AppliedEdit | Literal["all"] | None = None) -> Editor:
        """Undo the last edit (``None``), a given edit (id or ``AppliedEdit``), or ``"all"``.

        The weights become bit-for-bit those of the base with the remaining patches applied
        in their original order.
        """
        history = EditHistory.of(self.model)
        if not history.edits:
            if edit == "all":
                return self
            raise HistoryError("nothing to revert: no edit has been applied to this model")
        if edit is None:
            ids = [history.edits[-1].id]
        elif edit == "all":
            ids = [e.id for e in history.edits]
        elif isinstance(edit, AppliedEdit):
            ids = [edit.id]
        elif isinstance(edit, int) and not isinstance(edit, bool):
            ids = [edit]
        else:
            raise HistoryError(f"revert() takes None, 'all', an edit id or an AppliedEdit, "
                               f"got {edit!r}")
        history.remove(self.model, ids)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {self.hparams})"
