"""Which layer to edit: the traced layer (:func:`suggest_layer`) and an edit sweep.

ROME edits the MLP of the layer where restoring MLP outputs at the subject's last token has
the largest average indirect effect (Meng et al. 2022, §2.3 and Fig. 2: layer 15–17 of GPT-2
XL). Hase et al. (2023, "Does localization inform editing?") found that this traced layer
does not predict well where editing works best, so :func:`layer_sweep` also edits at every
candidate layer, measures edit success, and reports how well the two agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from editkit.errors import InvalidHyperParamsError, InvalidRequestError
from editkit.eval.metrics import harmonic_mean
from editkit.eval.quality import edit_success
from editkit.protocols import TokenizerLike
from editkit.tracing.corruption import DEFAULT_SAMPLES
from editkit.tracing.results import AIEResult, average_indirect_effect
from editkit.tracing.trace import as_trace_requests, trace_records

logger = logging.getLogger(__name__)

#: The token group whose MLP AIE picks the edit layer (paper: the last subject token).
SUGGEST_GROUP = "last subject token"


class LayerSuggestion(NamedTuple):
    """``(layer, curve)``: the layer of maximal MLP AIE and the AIE curve over layers."""

    layer: int
    curve: np.ndarray


def layer_from_aie(aie: AIEResult, group: str = SUGGEST_GROUP) -> LayerSuggestion:
    """The argmax layer of ``aie``'s curve at ``group`` (ties: the lowest layer)."""
    if group not in aie.groups:
        raise InvalidRequestError(f"unknown token group {group!r}; use one of {aie.groups}")
    curve = aie.curve(group)
    return LayerSuggestion(int(np.argmax(curve)), curve)


def mlp_aie(model: nn.Module, tokenizer: TokenizerLike, records: Iterable[Any], *, n: int | None = None,
            window: int | None = None, samples: int = DEFAULT_SAMPLES,
            noise: float | None = None, noise_std: float | None = None,
            noise_multiple: float | None = None,
            texts: Sequence[str] | None = None, seed: int = 0, batch_size: int = 512,
            only_correct: bool = False, answer: str = "predicted", adapter=None,
            progress: bool = True) -> AIEResult:
    """AIE of MLP-output restorations over ``records`` (CounterFact dicts or requests);
    ``answer`` as :func:`~editkit.tracing.trace_records` (default: the facts the model
    predicts, on its prediction)."""
    traces = trace_records(model, tokenizer, records, kinds=("mlp",), window=window, n=n,
                           samples=samples, noise=noise, noise_std=noise_std,
                           noise_multiple=noise_multiple, texts=texts, answer=answer,
                           seed=seed, batch_size=batch_size, adapter=adapter,
                           progress=progress)
    return average_indirect_effect([t["mlp"] for t in traces], only_correct=only_correct)


def suggest_layer(model: nn.Module, tokenizer: TokenizerLike, records: Iterable[Any], *,
                  n: int | None = None, window: int | None = None,
                  samples: int = DEFAULT_SAMPLES, noise: float | None = None,
                  noise_std: float | None = None, noise_multiple: float | None = None,
                  texts: Sequence[str] | None = None,
                  seed: int = 0, batch_size: int = 512, only_correct: bool = False,
                  answer: str = "predicted", group: str = SUGGEST_GROUP, adapter=None,
                  progress: bool = True) -> LayerSuggestion:
    """The layer to edit: argmax over layers of the MLP AIE at the subject's last token.

    Traces the rewrite prompt of each record the model predicts correctly (the paper traces
    known facts only; ``answer="target_true"`` traces every record's ``target_true``) with
    MLP restorations over a window of ``window`` layers (default
    :func:`~editkit.tracing.kinds.default_window`: 10, clipped to the depth) and returns
    ``(layer, curve)`` where ``curve[l]`` is the AIE of the window centred on l.
    ``only_correct`` (with ``answer="target_true"``) averages over predicted facts only.
    """
    aie = mlp_aie(model, tokenizer, records, n=n, window=window, samples=samples, noise=noise,
                  noise_std=noise_std, noise_multiple=noise_multiple, texts=texts, seed=seed,
                  batch_size=batch_size, only_correct=only_correct, answer=answer,
                  adapter=adapter, progress=progress)
    return layer_from_aie(aie, group)


# --------------------------------------------------------------------------- sweep
#: The CounterFact numbers a sweep records per layer (editkit.eval.counterfact_metrics).
SWEEP_METRICS = ("ES", "EM", "PS", "NS")
#: Field names of sweeps saved before the metrics were unified → the metric they hold.
_OLD_NAMES = {"efficacy": "ES", "efficacy_magnitude": "EM", "paraphrase": "PS",
              "specificity": "NS", "score": "S"}


@dataclass
class SweepResult:
    """Edit success of ``method`` at each candidate layer, and its agreement with tracing.

    Per layer, the CounterFact numbers of :func:`editkit.eval.counterfact_metrics` averaged
    over the records: ``ES`` (rewrite prompt), ``EM`` (its magnitude P(new) − P(true)),
    ``PS`` (paraphrases), ``NS`` (every neighbourhood prompt), ``S``
    (:func:`editkit.eval.harmonic_mean` of ES, PS, NS). ``correlation``: Pearson r between
    the traced MLP AIE curve at the swept layers and ES (``correlation_magnitude``: with EM,
    ``correlation_score``: with S); ``None`` if either is constant (e.g. ES 1.0 at every
    layer). Saved sweeps with the earlier names (``efficacy``, ``efficacy_magnitude``,
    ``paraphrase``, ``specificity``, ``score``) load with :meth:`from_dict`, and those names
    remain readable attributes.
    """

    method: str
    layers: list[int]
    ES: list[float]
    EM: list[float]
    PS: list[float]
    NS: list[float]
    S: list[float]
    n_records: int
    trace_curve: list[float] | None = None
    traced_layer: int | None = None
    correlation: float | None = None
    correlation_magnitude: float | None = None
    correlation_score: float | None = None

    # the attribute names of sweeps saved before the metrics were unified
    efficacy = property(lambda self: self.ES)
    efficacy_magnitude = property(lambda self: self.EM)
    paraphrase = property(lambda self: self.PS)
    specificity = property(lambda self: self.NS)
    score = property(lambda self: self.S)

    @property
    def best_layer(self) -> int:
        """Layer where editing works best: highest S; ties by ES, then EM, then the lower
        layer."""
        def key(i: int) -> tuple[float, float, float, int]:
            score = -1.0 if math.isnan(self.S[i]) else self.S[i]
            return (score, self.ES[i], self.EM[i], -i)

        return self.layers[max(range(len(self.layers)), key=key)]

    @property
    def agree(self) -> bool | None:
        """Whether the traced layer is the sweep's best layer (``None`` without a trace)."""
        return None if self.traced_layer is None else self.traced_layer == self.best_layer

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN as ``null``), with ``best_layer`` and ``agree``."""
        d = {k: ([None if isinstance(x, float) and math.isnan(x) else x for x in v]
                 if isinstance(v, list) else v)
             for k, v in dataclasses.asdict(self).items()}
        d["best_layer"] = self.best_layer
        d["agree"] = self.agree
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        """Inverse of :meth:`to_dict`; also reads sweeps saved with the earlier names."""
        names = {f.name for f in dataclasses.fields(cls)}
        nan = float("nan")
        data = {_OLD_NAMES.get(k, k): v for k, v in data.items()}
        return cls(**{k: ([nan if x is None else x for x in v]
                          if isinstance(v, list) and k != "layers" else v)
                      for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(present)) if present else float("nan")


def _method_class(method: str | type) -> type:
    if isinstance(method, str):
        from editkit.registry import get_method

        return get_method(method)
    return method


def layer_sweep(method: str | type, model: nn.Module, tokenizer: TokenizerLike, records: Iterable[Any],
                layers: Sequence[int] | None = None, *, hparams=None,
                trace_curve: Sequence[float] | None = None, trace: bool = True,
                n: int | None = None, progress: bool = True, **trace_kwargs: Any
                ) -> SweepResult:
    """Edit every record at each of ``layers`` with ``method`` and measure success.

    ``method``: a registered method name (``"rome"``, ``"ft"``) or an ``Editor`` subclass
    whose hyperparameters have a ``layer`` field; ``hparams`` (default: the method's defaults
    for this model) is copied with ``layer=l`` for each candidate l. Each record is edited on
    its own (``with editor.applied(request)``, scored with
    :func:`editkit.eval.edit_success`), so the model is unchanged at the
    end. ``layers`` defaults to every layer. The traced curve (``trace_curve``, or computed
    with :func:`suggest_layer` and ``trace_kwargs`` if ``trace``) is reported beside the sweep
    with their correlation.
    """
    from editkit.registry import get_adapter

    cls = _method_class(method)
    adapter = get_adapter(model)
    requests = as_trace_requests(records)
    if n is not None:
        requests = requests[:n]
    if not requests:
        raise InvalidRequestError("layer_sweep needs at least one record")
    for r in requests:
        if r.target_true is None:
            raise InvalidRequestError(
                f"record {r.case_id!r} ({r.text!r}) has no target_true; the sweep compares "
                "P(target_new) with P(target_true), so every record needs both"
            )
    n_layers = adapter.num_layers(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        adapter.check_layer(model, layer, "layers")
    if hparams is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hparams = cls.hparams_class.for_model(model, adapter)
        logger.info("layer_sweep: %s defaults for this model: %s", cls.__name__,
                    hparams.to_dict())
    if "layer" not in {f.name for f in dataclasses.fields(hparams)}:
        raise InvalidHyperParamsError(
            f"{type(hparams).__name__} has no 'layer' field, so layer_sweep cannot move "
            f"{cls.__name__}'s edit; sweep a single-layer method such as 'rome' or 'ft'"
        )

    traced_layer = None
    if trace_curve is None and trace:
        traced_layer, curve = suggest_layer(model, tokenizer, requests, progress=progress,
                                            **trace_kwargs)
        trace_curve = curve.tolist()
    elif trace_curve is not None:
        trace_curve = [float(x) for x in trace_curve]
        if len(trace_curve) != n_layers:
            raise InvalidRequestError(
                f"trace_curve has {len(trace_curve)} values but the model has {n_layers} "
                "layers; pass the curve returned by suggest_layer"
            )
        traced_layer = int(np.argmax(trace_curve))

    metrics: dict[str, list[float]] = {k: [] for k in SWEEP_METRICS}
    bar = tqdm(total=len(layers) * len(requests), desc=f"{cls.__name__} layer sweep",
               disable=not progress)
    for layer in layers:
        editor = cls(model, tokenizer, hparams=dataclasses.replace(hparams, layer=layer),
                     adapter=adapter)
        per_record = []
        for request in requests:
            with editor.applied(request):
                per_record.append(edit_success(model, tokenizer, request))
            bar.update()
        for metric, values in metrics.items():
            values.append(_mean([m[metric] for m in per_record]))
    bar.close()

    swept_curve = None if trace_curve is None else [trace_curve[i] for i in layers]
    scores = [harmonic_mean(v) for v in zip(metrics["ES"], metrics["PS"], metrics["NS"],
                                            strict=True)]
    return SweepResult(
        method=getattr(cls, "name", cls.__name__), layers=layers, **metrics, S=scores,
        n_records=len(requests), trace_curve=swept_curve, traced_layer=traced_layer,
        correlation=None if swept_curve is None else _pearson(swept_curve, metrics["ES"]),
        correlation_magnitude=None if swept_curve is None else _pearson(swept_curve,
                                                                        metrics["EM"]),
        correlation_score=None if swept_curve is None else _pearson(swept_curve, scores),
    )
