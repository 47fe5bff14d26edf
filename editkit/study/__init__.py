"""Studies that combine editing, tracing and evaluation (the layer above them).

- :mod:`editkit.study.localization`: "Does localization inform editing?" (Hase et al. 2023):
  per fact one causal trace and an edit at every layer for every method × objective, then
  how much of the variance in edit success the tracing effect explains beyond the layer
  (:mod:`editkit.study.regression`), with plots (:mod:`editkit.study.plots`).
"""

from __future__ import annotations

from editkit.study.localization import StudyConfig, analyse, load_results, run_localization
from editkit.study.regression import bootstrap_r2, fit_r2, r_squared

__all__ = ["StudyConfig", "analyse", "bootstrap_r2", "fit_r2", "load_results", "r_squared",
           "run_localization"]
