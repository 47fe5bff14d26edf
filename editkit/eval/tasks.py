"""The registry of evaluation tasks: a task name → how to load its records and score them.

Built in: ``counterfact`` and ``zsre`` (:func:`editkit.eval.evaluate`, the CounterFact / zsRE
metrics), ``mquake`` (:func:`editkit.eval.multihop.evaluate_multihop`) and ``portability``
(:func:`editkit.eval.multihop.evaluate_portability`). Third parties add a task with an entry
point in the group ``editkit.eval_tasks`` (``name = "package.module:TASK"``, a :class:`Task`)
or with ``TASKS.register(name, task)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from editkit.errors import EditkitError
from editkit.registry import Registry

__all__ = ["TASKS", "Task", "UnknownTaskError", "get_task", "list_tasks"]


class UnknownTaskError(EditkitError, KeyError):
    """No evaluation task is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Task:
    """An evaluation task.

    Attributes:
        name: The registered name.
        description: One line for listings.
        load: ``load(source, n=None, **kwargs) -> records``.
        evaluate: ``evaluate(method_or_editor, model, tokenizer, records, **kwargs) -> report``
            (a report with ``to_markdown()`` and ``to_json(path)``).
        metric_kind: The dataset kind of its metrics in :data:`editkit.eval.METRICS`.
    """

    name: str
    description: str
    load: Callable[..., list[Any]]
    evaluate: Callable[..., Any]
    metric_kind: str

    def metrics(self) -> list[str]:
        """The registered metrics of this task's kind."""
        from editkit.eval.metrics import list_metrics

        return list_metrics(self.metric_kind)


TASKS: Registry[Task] = Registry(
    "evaluation task",
    "editkit.eval_tasks",
    lambda obj: isinstance(obj, Task),
    UnknownTaskError,
    'Register a task with an entry point in group "editkit.eval_tasks" '
    '(name = "package.module:TASK", an editkit.eval.tasks.Task) or '
    "editkit.eval.tasks.TASKS.register(name, task).",
)


def _load_counterfact(source: Any, n: int | None = None, **kwargs: Any) -> list[Any]:
    from editkit.eval.datasets import load_counterfact

    return load_counterfact(source, n, **kwargs)


def _load_zsre(source: Any, n: int | None = None, **kwargs: Any) -> list[Any]:
    from editkit.eval.datasets import load_zsre

    return load_zsre(source, n, **kwargs)


def _evaluate(*args: Any, **kwargs: Any) -> Any:
    from editkit.eval.runner import evaluate

    return evaluate(*args, **kwargs)


def _load_mquake(source: Any, n: int | None = None, **kwargs: Any) -> list[Any]:
    from editkit.eval.multihop import load_mquake

    return load_mquake(source, n, **kwargs)


def _evaluate_multihop(*args: Any, **kwargs: Any) -> Any:
    from editkit.eval.multihop import evaluate_multihop

    return evaluate_multihop(*args, **kwargs)


def _load_portability(source: Any, n: int | None = None, **kwargs: Any) -> list[Any]:
    from editkit.eval.multihop import load_portability

    return load_portability(source, n, **kwargs)


def _evaluate_portability(*args: Any, **kwargs: Any) -> Any:
    from editkit.eval.multihop import evaluate_portability

    return evaluate_portability(*args, **kwargs)


_BUILTINS = (
    Task("counterfact", "CounterFact (Meng et al. 2022): ES/PS/NS, GE, RS",
         _load_counterfact, _evaluate, "counterfact"),
    Task("zsre", "zsRE (MEND split): token accuracy of efficacy, paraphrase, specificity",
         _load_zsre, _evaluate, "zsre"),
    Task("mquake", "MQuAKE (Zhong et al. 2023): edit-wise, multi-hop and hop-wise accuracy",
         _load_mquake, _evaluate_multihop, "mquake"),
    Task("portability", "KnowEdit / EasyEdit portability, reliability and locality",
         _load_portability, _evaluate_portability, "portability"),
)
# Registered here, not through editkit's own entry points (plugins use the
# ``editkit.eval_tasks`` group); built-ins win over a plugin that reuses their name.
for _t in _BUILTINS:
    TASKS.register(_t.name, _t, override=_t.name in TASKS)


def get_task(name: str) -> Task:
    """The registered :class:`Task` called ``name`` (:class:`UnknownTaskError` if none)."""
    return TASKS.get(name)


def list_tasks() -> list[str]:
    """Registered task names."""
    return TASKS.names()
