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
import os
import socket
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import torch
from torch import nn

from editkit.errors import (
    EditFailedError,
    EditkitError,
    HistoryError,
    InvalidHyperParamsError,
    PatchMismatchError,
    TokenizerError,
    UnsupportedModelError,
    UnsupportedObjectiveError,
)
from editkit.hparams import HyperParams
from editkit.patch import Delta, Patch, load_patch
from editkit.protocols import AdapterLike, TokenizerLike
from editkit.registry import get_adapter
from editkit.requests import EditRequest, as_request_list
from editkit.tokens import check_fits_context

logger = logging.getLogger(__name__)


def _hub_offline() -> bool:
    """Whether the user asked the HuggingFace clients not to touch the network."""
    flags = (os.environ.get(n, "") for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one quick connection attempt), or None if it can or a
    proxy decides. The hub client retries an unreachable host for ~47 s before failing."""
    if any(os.environ.get(n) for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"
    return None

_edit_ids = itertools.count(1)


@dataclass
class AppliedEdit:
    """One entry of the history: a patch applied to the model, and why.

    ``id`` identifies it for :meth:`Editor.revert`; ``patch`` is the applied :class:`Patch`
    (save it, export it, apply it elsewhere); ``requests`` the edit requests it performs;
    ``seconds`` the time ``compute_update`` took.
    """

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
        """Apply ``patch`` to ``model`` (saving the originals it touches first) and record it."""
        params = dict(model.named_parameters())
        fresh = [n for n in patch.deltas if n not in self.originals]
        for name in fresh:
            self.originals[name] = params[name].detach().clone()
        try:
            patch.apply_to(model, force=True)  # all or nothing by itself
        except BaseException:
            for name in fresh:  # nothing was applied: no original to keep
                del self.originals[name]
            raise
        edit = AppliedEdit(next(_edit_ids), method, patch, requests, seconds)
        self.edits.append(edit)
        return edit

    def find(self, edit_id: int) -> AppliedEdit:
        """The applied edit with id ``edit_id``; :class:`HistoryError` if there is none."""
        for e in self.edits:
            if e.id == edit_id:
                return e
        raise HistoryError(
            f"no applied edit with id {edit_id!r}; applied ids: {[e.id for e in self.edits]}"
        )

    @torch.no_grad()
    def remove(self, model: nn.Module, edit_ids: Sequence[int]) -> None:
        """Remove the given edits and rebuild the touched weights exactly.

        All or nothing: if replaying the remaining edits fails, every touched weight, the
        list of edits and the recorded originals go back to what they were before the call.
        """
        doomed = {self.find(i).id for i in edit_ids}
        affected = {n for e in self.edits if e.id in doomed for n in e.patch.deltas}
        # Only parameters with a recorded original are ever rewritten by _rebuild.
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().clone() for n in self.originals}
        edits, originals = list(self.edits), dict(self.originals)
        try:
            self.edits = [e for e in self.edits if e.id not in doomed]
            self._rebuild(model, affected)
        except BaseException as exc:
            for name, value in weights.items():
                params[name].copy_(value)
            self.edits, self.originals = edits, originals
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise EditFailedError(
                f"reverting edit(s) {sorted(doomed)} failed while replaying the remaining edits "
                f"({type(exc).__name__}: {exc}); the weights and the history are as they were "
                "before the revert"
            ) from exc

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
    """Abstract model editor. See the module docstring for what a subclass provides.

    ``Editor(model, tokenizer=None, hparams=None, adapter=None)``: the tokenizer defaults
    to ``AutoTokenizer.from_pretrained(model.config.name_or_path)``, the adapter to the
    registered one of ``model.config.model_type``, the hyperparameters to the method's
    defaults for this model. Edit with :meth:`apply` (transactional) and undo with
    :meth:`revert` (exact), or temporarily with ``with editor.applied(request) as edit:``.
    """

    hparams_class: ClassVar[type[HyperParams]] = HyperParams
    name: ClassVar[str] = "editor"
    sequential: ClassVar[bool] = True
    #: The editing objectives (``EditRequest.objective``, Hase et al. 2023) this method
    #: optimises; :meth:`apply` refuses a request with any other. A method that honours more
    #: than ``inject`` lists them (``editkit.requests.OBJECTIVES``).
    objectives: ClassVar[frozenset[str]] = frozenset({"inject"})

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike | None = None,
                 hparams: HyperParams | None = None, adapter: AdapterLike | None = None
                 ) -> None:
        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(model)
        self._check_tokenizer()
        if hparams is None:
            hparams = self.hparams_class.for_model(model, self.adapter)
        elif isinstance(hparams, dict):
            hparams = self.hparams_class.from_dict(hparams)
        elif not isinstance(hparams, self.hparams_class):
            raise InvalidHyperParamsError(
                f"{type(self).__name__} needs {self.hparams_class.__name__}, got "
                f"{type(hparams).__name__}"
            )
        hparams.check_types()
        hparams.validate(model, self.adapter)
        self.hparams = hparams
        self._prepared = False

    @staticmethod
    def _load_tokenizer(model: nn.Module):
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        fix = "pass tokenizer=AutoTokenizer.from_pretrained(<the model's directory or hub id>)"
        if not name:
            raise TokenizerError(f"no tokenizer given and the model has no name_or_path to load "
                                 f"one from; {fix}")
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise TokenizerError(f"no tokenizer given and transformers is not importable; {fix}"
                                 ) from exc
        # Local files first: a directory or a cached hub id loads in milliseconds, and an
        # offline machine must not sit through the hub client's retries (~47 s) to fail.
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as exc:
            local_error = exc
        why = ("offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if _hub_offline()
               else "the directory has no readable tokenizer files" if Path(name).exists()
               else _hub_unreachable())
        if why is not None:
            raise TokenizerError(
                f"no tokenizer given and none could be loaded from {name!r}: {why} "
                f"({type(local_error).__name__}: {' '.join(str(local_error).split())[:200]}); "
                f"{fix}"
            ) from local_error
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as exc:
            raise TokenizerError(
                f"no tokenizer given and none could be loaded from {name!r} ({exc}); {fix}, or "
                "set HF_HUB_OFFLINE=1 to fail at once without network"
            ) from exc

    def _check_tokenizer(self) -> None:
        """Refuse a tokenizer that does not belong to the model, before any work.

        A tokenizer with more tokens than the embedding has rows would index past it (a raw
        ``IndexError`` mid-edit). One with fewer is normal when the embedding is padded to a
        round size (GPT-J: 50257 of 50400 rows, Phi-2: 50295 of 51200), so up to 10 % of the
        rows may be unused; a smaller tokenizer than that is another model's and would
        silently edit the wrong tokens.
        """
        embedding = getattr(self.model, "get_input_embeddings", None)
        weight = getattr(embedding() if callable(embedding) else None, "weight", None)
        try:
            size = len(self.tokenizer)  # type: ignore[arg-type]
        except TypeError:
            size = getattr(self.tokenizer, "vocab_size", None)
        if weight is None or not isinstance(size, int) or weight.dim() != 2:
            return
        rows = int(weight.shape[0])
        if size > rows:
            raise TokenizerError(
                f"the tokenizer has {size} tokens but the model's embedding has only {rows} rows; "
                "it belongs to another model: pass the model's own tokenizer (tokenizer=)")
        if size < 0.9 * rows:
            raise TokenizerError(
                f"the tokenizer has {size} tokens but the model's embedding has {rows} rows "
                f"({rows - size} unused, more than padding explains); it belongs to another "
                "model: pass the model's own tokenizer (tokenizer=)")

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

    def check_objectives(self, requests: Sequence[EditRequest]) -> None:
        """Refuse a request whose objective this method does not optimise (``objectives``)."""
        for r in as_request_list(requests):
            if r.objective.name not in self.objectives:
                raise UnsupportedObjectiveError(
                    f"{self.name} cannot optimise the objective {r.objective.name!r} of request "
                    f"{r.text!r}; it supports {sorted(self.objectives)}. Use rome, memit, ft or "
                    "ft_l for erase/amplify/reverse_tracing/force, or objective='inject'")

    def context_reserve(self) -> int:
        """Tokens a method puts before a request's prompt (context prefixes); default 0."""
        return 0

    def check_request_lengths(self, requests: Sequence[EditRequest]) -> None:
        """Refuse a request whose prompt (behind this method's context prefixes), or one of
        whose evaluation prompts, does not fit the model's context with its target: every
        forward over it would index past the position embedding. Call it before running the
        model on the requests' prompts yourself (``apply`` does)."""
        items = as_request_list(requests)
        check_fits_context(self.tokenizer, self.model,
                           [f"{r.text} {r.target_new.strip()}" for r in items],
                           "the request (prompt and target_new)", reserve=self.context_reserve())
        for kind in ("paraphrases", "neighborhood"):
            check_fits_context(
                self.tokenizer, self.model,
                [f"{p} {(r.target_new if kind == 'paraphrases' else r.target_true or '').strip()}"
                 for r in items for p in getattr(r, kind)],
                f"the evaluation prompt ({kind}) with its target")

    # --------------------------------------------------------------- public
    def prepare(self) -> Editor:
        """Do the one-time work of this editor (statistics, templates, hypernetwork) now.

        ``apply`` calls it when needed; call it yourself to keep that cost out of the first
        edit's timing. Returns the editor.
        """
        if not self._prepared:
            try:
                self._prepare()
            except EditkitError:
                raise
            except Exception as exc:
                raise self._preparation_failed(exc) from exc
            self._prepared = True
        return self

    def _preparation_failed(self, exc: Exception) -> EditFailedError:
        # Statistics, templates and factorising C fail on the same bad settings as the edit
        # itself; the error says which settings to change.
        return EditFailedError(
            f"{self.name} failed while preparing ({type(exc).__name__}: {exc}); the model was "
            "left unchanged. Check the statistics settings (mom2_dataset, mom2_n_samples, "
            "mom2_max_length) or pass stats_texts= / covariances=")

    @property
    def history(self) -> list[AppliedEdit]:
        """The edits applied to this model (by any editor of it), oldest first."""
        return list(EditHistory.of(self.model).edits)

    @property
    def last_edit(self) -> AppliedEdit:
        """The most recent edit applied to this model; ``last_edit.patch`` is its patch.

        Raises :class:`HistoryError` when no edit is applied.
        """
        edits = EditHistory.of(self.model).edits
        if not edits:
            raise HistoryError("no edit is applied to this model; call editor.apply(request) "
                               "first")
        return edits[-1]

    def make_patch(self, deltas: dict[str, Delta], requests: Sequence[EditRequest],
                   **metadata: Any) -> Patch:
        """The patch of ``deltas``, stamped with this editor's method, hyperparameters,
        ``requests`` and the fingerprint of the base weights (what a method's
        ``compute_update`` returns; see :meth:`Patch.for_edit`). ``metadata`` adds entries.
        """
        return Patch.for_edit(self.model, deltas, method=self.name, hparams=self.hparams,
                              requests=requests, **metadata)

    def _new_patch(self, deltas: dict, requests: list[EditRequest], **extra: Any) -> Patch:
        # The name the built-in methods used before make_patch was public.
        return self.make_patch(deltas, requests, **extra)

    def apply(self, requests: EditRequest | Sequence[EditRequest]) -> Editor:
        """Edit the model; on any failure every parameter is left bit-for-bit unchanged.

        Sequential methods apply a sequence one request at a time (each computed on the
        model edited by the previous ones, each its own history entry); batch methods get
        the whole sequence at once (one history entry).
        """
        items = as_request_list(requests)
        self.check_objectives(items)
        try:
            self.validate_requests(items)
            self.check_request_lengths(items)
        except EditkitError:
            raise
        except Exception as exc:  # a plugin's check that raised a builtin error
            raise EditFailedError(
                f"{self.name} failed while checking the requests ({type(exc).__name__}: {exc});"
                " the model was left unchanged. Fix the requests or the method's "
                "validate_requests()") from exc
        self.prepare()
        groups = [[r] for r in items] if self.sequential else [items]
        history = EditHistory.of(self.model)
        params = dict(self.model.named_parameters())
        guarded = list(dict.fromkeys(self.edited_parameters()))
        offloaded = [n for n in guarded if params[n].device.type == "meta"]
        if offloaded:  # accelerate keeps offloaded weights on "meta" and loads them per forward
            raise UnsupportedModelError(
                f"{self.name} cannot edit {offloaded}: the weight is offloaded (on the meta "
                "device, e.g. by accelerate's device_map with CPU/disk offload), so there is "
                "no tensor to change. Dispatch the model with that layer on a device, or edit "
                "another layer")
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

    @overload
    def applied(self, requests: EditRequest) -> AbstractContextManager[AppliedEdit]: ...

    @overload
    def applied(self, requests: Sequence[EditRequest]
                ) -> AbstractContextManager[list[AppliedEdit]]: ...

    @contextmanager
    def applied(self, requests: EditRequest | Sequence[EditRequest]) -> Iterator[Any]:
        """Apply ``requests`` for the duration of a ``with`` block, then revert exactly them.

        ``with editor.applied(request) as edit:`` yields the :class:`AppliedEdit` of one
        request; a sequence of requests yields the list of history entries it added (one per
        request for sequential methods, one for a batch method). On leaving the block, also
        by an exception, those entries are reverted and nothing else, so blocks nest and
        edits applied before the block stay; the touched weights are bit-for-bit as before
        the block when no other edit was added or removed inside it. If applying fails,
        the model is unchanged and the error propagates before the block runs.
        """
        history = EditHistory.of(self.model)
        n_before = len(history.edits)
        self.apply(requests)
        added = history.edits[n_before:]
        try:
            yield added[0] if isinstance(requests, EditRequest) else list(added)
        finally:
            still = {e.id for e in history.edits}
            ids = [e.id for e in added if e.id in still]  # the block may have reverted some
            if ids:
                history.remove(self.model, ids)

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
        revert(self.model, edit)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {self.hparams})"


def revert(model: nn.Module, edit: int | AppliedEdit | Literal["all"] | None = None) -> None:
    """Undo the last edit of ``model`` (``None``), a given one (id or ``AppliedEdit``) or
    ``"all"``, whichever editor or :func:`apply_patch` applied it; exact and all or nothing.

    The weights become bit-for-bit those of the base with the remaining patches applied in
    their original order; if that fails, weights and history stay as they were.
    """
    history = EditHistory.of(model)
    if not history.edits:
        if edit == "all":
            return
        raise HistoryError("nothing to revert: no edit has been applied to this model")
    if edit is None:
        ids = [history.edits[-1].id]
    elif isinstance(edit, str) and edit == "all":
        ids = [e.id for e in history.edits]
    elif isinstance(edit, AppliedEdit):
        ids = [edit.id]
    elif isinstance(edit, int) and not isinstance(edit, bool):
        ids = [edit]
    else:
        raise HistoryError(f"revert() takes None, 'all', an edit id or an AppliedEdit, "
                           f"got {edit!r}")
    history.remove(model, ids)


def apply_patch(model: nn.Module, patch: Patch | str | os.PathLike, *,
                force: bool = False) -> AppliedEdit:
    """Apply a saved patch (a path, or a :class:`Patch`) through ``model``'s edit history.

    Returns the history entry, so ``revert(model, entry)`` (or ``editor.revert(entry)``)
    undoes it bit-for-bit. The file is validated by :func:`~editkit.patch.load_patch`; the
    patch must fit ``model`` (names, shapes, and the fingerprint of the base weights it was
    computed on). ``force=True`` skips the fingerprint checks, and must be given explicitly
    for a patch that records no base fingerprint. All or nothing: on any error the model
    and its history are unchanged.
    """
    if not isinstance(patch, Patch):
        patch = load_patch(patch, force=force)
    unguarded = sorted(set(patch.deltas) - set(patch.base_fingerprint))
    if unguarded and not force:
        raise PatchMismatchError(
            f"the patch records no base fingerprint for {unguarded[:3]}, so applying it to the "
            "wrong base model could not be refused; pass force=True (--force) to apply it "
            "anyway"
        )
    requests = patch_requests(patch)
    patch.check_fits(model, force=force)
    patch.check_dtypes()
    patch.check_finite()
    method = patch.metadata.get("method")
    return EditHistory.of(model).push(model, patch, method if isinstance(method, str) else
                                      "patch", requests, 0.0)


def patch_requests(patch: Patch) -> list[EditRequest]:
    """The edit requests a patch records in its metadata (``PatchMismatchError`` if one is
    not a valid request)."""
    requests = []
    for i, item in enumerate(patch.metadata.get("requests") or ()):
        try:
            requests.append(EditRequest.from_dict(item))
        except (EditkitError, TypeError, ValueError, AttributeError, KeyError) as exc:
            raise PatchMismatchError(
                f"metadata.requests[{i}] of the patch is not an edit request ({exc}); use the "
                "original patch file"
            ) from exc
    return requests
