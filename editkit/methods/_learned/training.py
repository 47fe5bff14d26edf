"""The training loop shared by the hypernetwork editors (MEND, KE).

One step (MEND paper, Algorithm 1; KE, De Cao et al. 2021, §3):

1. sample a batch of training edits ``(x_e, y_e)`` with paraphrases ``x'_e`` and unrelated
   prompts ``x_loc``;
2. gradient factors ``(u, δ)`` of the edit loss ``−log p(y_e | x_e)`` at the edited layers
   (base weights, frozen);
3. the hypernetwork maps them to one weight change per edit;
4. the edited model's edit loss ``L_e = −log p(y_e | x'_e)`` (rewrite and paraphrases) and
   locality loss ``L_loc = KL(p_θ(·|x_loc) ‖ p_θ̃(·|x_loc))`` (every token of every unrelated
   prompt), all edits of the batch in one forward pass (:func:`rowwise_deltas`);
5. the method's objective combines them (:class:`Objective`); Adam on the hypernetwork.

Around it: validation every ``val_every`` steps (losses, and the edit-quality numbers of
the validation edits computed by the caller's ``record_metrics``), early stopping on the
validation objective with the best hypernetwork kept, checkpoints (safetensors tensors +
JSON scalars, optimiser state included; no pickle) that a later run resumes, a JSON log and
a PNG of the curves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.errors import HypernetworkMismatchError
from editkit.methods._learned.data import Batch, EditExample, make_batch
from editkit.methods._learned.factors import (
    FactoredDelta,
    WeightSpec,
    capture_factors,
    frozen_parameters,
    row_target_logprobs,
    rowwise_deltas,
)
from editkit.methods._learned.hparams import LearnedTrainConfig
from editkit.methods._learned.io import load_tensors, save_tensors, write_json
from editkit.tokens import encode, pad_id, right_pad

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "training_log.json"
CURVES_FILE = "training_curves.png"


# ------------------------------------------------------------------ objective
class Objective(nn.Module):
    """How a method combines edit loss and locality loss; may own trainable state (KE's λ).

    ``forward(edit_nll, loc_kl) -> (loss to minimise, scalars to log)``;
    ``val_score(metrics)``: validation objective for early stopping (lower is better).
    """

    def forward(self, edit_nll: torch.Tensor, loc_kl: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def val_score(self, metrics: dict[str, float]) -> float:
        raise NotImplementedError

    def param_groups(self, config: LearnedTrainConfig) -> list[dict[str, Any]]:
        return []


@dataclass
class EditContext:
    """What a hypernetwork may read besides the gradient factors (KE reads the requests)."""

    requests: list
    model: nn.Module
    tokenizer: Any
    adapter: Any


#: ``record_metrics(logprobs) -> {name: value}``: edit-quality numbers of one edited
#: example from its per-prompt log-probabilities (``logprobs[group]`` = ``[[lp(new),
#: lp(true)], ...]`` for groups ``rewrite``, ``paraphrase``, ``neighborhood``). The caller
#: passes it (``editkit.eval.counterfact_metrics``); the methods compute no metric themselves.
RecordMetrics = Callable[[Mapping[str, list[list[float]]]], Mapping[str, float | None]]


# --------------------------------------------------------------- one forward
def edit_and_score(model: nn.Module, tokenizer, adapter, hypernet: nn.Module,
                   specs: Sequence[WeightSpec], batch: Batch, *, scores: bool = False,
                   n_neighbors: int | None = None) -> dict[str, Any]:
    """Edit every example of ``batch`` with ``hypernet`` and compute its losses.

    Returns ``edit_nll`` and ``loc_kl`` (scalars, differentiable with respect to the
    hypernetwork when grad is enabled) and, with ``scores``, ``logprobs``: per example the
    per-prompt ``[lp(new), lp(true)]`` of its rewrite prompt, paraphrases and neighbourhood
    prompts (all, or the first ``n_neighbors``) under its own edit, ``None`` where the
    request has no ``target_true``.
    """
    requests = [e.request for e in batch.examples]
    factors, _ = capture_factors(model, tokenizer, specs, [r.text for r in requests],
                                 [r.target_new for r in requests])
    deltas: dict[str, FactoredDelta] = hypernet(
        factors, EditContext(requests, model, tokenizer, adapter))
    by_module = {s.module: deltas[s.param] for s in specs}
    device = next(model.parameters()).device
    out: dict[str, Any] = {}

    rows = torch.tensor([i for _, i in batch.edit_rows], device=device)
    with rowwise_deltas(model, by_module, rows):
        lp = row_target_logprobs(model, tokenizer, [p for p, _ in batch.edit_rows],
                                 [requests[i].target_new for _, i in batch.edit_rows])
    out["edit_nll"] = -lp.mean()

    if batch.loc_rows:
        enc = right_pad([encode(tokenizer, p) for p, _ in batch.loc_rows], pad_id(tokenizer),
                        device)
        with torch.no_grad():
            base = torch.log_softmax(model(**enc.model_inputs()).logits.float(), -1)
        rows = torch.tensor([i for _, i in batch.loc_rows], device=device)
        with rowwise_deltas(model, by_module, rows):
            new = torch.log_softmax(model(**enc.model_inputs()).logits.float(), -1)
        kl = (base.exp() * (base - new)).sum(-1)
        mask = enc.attention_mask.to(kl.dtype)
        out["loc_kl"] = ((kl * mask).sum(1) / mask.sum(1)).mean()
    else:
        out["loc_kl"] = torch.zeros((), device=device)

    if scores:
        out["logprobs"] = _example_logprobs(model, tokenizer, by_module, batch.examples,
                                            n_neighbors)
    return out


@torch.no_grad()
def _example_logprobs(model, tokenizer, by_module: dict[str, FactoredDelta],
                      examples: Sequence[EditExample], n_neighbors: int | None
                      ) -> list[dict[str, list[list[float]]] | None]:
    """Per edited example, ``[lp(new), lp(true)]`` of each prompt of its three groups."""
    prompts, news, trues, idx, where = [], [], [], [], []
    tables: list[dict[str, list[list[float]]] | None] = []
    for i, e in enumerate(examples):
        r = e.request
        if r.target_true is None:
            tables.append(None)
            continue
        neighbours = list(r.neighborhood)
        if n_neighbors is not None:
            neighbours = neighbours[:n_neighbors]
        groups = {"rewrite": [e.edit_prompts[0]], "paraphrase": list(e.edit_prompts[1:]),
                  "neighborhood": neighbours}
        tables.append({g: [] for g in groups})
        for group, ps in groups.items():
            for p in ps:
                prompts.append(p)
                news.append(r.target_new)
                trues.append(r.target_true)
                idx.append(i)
                where.append(group)
    if not prompts:
        return tables
    device = next(model.parameters()).device
    rows = torch.tensor(idx + idx, device=device)
    with rowwise_deltas(model, by_module, rows):
        lp = row_target_logprobs(model, tokenizer, prompts + prompts, news + trues).cpu()
    k = len(prompts)
    for j, (i, group) in enumerate(zip(idx, where, strict=True)):
        tables[i][group].append([float(lp[j]), float(lp[k + j])])
    return tables


# ------------------------------------------------------- optimiser <-> files
def optimizer_state_to_files(opt: torch.optim.Optimizer, prefix: str = "optimizer/"
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser's state into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                               meta: dict[str, Any], prefix: str = "optimizer/") -> None:
    """Inverse of :func:`optimizer_state_to_files`: load into ``opt``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------- trainer
@dataclass
class TrainState:
    step: int = 0
    best_score: float = math.inf
    best_step: int = -1
    bad_validations: int = 0
    stop_reason: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)


class HypernetTrainer:
    """Trains ``hypernet`` for the frozen ``model`` (see the module docstring)."""

    def __init__(self, *, model: nn.Module, tokenizer, adapter, hypernet: nn.Module,
                 objective: Objective, specs: Sequence[WeightSpec],
                 train_examples: Sequence[EditExample], val_examples: Sequence[EditExample],
                 pool: Sequence[str], config: LearnedTrainConfig, method: str,
                 fingerprint: str, extra_meta: dict[str, Any] | None = None,
                 record_metrics: RecordMetrics | None = None) -> None:
        if not train_examples:
            raise ValueError("no training examples; pass at least one training record")
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.hypernet, self.objective, self.specs = hypernet, objective, list(specs)
        self.train_examples, self.pool = list(train_examples), list(pool)
        self.val_examples = list(val_examples)[: config.val_size]
        self.config, self.method, self.fingerprint = config, method, fingerprint
        self.extra_meta = dict(extra_meta or {})
        self.record_metrics = record_metrics
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        groups = hypernet.param_groups(config) + objective.param_groups(config)
        self.optimizer = torch.optim.Adam(groups)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.state = TrainState()
        self.best = {k: v.detach().clone() for k, v in hypernet.state_dict().items()}
        val_gen = torch.Generator().manual_seed(config.seed + 1)
        b = config.batch_size
        self.val_batches = [
            make_batch(self.val_examples[i:i + b], self.pool, val_gen,
                       n_paraphrases=max(config.n_paraphrases, 8), n_locality=config.n_locality)
            for i in range(0, len(self.val_examples), b)
        ]

    # -------------------------------------------------------------- steps
    def _train_step(self) -> dict[str, float]:
        cfg = self.config
        n = len(self.train_examples)
        idx = torch.randperm(n, generator=self.generator)[: cfg.batch_size].tolist()
        batch = make_batch([self.train_examples[i] for i in idx], self.pool, self.generator,
                           cfg.n_paraphrases, cfg.n_locality)
        self.hypernet.train()
        losses = edit_and_score(self.model, self.tokenizer, self.adapter, self.hypernet,
                                self.specs, batch)
        loss, logs = self.objective(losses["edit_nll"], losses["loc_kl"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            logger.warning("step %d: non-finite loss or gradient; update skipped",
                           self.state.step)
        return {"loss": float(loss.detach()), "edit_nll": float(losses["edit_nll"].detach()),
                "loc_kl": float(losses["loc_kl"].detach()), **logs}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses, and the mean of each ``record_metrics`` number when given."""
        self.hypernet.eval()
        total: dict[str, float] = {"edit_nll": 0.0, "loc_kl": 0.0}
        weights = 0
        quality: dict[str, list[float]] = {}
        scoring = self.record_metrics is not None
        for batch in self.val_batches:
            out = edit_and_score(self.model, self.tokenizer, self.adapter, self.hypernet,
                                 self.specs, batch, scores=scoring)
            w = len(batch.examples)
            weights += w
            total["edit_nll"] += float(out["edit_nll"]) * w
            total["loc_kl"] += float(out["loc_kl"]) * w
            for table in out.get("logprobs", ()):
                if table is None:
                    continue
                for name, value in self.record_metrics(table).items():
                    if value is not None and not math.isnan(value):
                        quality.setdefault(name, []).append(float(value))
        metrics = {k: v / max(weights, 1) for k, v in total.items()}
        for name, vals in quality.items():
            metrics[name] = sum(vals) / len(vals)
        metrics["score"] = self.objective.val_score(metrics)
        return metrics

    # ------------------------------------------------------------ running
    def run(self) -> TrainState:
        cfg = self.config
        if self.out_dir is not None and cfg.resume:
            self._maybe_resume()
        start, cpu_start = time.perf_counter(), time.process_time()
        run_start_seconds, run_start_cpu = self.state.seconds, self.state.cpu_seconds
        window: dict[str, list[float]] = {}
        log_every = max(1, min(cfg.val_every, 25))
        with frozen_parameters(self.model), _eval_mode(self.model):
            if self.state.step == 0 and self.val_examples and not self.state.log:
                self._record_validation()
            bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not cfg.progress,
                       desc=f"train {self.method}", unit="step")
            try:
                while self.state.step < cfg.max_steps and self.state.stop_reason is None:
                    logs = self._train_step()
                    self.state.step += 1
                    self.state.seconds = run_start_seconds + time.perf_counter() - start
                    self.state.cpu_seconds = run_start_cpu + time.process_time() - cpu_start
                    for k, v in logs.items():
                        window.setdefault(k, []).append(v)
                    bar.update(1)
                    if self.state.step % log_every == 0:
                        entry = {"step": self.state.step, "seconds": round(self.state.seconds, 2),
                                 **{f"train_{k}": sum(v) / len(v) for k, v in window.items()}}
                        self.state.log.append(entry)
                        bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                                        edit=f"{entry['train_edit_nll']:.3f}",
                                        kl=f"{entry['train_loc_kl']:.4f}")
                        window.clear()
                    if self.val_examples and self.state.step % cfg.val_every == 0:
                        self._record_validation()
                    if cfg.max_minutes is not None and \
                            time.perf_counter() - start > 60 * cfg.max_minutes:
                        self.state.stop_reason = "max_minutes"
                    if self.out_dir is not None and self.state.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                if self.state.stop_reason is None:
                    self.state.stop_reason = "max_steps"
                if self.val_examples and (not self.state.log or
                                          self.state.log[-1].get("step") != self.state.step or
                                          "val_score" not in self.state.log[-1]):
                    self._record_validation()
            except KeyboardInterrupt:
                if self.out_dir is not None:
                    logger.warning("interrupted at step %d; checkpoint saved to %s (rerun to "
                                   "resume)", self.state.step, self.out_dir / CHECKPOINT_DIR)
                    self.save_checkpoint()
                raise
            finally:
                bar.close()
        if self.out_dir is not None:
            self.save_checkpoint()
        if self.val_examples and self.state.best_step >= 0:
            self.hypernet.load_state_dict(self.best)
        self.hypernet.eval()
        if self.out_dir is not None:
            self.write_log()
        return self.state

    def _record_validation(self) -> None:
        metrics = self.validate()
        entry = {"step": self.state.step, "seconds": round(self.state.seconds, 2),
                 **{f"val_{k}": v for k, v in metrics.items()}}
        self.state.log.append(entry)
        score = metrics["score"]
        if score < self.state.best_score - self.config.min_delta:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.state.bad_validations = 0
            self.best = {k: v.detach().clone() for k, v in self.hypernet.state_dict().items()}
        else:
            self.state.bad_validations += 1
            if self.state.bad_validations >= self.config.patience:
                self.state.stop_reason = "early_stopping"
        logger.info("step %d validation: %s", self.state.step,
                    {k: round(v, 4) for k, v in metrics.items()})

    # --------------------------------------------------------- checkpoints
    def _checkpoint_meta(self) -> dict[str, Any]:
        s = self.state
        return {"method": self.method, "fingerprint": self.fingerprint, "step": s.step,
                "best_score": s.best_score if math.isfinite(s.best_score) else None,
                "best_step": s.best_step, "bad_validations": s.bad_validations,
                "stop_reason": s.stop_reason, "seconds": s.seconds,
                "cpu_seconds": s.cpu_seconds, "log": s.log,
                "config": self.config.to_dict(), **self.extra_meta}

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoint/{state.safetensors,state.json}`` (atomic renames)."""
        assert self.out_dir is not None
        ckpt = self.out_dir / CHECKPOINT_DIR
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.hypernet.state_dict().items():
            tensors[f"hypernet/{k}"] = v
        for k, v in self.best.items():
            tensors[f"best/{k}"] = v
        for k, v in self.objective.state_dict().items():
            tensors[f"objective/{k}"] = v
        opt_tensors, opt_meta = optimizer_state_to_files(self.optimizer)
        tensors.update(opt_tensors)
        tensors["rng/train"] = self.generator.get_state()
        save_tensors(ckpt / "state.safetensors", tensors)
        write_json(ckpt / "state.json", {**self._checkpoint_meta(), "optimizer": opt_meta})
        return ckpt

    def _maybe_resume(self) -> None:
        import json

        ckpt = self.out_dir / CHECKPOINT_DIR
        if not (ckpt / "state.json").is_file() or not (ckpt / "state.safetensors").is_file():
            return
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if meta.get("method") != self.method or meta.get("fingerprint") != self.fingerprint:
            raise HypernetworkMismatchError(
                f"the checkpoint in {str(ckpt)!r} belongs to a {meta.get('method')} run on another "
                "model or with other edited weights; use another --out directory, or delete the "
                "checkpoint to start over"
            )
        tensors = load_tensors(ckpt / "state.safetensors")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.hypernet.load_state_dict(part("hypernet/"))
            self.best = part("best/")
            self.objective.load_state_dict(part("objective/"))
            optimizer_state_from_files(self.optimizer, tensors, meta["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise HypernetworkMismatchError(
                f"cannot resume from {str(ckpt)!r}: it was written with another hypernetwork "
                f"architecture or configuration ({exc}); use another output directory or delete "
                "the checkpoint"
            ) from exc
        self.generator.set_state(tensors["rng/train"])
        best = meta.get("best_score")
        self.state = TrainState(
            step=int(meta["step"]), best_score=math.inf if best is None else float(best),
            best_step=int(meta["best_step"]), bad_validations=int(meta["bad_validations"]),
            stop_reason=meta.get("stop_reason") if meta.get("stop_reason") == "early_stopping"
            else None, seconds=float(meta.get("seconds", 0.0)),
            cpu_seconds=float(meta.get("cpu_seconds", 0.0)), log=list(meta.get("log", [])),
        )
        logger.info("resumed %s training from %s at step %d", self.method, ckpt, self.state.step)

    # --------------------------------------------------------------- logs
    def summary(self) -> dict[str, Any]:
        s = self.state
        last_val = next((e for e in reversed(s.log) if "val_score" in e), None)
        best_val = next((e for e in s.log if "val_score" in e and e["step"] == s.best_step), None)
        return {"steps": s.step, "seconds": round(s.seconds, 2),
                "cpu_seconds": round(s.cpu_seconds, 2), "stop_reason": s.stop_reason,
                "best_step": s.best_step,
                "best_validation": best_val, "last_validation": last_val,
                "n_train_examples": len(self.train_examples),
                "n_val_examples": len(self.val_examples)}

    def write_log(self) -> None:
        assert self.out_dir is not None
        write_json(self.out_dir / LOG_FILE, {"method": self.method, "summary": self.summary(),
                                             "config": self.config.to_dict(),
                                             "log": self.state.log})
        plot_curves(self.state.log, self.out_dir / CURVES_FILE, title=self.method.upper())


def plot_curves(log: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG of training/validation losses and validation ES/PS/NS against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [
        (axes[0], ["train_edit_nll", "val_edit_nll"], "edit NLL (new target)", True),
        (axes[1], ["train_loc_kl", "val_loc_kl"], "locality KL", True),
        (axes[2], ["val_ES", "val_PS", "val_NS"], "validation success", False),
    ]
    for ax, keys, label, log_y in series:
        for key in keys:
            pts = [(e["step"], e[key]) for e in log if key in e and e[key] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=key, marker="." if key.startswith("val") else None)
        if log_y and any(k in e and e[k] and e[k] > 0 for e in log for k in keys):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class _eval_mode:
    """Put a model in eval mode for a block (dropout off), restoring its mode after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
