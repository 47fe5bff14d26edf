"""``LearnedEditor``: an ``Editor`` whose update comes from a trained hypernetwork.

A subclass (MEND, KE) provides

- ``METHOD`` (its registry name), ``hparams_class`` and ``train_config_class``;
- ``_build_hypernet()``: a fresh, untrained hypernetwork for ``self.specs`` (an ``nn.Module``
  whose ``forward(factors, context)`` returns one :class:`FactoredDelta` per edited weight and
  whose ``param_groups(config)`` lists its optimiser groups);
- ``_build_objective(config)``: how training combines edit and locality losses.

Everything else is shared: loading a stored hypernetwork in ``prepare()`` (with a fingerprint
check of the base weights), ``compute_update`` (gradient factors of the edit loss →
hypernetwork → a ``Patch`` of low-rank or dense deltas), saving, and ``train``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from editkit.editor import Editor
from editkit.errors import HypernetworkMismatchError, HypernetworkMissingError
from editkit.methods._learned.data import (
    as_requests,
    build_examples,
    locality_pool,
    split_by_subject,
    subjects_of,
)
from editkit.methods._learned.factors import (
    WeightSpec,
    capture_factors,
    frozen_parameters,
    to_patch_delta,
    weight_specs,
)
from editkit.methods._learned.hparams import LearnedHyperParams, LearnedTrainConfig
from editkit.methods._learned.io import (
    base_fingerprint,
    check_fingerprint,
    check_hypernet_fits,
    find_shipped_hypernet,
    load_hypernet_files,
    save_hypernet,
)
from editkit.methods._learned.training import (
    EditContext,
    HypernetTrainer,
    Objective,
    RecordMetrics,
    _eval_mode,
)
from editkit.patch import Patch
from editkit.protocols import AdapterLike, TokenizerLike
from editkit.requests import EditRequest, as_request_list

logger = logging.getLogger(__name__)


class LearnedEditor(Editor):
    """Base of hypernetwork editors; see the module docstring for the subclass surface."""

    METHOD: ClassVar[str] = "learned"
    hparams_class: ClassVar[type[LearnedHyperParams]] = LearnedHyperParams
    train_config_class: ClassVar[type[LearnedTrainConfig]] = LearnedTrainConfig
    sequential = True

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike | None = None,
                 hparams: LearnedHyperParams | None = None, adapter: AdapterLike | None = None,
                 *, hypernet: nn.Module | None = None) -> None:
        super().__init__(model, tokenizer, hparams, adapter)
        self.hypernet = hypernet
        self.hypernet_info: dict[str, Any] = {}
        self.training_summary: dict[str, Any] | None = None
        if hypernet is not None:
            self._adopt(hypernet)

    # ---------------------------------------------------------- subclass API
    def _build_hypernet(self) -> nn.Module:
        raise NotImplementedError

    def _build_objective(self, config: LearnedTrainConfig) -> Objective:
        raise NotImplementedError

    # --------------------------------------------------------------- weights
    @property
    def layers(self) -> list[int]:
        return self.hparams.layer_indices(self.adapter.num_layers(self.model))

    @property
    def specs(self) -> list[WeightSpec]:
        return weight_specs(self.model, self.adapter, self.layers, self.hparams.slots)

    def edited_parameters(self) -> list[str]:
        return [s.param for s in self.specs]

    def fingerprint(self) -> dict[str, Any]:
        """Fingerprint of the (unedited) base weights this editor's hypernetwork edits."""
        return base_fingerprint(self.model, self.adapter, self.edited_parameters())

    # --------------------------------------------------------------- loading
    def _adopt(self, hypernet: nn.Module) -> None:
        device = next(self.model.parameters()).device
        self.hypernet = hypernet.to(device).eval()
        self._prepared = True

    def _prepare(self) -> None:
        if self.hypernet is not None:
            return
        path = self.hparams.hypernet_path
        if path is None:
            found = find_shipped_hypernet(self.METHOD, self.model, self.adapter)
            if found is None:
                cls = type(self).__name__
                raise HypernetworkMissingError(
                    f"{cls} edits with a trained hypernetwork and none was given "
                    f"(hparams.hypernet_path is None, and no shipped one fits this model). "
                    f"Train one: `editor = {cls}.train(model, tokenizer, train_records, "
                    f"val_records, {self.train_config_class.__name__}(out_dir='{self.METHOD}_"
                    f"hypernet'))`, or on the command line `editkit train-{self.METHOD} --model "
                    f"MODEL_DIR --data counterfact.json --out {self.METHOD}_hypernet`; then "
                    f"pass hparams={self.hparams_class.__name__}(hypernet_path='{self.METHOD}_"
                    f"hypernet') or use {cls}.load('{self.METHOD}_hypernet', model, tokenizer)"
                )
            path = str(found[0])
        self._load_from(path)

    def _reconcile(self, stored: dict[str, Any], where: str) -> LearnedHyperParams:
        """Adopt the stored architecture; refuse explicit choices that contradict it."""
        hp = self.hparams
        defaults = self.hparams_class()
        n = self.adapter.num_layers(self.model)
        changes: dict[str, Any] = {}
        for name in self.hparams_class.ARCHITECTURE:
            if name not in stored:
                continue
            mine, theirs, default = getattr(hp, name), stored[name], getattr(defaults, name)
            if name == "layers":
                same = hp.layer_indices(n) == self.hparams_class(layers=theirs).layer_indices(n)
            elif name == "slots":
                same = tuple(mine) == tuple(theirs)
            else:
                same = mine == theirs
            if same:
                continue
            if mine != default:
                raise HypernetworkMismatchError(
                    f"the hypernetwork in {where} was trained with {name}={theirs!r} but the "
                    f"hyperparameters ask for {name}={mine!r}; leave {name} at its default to "
                    "use the stored value, or train a hypernetwork with that setting"
                )
            changes[name] = theirs
        if not changes:
            return hp
        new = dataclasses.replace(hp, **changes)
        new.validate(self.model, self.adapter)
        return new

    def _load_from(self, path: str | Path) -> None:
        state, meta = load_hypernet_files(path, self.METHOD)
        previous = self.hparams
        self.hparams = self._reconcile(dict(meta.get("hparams", {})), str(path))
        try:  # a refused hypernetwork leaves the editor's hyperparameters as they were
            if self.hparams.check_fingerprint:  # the caller's policy, never the file's
                check_fingerprint(meta.get("base", {}), self.fingerprint(), str(path))
            check_hypernet_fits(self._build_hypernet, state, self.hparams,
                                [(s.d_out, s.d_in) for s in self.specs], str(path))
            hypernet = self._build_hypernet()
            try:
                hypernet.load_state_dict(state)
            except RuntimeError as exc:
                raise HypernetworkMismatchError(
                    f"the hypernetwork in {str(path)!r} does not fit the architecture these "
                    f"hyperparameters build ({exc}); retrain it"
                ) from exc
        except BaseException:
            self.hparams = previous
            raise
        self.hypernet_info = {"path": str(path), "base_digest": meta.get("base", {}).get("digest")}
        self.training_summary = meta.get("training")
        self._adopt(hypernet)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, tokenizer: TokenizerLike | None = None,
             adapter: AdapterLike | None = None,
             **overrides: Any) -> LearnedEditor:
        """An editor for ``model`` with the hypernetwork stored in ``path``."""
        _, meta = load_hypernet_files(path, cls.METHOD)
        stored = {**meta.get("hparams", {}), **overrides, "hypernet_path": str(path)}
        editor = cls(model, tokenizer, cls.hparams_class.from_dict(stored), adapter)
        return editor.prepare()

    def save_hypernet(self, path: str | Path) -> Path:
        """Write the hypernetwork (safetensors) and its JSON description into ``path``."""
        self.prepare()
        hp = {k: v for k, v in self.hparams.to_dict().items() if k != "hypernet_path"}
        hp["layers"] = self.layers
        hp["slots"] = list(self.hparams.slots)
        meta = {"method": self.METHOD, "hparams": hp,
                "edited_parameters": {s.param: [s.d_out, s.d_in] for s in self.specs},
                "base": self.fingerprint(), "training": self.training_summary}
        return save_hypernet(path, self.hypernet, meta)

    # ---------------------------------------------------------------- editing
    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        """ΔW for each edited weight from the hypernetwork; several requests are summed.

        The edit loss of each request (mean per-token NLL of ``" " + target_new`` after its
        rewrite prompt) is differentiated at the current weights, one backward pass, no
        parameter gradients stored; the model is unchanged afterwards.
        """
        items = as_request_list(requests)
        self.prepare()
        specs = self.specs
        with frozen_parameters(self.model), _eval_mode(self.model):
            factors, _ = capture_factors(self.model, self.tokenizer, specs,
                                         [r.text for r in items], [r.target_new for r in items])
            self.hypernet.eval()
            with torch.no_grad():
                deltas = self.hypernet(factors, EditContext(items, self.model, self.tokenizer,
                                                            self.adapter))
        patch_deltas = {s.param: to_patch_delta(self.adapter, deltas[s.param]) for s in specs}
        return self._new_patch(patch_deltas, items, hypernet=dict(self.hypernet_info))

    # --------------------------------------------------------------- training
    @classmethod
    def train(cls, model: nn.Module, tokenizer: TokenizerLike, train_records: Iterable[Any],
              val_records: Iterable[Any] | None = None,
              config: LearnedTrainConfig | dict | None = None, *,
              hparams: LearnedHyperParams | dict | None = None, adapter: AdapterLike | None = None,
              locality_texts: Iterable[str] = (), exclude_subjects: Iterable[str] = (),
              record_metrics: RecordMetrics | None = None) -> LearnedEditor:
        """Train a hypernetwork for ``model`` and return an editor that uses it.

        ``train_records`` / ``val_records``: CounterFact or zsRE records (dicts), ``EvalRecord``
        s or ``EditRequest`` s. Without ``val_records`` a tenth of the training subjects is held
        out for validation. ``locality_texts``: extra unrelated prompts for the locality loss
        (e.g. corpus sentences); the training records' rewrite and neighbourhood prompts are
        always used. ``exclude_subjects`` (e.g. the test split's subjects): prompts that
        mention them are never used in training. ``record_metrics`` (e.g.
        ``editkit.eval.counterfact_metrics``) adds edit-quality numbers of the validation
        edits to the validation log. With ``config.out_dir`` the hypernetwork,
        checkpoints, the training log and curves are written there, and an interrupted run
        resumes from its checkpoint.
        """
        if config is None:
            config = cls.train_config_class()
        elif isinstance(config, dict):
            config = cls.train_config_class.from_dict(config)
        if hparams is None:
            from editkit.registry import get_adapter

            ad = adapter if adapter is not None else get_adapter(model)
            hparams = cls.hparams_class.scaled(ad.num_layers(model))
        elif isinstance(hparams, dict):
            hparams = cls.hparams_class.from_dict(hparams)
        hparams = dataclasses.replace(hparams, hypernet_path=None)
        editor = cls(model, tokenizer, hparams, adapter)
        with torch.random.fork_rng(devices=[]):  # reproducible initialisation, global RNG kept
            torch.manual_seed(config.seed)
            editor.hypernet = editor._build_hypernet().to(next(model.parameters()).device)
        editor._prepared = True

        train_req = as_requests(train_records)
        if val_records is None:
            train_req, val_req = split_by_subject(train_req, (0.9, 0.1), seed=config.seed)
        else:
            val_req = as_requests(val_records)
        held_out = subjects_of(val_req) | set(exclude_subjects)
        overlap = subjects_of(train_req) & held_out
        if overlap:
            logger.warning("%d training subjects also occur in validation/excluded records; "
                           "their training records are dropped", len(overlap))
        train_ex = build_examples(train_req, exclude_subjects=held_out)
        val_ex = build_examples(val_req, exclude_subjects=set(exclude_subjects))
        pool = locality_pool(train_ex, locality_texts, exclude_subjects=held_out)
        fingerprint = editor.fingerprint()
        trainer = HypernetTrainer(
            model=model, tokenizer=editor.tokenizer, adapter=editor.adapter,
            hypernet=editor.hypernet, objective=editor._build_objective(config),
            specs=editor.specs, train_examples=train_ex, val_examples=val_ex, pool=pool,
            config=config, method=cls.METHOD, fingerprint=fingerprint["digest"],
            extra_meta={"hparams": hparams.to_dict()}, record_metrics=record_metrics,
        )
        trainer.run()
        editor.training_summary = {**trainer.summary(), "config": config.to_dict()}
        editor.hypernet.eval()
        if config.out_dir is not None:
            editor.save_hypernet(config.out_dir)
            editor.hparams = dataclasses.replace(editor.hparams, hypernet_path=str(config.out_dir))
            editor.hypernet_info = {"path": str(config.out_dir),
                                    "base_digest": fingerprint["digest"]}
        else:
            editor.hypernet_info = {"path": None, "base_digest": fingerprint["digest"]}
        return editor
