"""Patches and hypernetworks are files from strangers: every tampering is refused with a typed
error, the model untouched; ``apply_to`` and ``revert`` are all or nothing; a saved patch
goes back onto a model through its history (``apply_patch``, ``editkit apply``) and reverts
exactly.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from badinput import Bad, assert_refused, run_cli
from conftest import snapshot, state_equal, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import editkit
from editkit import (
    Dense,
    EditFailedError,
    EditRequest,
    HistoryError,
    LowRank,
    Patch,
    PatchMismatchError,
    apply_patch,
    load_patch,
    revert,
)
from editkit.errors import HypernetworkMismatchError
from editkit.patch import tensors_digest

MLP0 = "transformer.h.0.mlp.c_proj.weight"
ATTN1 = "transformer.h.1.attn.c_proj.weight"
REQUEST = EditRequest("{} plays the sport of", "LeBron James", "football")


def make_patch(model, seed: int = 0, names: tuple[str, ...] = (MLP0, ATTN1)) -> Patch:
    """A two-delta patch (low-rank, then dense) stamped with ``model``'s current weights."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    deltas: dict[str, Any] = {}
    for i, name in enumerate(names):
        rows, cols = params[name].shape
        deltas[name] = (LowRank(torch.randn(rows, 2, generator=g) * 0.01,
                                torch.randn(cols, 2, generator=g)) if i % 2 == 0
                        else Dense(torch.randn(rows, cols, generator=g) * 0.01))
    return Patch.for_edit(model, deltas, method="test", requests=[REQUEST])


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["editkit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return header, tensors


def rewrite(path: Path, header: Any = None, tensors: dict | None = None, *, raw: str | None = None,
            redigest: bool = False) -> Path:
    """Write ``path`` again with another header and/or tensors (``redigest``: a tamperer who
    also recomputes the digest, so that the schema checks behind it are reached)."""
    old_header, old_tensors = read_file(path)
    header = old_header if header is None else header
    tensors = old_tensors if tensors is None else tensors
    if redigest:
        header["digest"] = tensors_digest(tensors)
    text = raw if raw is not None else json.dumps(header)
    save_file(tensors, str(path), metadata={"editkit": text})
    return path


@dataclass
class Ctx:
    model: Any
    path: Path
    tmp: Path
    other: Any  # same architecture, other weights
    llama: Any  # another architecture

    @property
    def header(self) -> dict[str, Any]:
        return read_file(self.path)[0]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return read_file(self.path)[1]

    def edit_header(self, change, redigest: bool = False) -> Path:
        header = self.header
        change(header)
        return rewrite(self.path, header, redigest=redigest)

    def edit_tensors(self, change) -> Path:
        tensors = self.tensors
        change(tensors)
        return rewrite(self.path, tensors=tensors, redigest=True)


@pytest.fixture
def ctx(tmp_path, bytelevel_tokenizer) -> Ctx:
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    path = make_patch(model).save(tmp_path / "edit.safetensors")
    return Ctx(model, path, tmp_path, tiny_model("gpt2", len(bytelevel_tokenizer), seed=7),
               tiny_model("llama", len(bytelevel_tokenizer)))


def _deep(levels: int) -> dict:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"x": value}
    return value


def _flip_byte(c: Ctx) -> Path:
    data = bytearray(c.path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes; the header is untouched
    c.path.write_bytes(bytes(data))
    return c.path


def _no_editkit_metadata(c: Ctx) -> Path:
    save_file(c.tensors, str(c.path), metadata={"other": "1"})
    return c.path


def _set(key_path: tuple[str, ...], value: Any):
    def change(header: dict) -> None:
        target = header
        for key in key_path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[key_path[-1]]
        else:
            target[key_path[-1]] = value
    return change


_DELETE = object()


def _legacy(header: dict) -> None:
    header["format_version"] = 1
    del header["digest"]


def _swap(key: str, make):
    def change(tensors: dict) -> None:
        tensors[key] = make(tensors[key])
    return change


def _add_tensor(tensors: dict) -> None:
    tensors["transformer.h.2.mlp.c_proj.weight::dense"] = torch.zeros(4, 4)


def _drop_tensor(tensors: dict) -> None:
    del tensors[f"{MLP0}::v"]


def _bad_rank(tensors: dict) -> None:
    tensors[f"{MLP0}::v"] = torch.zeros(tensors[f"{MLP0}::v"].shape[0], 3)


def _nan(tensors: dict) -> None:
    t = tensors[f"{ATTN1}::dense"].clone()
    t[0, 0] = float("nan")
    tensors[f"{ATTN1}::dense"] = t


def _apply_in_memory_without_fingerprint(c: Ctx) -> Any:
    patch = load_patch(c.path)
    patch.metadata.pop("base_fingerprint")
    return apply_patch(c.model, patch)


def _apply_on_other_base(c: Ctx) -> Any:
    return apply_patch(c.other, c.path)


def _apply_on_llama(c: Ctx) -> Any:
    return apply_patch(c.llama, c.path)


def _apply_bad_request(c: Ctx) -> Any:
    patch = load_patch(c.path)
    patch.metadata["requests"] = [{"prompt": "{} is", "subject": "X"}]
    return apply_patch(c.model, patch)


PATCH_CASES = [
    # malformed header
    Bad("header-not-json", lambda c: load_patch(rewrite(c.path, raw="{not json")),
        PatchMismatchError, ("not valid JSON", "original patch file")),
    Bad("header-not-object", lambda c: load_patch(rewrite(c.path, raw="[1, 2]")),
        PatchMismatchError, ("JSON object", "list")),
    Bad("header-recursion", lambda c: load_patch(rewrite(c.path, raw="[" * 100_000 + "]" * 100_000)),
        PatchMismatchError, ("nested too deeply", "original patch file")),
    Bad("header-deep-metadata",
        lambda c: load_patch(c.edit_header(_set(("metadata", "notes"), _deep(100))))
        , PatchMismatchError, ("deeper than 32", "original patch file")),
    # versions
    Bad("format-999", lambda c: load_patch(c.edit_header(_set(("format_version",), 999))),
        PatchMismatchError, ("format_version 999", "reads format 2", "upgrade")),
    Bad("format-string", lambda c: load_patch(c.edit_header(_set(("format_version",), "2"))),
        PatchMismatchError, ("format_version must be an integer", "'2'")),
    Bad("format-bool", lambda c: load_patch(c.edit_header(_set(("format_version",), True))),
        PatchMismatchError, ("format_version must be an integer", "True")),
    Bad("format-1-without-force", lambda c: load_patch(c.edit_header(_legacy)),
        PatchMismatchError, ("format_version 1", "force=True", "save the patch again")),
    # schema
    Bad("kinds-missing", lambda c: load_patch(c.edit_header(_set(("kinds",), _DELETE))),
        PatchMismatchError, ("no 'kinds'", "original patch file")),
    Bad("kinds-list", lambda c: load_patch(c.edit_header(_set(("kinds",), [MLP0])))
        , PatchMismatchError, ("'kinds' must be a dict", "list")),
    Bad("kind-unknown", lambda c: load_patch(c.edit_header(_set(("kinds", MLP0), "sparse"))),
        PatchMismatchError, ("'sparse'", "lowrank")),
    Bad("metadata-string", lambda c: load_patch(c.edit_header(_set(("metadata",), "x"))),
        PatchMismatchError, ("'metadata' must be a dict", "str")),
    Bad("digest-missing", lambda c: load_patch(c.edit_header(_set(("digest",), _DELETE))),
        PatchMismatchError, ("no 'digest'", "original patch file")),
    Bad("digest-number", lambda c: load_patch(c.edit_header(_set(("digest",), 12))),
        PatchMismatchError, ("'digest' must be a str", "int")),
    Bad("method-number", lambda c: load_patch(c.edit_header(_set(("metadata", "method"), 3))),
        PatchMismatchError, ("metadata.method", "int")),
    Bad("requests-dict",
        lambda c: load_patch(c.edit_header(_set(("metadata", "requests"), {"a": 1}))),
        PatchMismatchError, ("metadata.requests must be a list", "dict")),
    Bad("requests-of-strings",
        lambda c: load_patch(c.edit_header(_set(("metadata", "requests"), ["x"]))),
        PatchMismatchError, ("metadata.requests must be a list of request objects",)),
    Bad("request-invalid", _apply_bad_request,
        PatchMismatchError, ("metadata.requests[0]", "original patch file")),
    # base fingerprint: the wrong-base guard cannot be removed silently
    Bad("fingerprint-deleted",
        lambda c: load_patch(c.edit_header(_set(("metadata", "base_fingerprint"), _DELETE))),
        PatchMismatchError, ("no base_fingerprint", "force=True")),
    Bad("fingerprint-partial",
        lambda c: load_patch(c.edit_header(_set(("metadata", "base_fingerprint", ATTN1),
                                                _DELETE))),
        PatchMismatchError, (ATTN1, "force=True")),
    Bad("fingerprint-list",
        lambda c: load_patch(c.edit_header(_set(("metadata", "base_fingerprint"), [1])))
        , PatchMismatchError, ("base_fingerprint must map", "[1]")),
    Bad("fingerprint-stray",
        lambda c: load_patch(c.edit_header(_set(("metadata", "base_fingerprint", "lm_head.x"),
                                                "abc"))),
        PatchMismatchError, ("lm_head.x", "no delta for")),
    Bad("fingerprint-missing-in-memory", _apply_in_memory_without_fingerprint,
        PatchMismatchError, ("no base fingerprint", "force=True")),
    # tensors
    Bad("tensor-byte-flipped", lambda c: load_patch(_flip_byte(c)),
        PatchMismatchError, ("digest", "modified or corrupted", "intact copy")),
    Bad("tensor-int32",
        lambda c: load_patch(c.edit_tensors(_swap(f"{ATTN1}::dense",
                                                  lambda t: t.to(torch.int32)))),
        PatchMismatchError, ("torch.int32", "floating-point")),
    Bad("tensor-bool",
        lambda c: load_patch(c.edit_tensors(_swap(f"{MLP0}::u", lambda t: t > 0))),
        PatchMismatchError, ("torch.bool", "floating-point")),
    Bad("tensor-unreferenced", lambda c: load_patch(c.edit_tensors(_add_tensor)),
        PatchMismatchError, ("does not list", "transformer.h.2.mlp.c_proj.weight::dense")),
    Bad("tensor-missing", lambda c: load_patch(c.edit_tensors(_drop_tensor)),
        PatchMismatchError, ("missing tensors", f"{MLP0}::v")),
    Bad("tensor-rank-mismatch", lambda c: load_patch(c.edit_tensors(_bad_rank)),
        PatchMismatchError, (MLP0, "(rows, r)")),
    Bad("tensor-nan", lambda c: load_patch(c.edit_tensors(_nan)),
        PatchMismatchError, (ATTN1, "NaN")),
    # not a patch at all
    Bad("file-junk", lambda c: load_patch(c.path.write_bytes(b"not a patch") and c.path),
        PatchMismatchError, ("not a readable safetensors patch", "edit.safetensors")),
    Bad("file-no-editkit-metadata", lambda c: load_patch(_no_editkit_metadata(c)),
        PatchMismatchError, ("no editkit metadata", "not an editkit patch")),
    Bad("file-missing", lambda c: load_patch(c.tmp / "nope.safetensors"),
        PatchMismatchError, ("no patch file", "nope.safetensors")),
    # the file is fine but the model is not its base
    Bad("apply-other-base", _apply_on_other_base,
        PatchMismatchError, ("fingerprint mismatch", "force=True")),
    Bad("apply-other-architecture", _apply_on_llama,
        PatchMismatchError, ("no parameter", "another architecture")),
    # revert arguments
    Bad("revert-unknown-id", lambda c: revert(c.model, 424242),
        HistoryError, ("424242", "applied ids")),
    Bad("revert-bad-argument", lambda c: revert(c.model, "last"),
        HistoryError, ("'last'", "AppliedEdit")),
    Bad("revert-nothing", lambda c: revert(c.model), HistoryError, ("nothing to revert",
                                                                    "no edit")),
]


#: Cases that need an edit in the history before the refused call.
APPLIED_FIRST = {"revert-unknown-id", "revert-bad-argument"}


@pytest.mark.parametrize("case", [c.param() for c in PATCH_CASES])
def test_tampered_patch_is_refused(case: Bad, ctx: Ctx):
    if case.id in APPLIED_FIRST:
        apply_patch(ctx.model, ctx.path)
    history = editkit.EditHistory.of(ctx.model)
    ids = [e.id for e in history.edits]
    assert_refused(case, ctx, models=[ctx.model, ctx.other, ctx.llama])
    assert [e.id for e in history.edits] == ids  # the history is untouched too
    for model in (ctx.other, ctx.llama):
        assert not editkit.EditHistory.of(model).edits


def test_the_table_is_large_and_distinct():
    assert len({c.id for c in PATCH_CASES + HYPERNET_CASES}) == len(PATCH_CASES + HYPERNET_CASES)
    assert len(PATCH_CASES + HYPERNET_CASES) >= 45


# ------------------------------------------------------------- hypernetworks
@pytest.fixture(scope="module")
def fact_world():
    from editkit.testbed import load_fact_world

    return load_fact_world(train_if_missing=False)


def _shipped_copy(method: str, tmp: Path) -> Path:
    from editkit.methods._learned.io import shipped_dir

    src = shipped_dir(method) / "fact_world"
    if not (src / "hypernet.json").is_file():
        pytest.skip(f"no {method} hypernetwork shipped")
    dst = tmp / method
    shutil.copytree(src, dst)
    return dst


def _edit_json(d: Path, change) -> Path:
    meta = json.loads((d / "hypernet.json").read_text())
    change(meta)
    (d / "hypernet.json").write_text(json.dumps(meta))
    return d


def _edit_state(d: Path, change) -> Path:
    """Change the tensors and recompute the digest, as a careful tamperer would."""
    with safe_open(str(d / "hypernet.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, str(d / "hypernet.safetensors"))
    return _edit_json(d, lambda m: m.__setitem__("tensors_digest", tensors_digest(state)))


def _hp(key: str, value: Any):
    return lambda m: m["hparams"].__setitem__(key, value)


def _load(method: str, change=None, state_change=None):
    def run(d: Path, model, tok) -> object:
        if change is not None:
            _edit_json(d, change)
        if state_change is not None:
            _edit_state(d, state_change)
        cls = editkit.get_method(method)
        return cls.load(d, model, tok)
    return run


def _policy_from_file(m: dict) -> None:
    m["hparams"]["check_fingerprint"] = False  # the file may not switch the guard off
    m["base"]["digest"] = "0" * 32


def _flip_hypernet_byte(d: Path, model, tok) -> object:
    data = bytearray((d / "hypernet.safetensors").read_bytes())
    data[-7] ^= 0x10
    (d / "hypernet.safetensors").write_bytes(bytes(data))
    return editkit.get_method("mend").load(d, model, tok)


def _first_float_to_int(state: dict) -> None:
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int64)


def _widen(state: dict) -> None:
    key = next(k for k in sorted(state) if k.endswith("up"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)


HYPERNET_CASES = [
    Bad("mend-rank-200000", _load("mend", _hp("rank", 200_000)),
        HypernetworkMismatchError, ("rank=200000", "between 1 and 640")),
    Bad("ke-rank-200000", _load("ke", _hp("rank", 200_000)),
        HypernetworkMismatchError, ("rank=200000", "between 1 and")),
    Bad("mend-n-blocks-tampered", _load("mend", _hp("n_blocks", 5)),
        HypernetworkMismatchError, ("does not fit the architecture", "missing tensors")),
    Bad("mend-n-blocks-200000", _load("mend", _hp("n_blocks", 200_000)),
        HypernetworkMismatchError, ("n_blocks=200000", "between 1 and 49")),
    Bad("ke-lstm-hidden-tampered", _load("ke", _hp("lstm_hidden", 4096)),
        HypernetworkMismatchError, ("should have shape", "retrain")),
    Bad("mend-tensor-reshaped", _load("mend", state_change=_widen),
        HypernetworkMismatchError, ("should have shape", "intact copy")),
    Bad("mend-policy-in-file", _load("mend", _policy_from_file),
        HypernetworkMismatchError, ("does not fit this model", "check_fingerprint=False")),
    Bad("mend-tensor-byte-flipped", _flip_hypernet_byte,
        HypernetworkMismatchError, ("tensors_digest", "modified or corrupted")),
    Bad("mend-digest-deleted", _load("mend", lambda m: m.pop("tensors_digest")),
        HypernetworkMismatchError, ("no tensors_digest", "retrain")),
    Bad("mend-integer-tensor", _load("mend", state_change=_first_float_to_int),
        HypernetworkMismatchError, ("torch.int64", "floating-point")),
    Bad("mend-format-999", _load("mend", lambda m: m.__setitem__("format_version", 999)),
        HypernetworkMismatchError, ("format 999", "upgrade editkit")),
    Bad("mend-format-string", _load("mend", lambda m: m.__setitem__("format_version", "2")),
        HypernetworkMismatchError, ("format_version must be a positive integer", "'2'")),
    Bad("mend-hparams-list", _load("mend", lambda m: m.__setitem__("hparams", [1])),
        HypernetworkMismatchError, ("'hparams' must be a dict", "list")),
    Bad("mend-base-string", _load("mend", lambda m: m.__setitem__("base", "x")),
        HypernetworkMismatchError, ("'base' must be a dict", "str")),
    Bad("mend-method-ke", _load("mend", lambda m: m.__setitem__("method", "ke")),
        HypernetworkMismatchError, ("'ke' hypernetwork", "train a mend")),
]


def _json_text(text: str):
    def run(d: Path, model, tok) -> object:
        (d / "hypernet.json").write_text(text)
        return editkit.get_method("mend").load(d, model, tok)
    return run


HYPERNET_CASES += [
    Bad("mend-json-malformed", _json_text("{oops"),
        HypernetworkMismatchError, ("readable hypernetwork", "JSONDecodeError")),
    Bad("mend-json-recursion", _json_text("[" * 100_000 + "]" * 100_000),
        HypernetworkMismatchError, ("readable hypernetwork", "RecursionError")),
    Bad("mend-json-list", _json_text("[1, 2]"),
        HypernetworkMismatchError, ("JSON object", "list")),
]


@pytest.mark.parametrize("case", [c.param() for c in HYPERNET_CASES])
def test_tampered_hypernetwork_is_refused(case: Bad, fact_world, tmp_path):
    model, tok = fact_world
    method = "ke" if case.id.startswith("ke-") else "mend"
    d = _shipped_copy(method, tmp_path)
    start = time.perf_counter()
    assert_refused(case, d, model, tok, models=[model])
    # Refused before allocating: a tampered size costs no memory and no time.
    assert time.perf_counter() - start < 10


def test_hypernetwork_policy_comes_from_the_caller(fact_world, tmp_path):
    from editkit.methods.mend import MEND

    model, tok = fact_world
    d = _edit_json(_shipped_copy("mend", tmp_path), _hp("check_fingerprint", False))
    assert MEND.load(d, model, tok).hparams.check_fingerprint is True
    # The caller may still choose to skip the check, explicitly.
    _edit_json(d, _policy_from_file)
    assert MEND.load(d, model, tok, check_fingerprint=False).hypernet is not None


def test_shipped_and_resaved_hypernetworks_verify(fact_world, tmp_path):
    from editkit.methods.mend import MEND

    model, tok = fact_world
    editor = MEND.load(_shipped_copy("mend", tmp_path), model, tok)
    out = editor.save_hypernet(tmp_path / "again")
    meta = json.loads((out / "hypernet.json").read_text())
    assert meta["format_version"] == 2 and len(meta["tensors_digest"]) == 64
    assert MEND.load(out, model, tok).hypernet is not None


# ------------------------------------------------------------ transactions
def _fail_on_write(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th weight write of a patch raise; returns the call counter."""
    import editkit.patch as patch_module

    real, calls = patch_module._write_parameter, [0]

    def flaky(param, value):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected failure while writing a weight")
        real(param, value)

    monkeypatch.setattr(patch_module, "_write_parameter", flaky)
    return calls


def test_apply_to_is_all_or_nothing(ctx: Ctx, monkeypatch):
    base = snapshot(ctx.model)
    patch = load_patch(ctx.path)
    calls = _fail_on_write(monkeypatch, 2)  # the first delta is written, the second fails
    with pytest.raises(EditFailedError, match="model is unchanged"):
        patch.apply_to(ctx.model)
    assert calls[0] == 2 and state_equal(ctx.model, base)
    monkeypatch.undo()
    _fail_on_write(monkeypatch, 2)
    with pytest.raises(EditFailedError):
        apply_patch(ctx.model, ctx.path)
    history = editkit.EditHistory.of(ctx.model)
    assert state_equal(ctx.model, base) and not history.edits and not history.originals


def test_apply_to_refuses_a_half_precision_overflow(ctx: Ctx):
    model = ctx.model.half()
    base = snapshot(model)
    patch = Patch.for_edit(model, {MLP0: Dense(torch.full(dict(model.named_parameters())[MLP0]
                                                          .shape, 1e5))}, method="test")
    with pytest.raises(EditFailedError, match="overflows"):
        patch.apply_to(model)
    assert state_equal(model, base)


def test_revert_is_all_or_nothing(ctx: Ctx, monkeypatch):
    model = ctx.model
    base = snapshot(model)
    edits = [apply_patch(model, make_patch(model, seed=s)) for s in range(3)]  # same params
    history = editkit.EditHistory.of(model)
    before, ids = snapshot(model), [e.id for e in history.edits]
    originals = {n: t.clone() for n, t in history.originals.items()}
    _fail_on_write(monkeypatch, 3)  # replaying the remaining edits fails midway
    with pytest.raises(EditFailedError, match="as they were before the revert"):
        revert(model, edits[0])
    assert state_equal(model, before)
    assert [e.id for e in history.edits] == ids
    assert all(torch.equal(history.originals[n], t) for n, t in originals.items())
    monkeypatch.undo()
    revert(model, "all")
    assert state_equal(model, base) and not history.originals


# --------------------------------------------------------------- round trips
def test_apply_patch_then_revert_restores_bit_for_bit(ctx: Ctx):
    base = snapshot(ctx.model)
    reference = copy.deepcopy(ctx.model)
    load_patch(ctx.path).apply_to(reference)
    edit = apply_patch(ctx.model, ctx.path)
    assert isinstance(edit, editkit.AppliedEdit) and edit.method == "test"
    assert edit.requests == [REQUEST]
    assert state_equal(ctx.model, snapshot(reference))  # the same numbers as apply_to
    revert(ctx.model, edit)
    assert state_equal(ctx.model, base)


def test_saved_patch_reverts_through_an_editor(ctx: Ctx, bytelevel_tokenizer):
    from editkit.methods.ft import FT, FTHyperParams

    base = snapshot(ctx.model)
    edit = apply_patch(ctx.model, ctx.path)
    editor = FT(ctx.model, bytelevel_tokenizer, FTHyperParams(layer=0))
    assert editor.history[-1] is edit
    editor.revert(edit)
    assert state_equal(ctx.model, base)


def test_force_reads_legacy_and_unguarded_patches(ctx: Ctx):
    base = snapshot(ctx.model)
    legacy = ctx.edit_header(_legacy)
    patch = load_patch(legacy, force=True)
    assert set(patch.deltas) == {MLP0, ATTN1}
    ctx.edit_header(_set(("metadata", "base_fingerprint"), _DELETE))
    edit = apply_patch(ctx.model, ctx.path, force=True)
    revert(ctx.model, edit)
    assert state_equal(ctx.model, base)


def test_save_writes_format_2_with_a_digest(ctx: Ctx):
    header, tensors = read_file(ctx.path)
    assert header["format_version"] == 2
    assert header["digest"] == tensors_digest(tensors)


def test_cli_apply_writes_out_model(ctx: Ctx, bytelevel_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, out = tmp_path / "base", tmp_path / "edited"
    ctx.model.save_pretrained(model_dir)
    bytelevel_tokenizer.save_pretrained(model_dir)
    code, stdout, err = run_cli(["apply", "--model", str(model_dir), str(ctx.path),
                                 "--out-model", str(out)])
    assert code == 0, err
    assert "as edit" in stdout and "saved the edited model" in stdout
    edited = AutoModelForCausalLM.from_pretrained(out)
    reference = copy.deepcopy(ctx.model)
    load_patch(ctx.path).apply_to(reference)
    assert state_equal(edited, snapshot(reference))


@pytest.mark.parametrize("tamper, needle", [
    (lambda c: _flip_byte(c), "digest"),
    (lambda c: c.edit_header(_set(("format_version",), 999)), "format_version 999"),
    (lambda c: c.edit_header(_set(("metadata", "base_fingerprint"), _DELETE)), "--force"),
])
def test_cli_apply_refuses_tampered_patches(ctx: Ctx, bytelevel_tokenizer, tmp_path, tamper,
                                            needle):
    model_dir = tmp_path / "base"
    ctx.model.save_pretrained(model_dir)
    bytelevel_tokenizer.save_pretrained(model_dir)
    tamper(ctx)
    code, out, err = run_cli(["apply", "--model", str(model_dir), str(ctx.path),
                              "--out-model", str(tmp_path / "edited")])
    assert code in (1, 2) and "Traceback" not in out + err
    assert needle.lower() in err.lower()
    assert not (tmp_path / "edited").exists()


def test_cli_apply_refuses_an_out_model_that_is_a_file(ctx: Ctx, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, out, err = run_cli(["apply", "--model", "factworld", str(ctx.path), "--out-model",
                              str(target)])
    assert code in (1, 2) and "Traceback" not in out + err
    assert "existing file" in err and "file.txt" in err
