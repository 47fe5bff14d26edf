"""Cost of what ``editkit.nethooks.Trace`` does for the issue-17 families, on a family that
needs neither: keeping a *copy* of each retained output (Falcon adds the attention output into
the MLP output in place) and the parent pre-hook that views flattened MLP rows as tokens (OPT).

    python benchmarks/bench_hook_overhead.py [--reps 5] [--samples 10]

Causal tracing of one fact-world prompt (all kinds) with the current hook and with the plain
hook it replaced (no copy, no parent hook), interleaved in this one run; prints the medians
and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from editkit import nethooks
from editkit.nethooks import Trace, hidden_of, with_hidden


def plain_hook(self: Trace, name: str):
    """The hook before the change: outputs kept by reference, rows never viewed as tokens."""
    def hook(module, args, kwargs, output):
        if self._retain_input:
            x = args[0] if args else next(iter(kwargs.values()))
            self.inputs[name] = self._keep(x)
        if self._edit is not None:
            output = with_hidden(output, self._edit(name, hidden_of(output)))
        if self._retain_output:
            self.outputs[name] = self._keep(hidden_of(output))
        self._remaining.discard(name)
        if self._stop and not self._remaining:
            raise nethooks.StopForward
        return output
    return hook


def plain_install(self: Trace) -> None:
    self._remaining = set(self.names)
    for name in self.names:
        module = self._model.get_submodule(name)
        self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editkit.testbed import load_fact_world
    from editkit.tracing import causal_trace

    model, tok = load_fact_world()
    hooks = {"current": (Trace._hook, Trace.install), "plain": (plain_hook, plain_install)}

    def run(which: str) -> float:
        Trace._hook, Trace.install = hooks[which]
        try:
            start = time.perf_counter()
            causal_trace(model, tok, "{} is located in the city of", "The Eiffel Tower",
                         samples=args.samples, noise_std=0.5)
            return time.perf_counter() - start
        finally:
            Trace._hook, Trace.install = hooks["current"]

    times: dict[str, list[float]] = {k: [] for k in hooks}
    run("current"), run("plain")  # warm-up
    for _ in range(args.reps):
        for which in ("plain", "current"):
            times[which].append(run(which))
    cur, plain = (statistics.median(times[k]) for k in ("current", "plain"))
    print(f"causal_trace, fact world, {args.samples} samples, all kinds, median of {args.reps}: "
          f"plain hook {plain:.3f} s, current hook {cur:.3f} s, ratio current/plain "
          f"{cur / plain:.3f}")


if __name__ == "__main__":
    main()
