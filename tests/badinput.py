"""The bad-input harness: one assertion for every case of the hardening tables.

A case is refused well when it raises the expected ``EditkitError`` subclass, the message
names the bad value and the fix, and every parameter of every model involved is bit-for-bit
what it was. From the command line the same case must exit with the expected status, print
the message on stderr and never a traceback.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import editkit


@dataclass(frozen=True)
class Bad:
    """One bad input: what to run, the error it must raise, the words its message must hold."""

    id: str
    run: Callable[..., object]
    error: type[editkit.EditkitError] = editkit.EditkitError
    mentions: tuple[str, ...] = ()

    def param(self):
        return pytest.param(self, id=self.id)


def snapshot(*models: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{n: p.detach().clone() for n, p in m.state_dict(keep_vars=False).items()}
            for m in models]


def assert_unchanged(models: Sequence[torch.nn.Module], before: list[dict[str, torch.Tensor]]):
    for model, state in zip(models, before, strict=True):
        now = model.state_dict()
        assert now.keys() == state.keys()
        changed = [n for n, t in now.items() if not torch.equal(t, state[n])]
        assert not changed, f"parameters changed by a refused input: {changed[:5]}"


def assert_refused(case: Bad, *args, models: Sequence[torch.nn.Module] = ()) -> str:
    """Run ``case.run(*args)``; check the error type, its message and the models. Returns
    the message."""
    before = snapshot(*models)
    with pytest.raises(editkit.EditkitError) as info:
        case.run(*args)
    message = str(info.value)
    assert isinstance(info.value, case.error), (
        f"{case.id}: expected {case.error.__name__}, got {type(info.value).__name__}: {message}")
    for needle in case.mentions:
        assert needle.lower() in message.lower(), f"{case.id}: {needle!r} not in {message!r}"
    assert_unchanged(models, before)
    return message


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """``editkit argv`` in-process: (exit status, stdout, stderr); ``SystemExit`` included."""
    from editkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(code or 0), out.getvalue(), err.getvalue()


def assert_cli_refused(argv: Sequence[str], *, status: int, mentions: Sequence[str] = ()) -> str:
    """The CLI refuses ``argv`` with ``status``, a message on stderr naming ``mentions``,
    and no traceback anywhere."""
    code, out, err = run_cli(argv)
    assert "Traceback" not in out + err, err
    assert code == status, f"exit {code}, expected {status}; stderr: {err}"
    assert err.strip(), "the error must be printed on stderr"
    for needle in mentions:
        assert needle.lower() in err.lower(), f"{needle!r} not in {err!r}"
    return err
