"""Second-moment statistics of MLP keys, computed once per model and cached on disk.

ROME's closed-form update (Meng et al. 2022, eq. 2) and MEMIT's (Meng et al. 2023, eq. 11)
need the uncentred second moment

    C = E[k kᵀ]   over every (non-padding) token position of generic text,

where ``k`` is the input of the edited matrix (the adapter's ``mlp_out`` slot: the MLP hidden
activation after the nonlinearity). :func:`second_moment` computes ``C`` for several layers in
**one** forward pass per batch, ending each forward right after the deepest needed layer, and
accumulates ``Σ k kᵀ`` and the token count in float64.

Text sources (``texts=``):

- an iterable of strings (the first ``n_samples`` are used);
- a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON
  object per line with a ``"text"`` field, or a JSON string per line);
- a ``datasets.Dataset`` (its ``"text"`` column);
- a named source: ``"wikitext"`` (``wikitext-103-raw-v1`` from the Hugging Face hub, needs
  ``datasets`` and a network or a warm ``datasets`` cache; the default), ``"pydoc"`` (the
  Python documentation shipped with CPython in ``pydoc_data``, always available offline),
  ``"generated"`` (text sampled from the model itself, seeded and cached; needs no data at
  all, see :func:`generate_texts`) or any other name in :data:`editkit.registry.TEXT_SOURCES`,
  e.g. ``"fact_world"`` (the corpus of the fact world, which :mod:`editkit.testbed` registers
  under the ``editkit.text_sources`` entry point).

Results are cached as safetensors (tensor + JSON header with a checksum) under
``$EDITKIT_CACHE/stats`` (default ``~/.cache/editkit/stats``), keyed by a hash of (model
weights fingerprint, layer, text-source identity, tokenizer, ``n_samples``, ``max_length``,
``dtype``). Writes are atomic; a truncated or corrupted cache file is detected and recomputed;
partial sums are checkpointed every ``checkpoint_every`` batches so an interrupted run resumes
where it stopped. With an initialised ``torch.distributed`` process group every rank reads
every ``world_size``-th text and the sums are all-reduced (``torchrun --nproc_per_node k``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from editkit.cache import default_cache_dir, sweep_stale_once
from editkit.errors import DatasetFormatError, StatsError
from editkit.jsonio import iter_jsonl
from editkit.models import compat
from editkit.nethooks import Trace
from editkit.registry import TEXT_SOURCES, get_adapter
from editkit.tokens import context_length, pad_id, right_pad

logger = logging.getLogger(__name__)

__all__ = [
    "NAMED_SOURCES",
    "TextSource",
    "default_cache_dir",
    "export_statistics",
    "generate_texts",
    "is_exported_statistics",
    "load_statistics",
    "model_fingerprint",
    "second_moment",
    "text_source",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]

#: Bumped when the cache file layout or the meaning of a cached value changes.
CACHE_FORMAT = 1
#: Named text sources this module registers; others (``"fact_world"``) come from their owners
#: through :data:`editkit.registry.TEXT_SOURCES`.
NAMED_SOURCES = ("wikitext", "pydoc", "generated")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_HASH_SAMPLE = 1 << 16  # elements hashed per non-key parameter (evenly strided)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -------------------------------------------------------------------- text sources
@dataclass
class TextSource:
    """Where statistics texts come from: a stable ``identity`` and a lazy iterator."""

    identity: str
    description: str
    factory: Callable[[], Iterable[Any]]
    #: How many texts the source holds, when known up front (progress bars show the real
    #: total); ``None`` for streams such as files and hub datasets.
    size: int | None = None

    def texts(self, limit: int) -> Iterator[str]:
        """The first ``limit`` non-empty texts of the source."""
        it = (t for t in map(_as_text, self.factory()) if t.strip())
        return itertools.islice(it, limit)


def _as_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("text"), str):
        return item["text"]
    raise StatsError(
        f"a statistics text must be a string or a mapping with a 'text' string, got "
        f"{type(item).__name__} {str(item)[:80]!r}; pass texts=[str, ...] or a dataset with a "
        "'text' column"
    )


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _read_txt(path: Path) -> Iterator[str]:
    yield from _paragraphs(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> Iterator[str]:
    try:
        for obj in iter_jsonl(path, hint="a .jsonl text source needs one JSON object with a "
                                         "'text' field per line"):
            yield _as_text(obj)
    except DatasetFormatError as exc:  # a corpus is not a dataset: keep the statistics' error
        raise StatsError(str(exc)) from exc


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [p for key in sorted(topics) for p in _paragraphs(topics[key])]


#: Openings of the ``"generated"`` source's samples: varied, content-free starts of English
#: sentences, so the samples cover prose of many kinds rather than one topic.
GENERATION_OPENINGS = ("The", "In", "A", "It", "When", "This", "One", "There", "After", "Many",
                       "On", "He", "She", "We", "Some", "If")


def _generator_identity(model: nn.Module) -> str:
    """Which model the ``"generated"`` texts come from: its configuration and its input
    embeddings. Deliberately blind to edits of the blocks, so that editing a model (which
    changes its samples only marginally) does not resample its texts and recompute its
    statistics after every edit."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    _tensor_digest(h, "embedding", model.get_input_embeddings().weight, full=False)
    return h.hexdigest()[:32]


def generate_texts(model: nn.Module, tokenizer: Any, n_texts: int, *, length: int = 128,
                   seed: int = 0, batch_size: int = 16, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> list[str]:
    """``n_texts`` texts of up to ``length`` new tokens sampled from ``model`` itself.

    A statistics source that needs no corpus: pure ancestral sampling (temperature 1, no
    top-k/top-p truncation) from each of :data:`GENERATION_OPENINGS` in turn, so the keys
    follow the model's own distribution of text. Seeded and cached as JSON under
    ``<cache>/generated_texts`` keyed by the model's configuration and input embeddings
    (:func:`_generator_identity`), the tokenizer and the settings.
    """
    key = _sha(["generated", _generator_identity(model), tokenizer_fingerprint(tokenizer),
                n_texts, length, seed])[:24]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "generated_texts"
    sweep_stale_once(root)
    path = root / f"{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(cached, list) and len(cached) == n_texts:
                return [str(t) for t in cached]
        except (OSError, ValueError):
            logger.warning("generated-text cache %s is unreadable; sampling again", path)
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[str] = []
    bar = tqdm(total=n_texts, desc="sampling texts", unit="text", disable=not progress)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        batch_index = 0
        while len(out) < n_texts:
            opening = GENERATION_OPENINGS[batch_index % len(GENERATION_OPENINGS)]
            rows = min(batch_size, n_texts - len(out))
            ids = torch.tensor([tokenizer(opening)["input_ids"]] * rows, device=device)
            with torch.no_grad():
                sampled = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                    pad_token_id=eos if eos is not None else pad_id(tokenizer),
                )
            for row in sampled:
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append(text)
            bar.update(rows)
            batch_index += 1
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return out


def _wikitext_texts() -> Iterable[Any]:
    how = ("pass local text instead: texts=['...', ...], texts='corpus.txt' (documents "
           "separated by blank lines) or texts='corpus.jsonl' (a 'text' field per line), or "
           "the offline source texts='pydoc'")
    try:
        import datasets
    except ImportError as exc:
        raise StatsError(
            f"the default statistics source wikitext-103-raw-v1 needs the 'datasets' package "
            f"(pip install datasets) and network access; {how}"
        ) from exc
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    except Exception as exc:  # offline, hub error, cache miss with HF_DATASETS_OFFLINE=1
        raise StatsError(
            f"could not load wikitext-103-raw-v1 from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); {how}"
        ) from exc
    return ds


def text_source(texts: Any, n_samples: int, *, model: nn.Module | None = None,
                tokenizer: Any = None, generated_length: int = 128) -> TextSource:
    """Resolve ``texts`` (see the module docstring) into a :class:`TextSource`.

    ``model`` and ``tokenizer`` are needed only by the ``"generated"`` source, which samples
    ``n_samples`` texts of ``generated_length`` tokens from the model.

    Plain iterables are materialised (their first ``n_samples`` items) so that their content
    can be hashed into the cache key; files are identified by path, size and mtime; datasets
    by their fingerprint; named sources by name.
    """
    if texts is None:
        texts = "wikitext"
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts).expanduser()
        if path.is_file():
            st = path.stat()
            ident = f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
            if path.suffix == ".jsonl":
                return TextSource(ident, str(path), lambda: _read_jsonl(path))
            return TextSource(ident, str(path), lambda: _read_txt(path))
        name = str(texts)
        if name not in TEXT_SOURCES:
            raise StatsError(
                f"texts={name!r} is neither an existing file nor a named source "
                f"{TEXT_SOURCES.names()}; pass a path to a .txt/.jsonl file, a list of strings or "
                "a datasets.Dataset, or register a source in editkit.TEXT_SOURCES"
            )
        source = TEXT_SOURCES.get(name)(n_samples=n_samples, model=model, tokenizer=tokenizer,
                                        generated_length=generated_length)
        if not isinstance(source, TextSource):
            raise StatsError(f"the text source {name!r} returned {type(source).__name__}, not a "
                             "TextSource; fix its factory")
        return source
    if hasattr(texts, "_fingerprint") and hasattr(texts, "column_names"):  # datasets.Dataset
        ds = texts
        if "text" not in ds.column_names:
            raise StatsError(f"the dataset has columns {ds.column_names} but no 'text' column; "
                             "rename the text column to 'text'")
        return TextSource(f"dataset:{ds._fingerprint}:{len(ds)}", "datasets.Dataset",
                          lambda: ds["text"] if len(ds) <= n_samples else
                          ds.select(range(n_samples))["text"])
    if isinstance(texts, Iterable):
        items = [_as_text(t) for t in itertools.islice(iter(texts), n_samples)]
        digest = hashlib.sha256()
        for t in items:
            digest.update(hashlib.sha256(t.encode("utf-8")).digest())
        return TextSource(f"texts:{len(items)}:{digest.hexdigest()[:24]}",
                          f"{len(items)} given texts", lambda: items, size=len(items))
    raise StatsError(
        f"texts must be an iterable of strings, a file path, a datasets.Dataset or one of "
        f"{TEXT_SOURCES.names()}; got {type(texts).__name__}"
    )


def _wikitext_source(**_: Any) -> TextSource:
    return TextSource("hub:wikitext/wikitext-103-raw-v1:train", "wikitext-103-raw-v1",
                      _wikitext_texts)


def _pydoc_source(**_: Any) -> TextSource:
    import sys

    ident = f"pydoc:{sys.version_info.major}.{sys.version_info.minor}:" + _sha(_pydoc_texts())[:16]
    return TextSource(ident, "Python documentation (pydoc_data)", _pydoc_texts)


def _generated_source(*, n_samples: int, model: nn.Module | None = None, tokenizer: Any = None,
                      generated_length: int = 128, **_: Any) -> TextSource:
    if model is None or tokenizer is None:
        raise StatsError("texts='generated' samples text from the model: pass model= "
                         "and tokenizer= to text_source")
    ident = _sha(["generated", _generator_identity(model), generated_length])[:24]
    return TextSource(f"generated:{ident}", "text sampled from the model",
                      lambda: generate_texts(model, tokenizer, n_samples,
                                             length=generated_length))


for _name, _factory in zip(NAMED_SOURCES, (_wikitext_source, _pydoc_source, _generated_source),
                           strict=True):
    if _name not in TEXT_SOURCES:  # idempotent if this module is reloaded
        TEXT_SOURCES.register(_name, _factory)


# ------------------------------------------------------------------- fingerprints
def _tensor_digest(h: Any, name: str, t: torch.Tensor, full: bool,
                   as_dtype: torch.dtype | None = None) -> None:
    t = t.detach()
    dtype = as_dtype if as_dtype is not None else t.dtype
    h.update(f"{name}|{dtype}|{tuple(t.shape)}|{'full' if full else 'strided'}".encode())
    flat = t.reshape(-1)
    if not full and flat.numel() > _HASH_SAMPLE:
        flat = flat[:: flat.numel() // _HASH_SAMPLE]
    flat = flat.to(dtype).contiguous().cpu()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module, adapter: Any, layer: int,
                      as_dtype: torch.dtype | None = None) -> str:
    """Content hash of the weights that determine the keys of ``layer``.

    The keys of layer ``l`` depend on the embeddings, blocks ``< l`` and block ``l`` up to its
    edited matrix, not on ``mlp_out`` of layer ``l`` itself (so editing that matrix — what ROME
    does — does not invalidate its statistics) nor on later blocks, the final norm or the
    head. The embedding and ``mlp_in`` of ``layer`` are hashed completely; every other
    relevant parameter by an evenly strided sample of at most 65 536 entries (a rank-one or
    dense change to a matrix alters nearly every entry), which keeps this cheap for large
    models while staying content based.

    ``as_dtype`` hashes the weights as a copy of the model cast to that dtype would have them
    (the cast rounds exactly as ``model.to(dtype)`` does), so statistics exported from a
    float32 model can recognise its bfloat16 / float16 copies.
    """
    prefix = adapter.layers + "."
    out_prefix = adapter.module_name("mlp_out", layer) + "."
    after = tuple(adapter.module_name(s) + "." for s in ("final_norm", "lm_head"))
    full = {adapter.weight_name("embedding"), adapter.weight_name("mlp_in", layer)}
    h = hashlib.sha256(f"{getattr(model.config, 'model_type', '?')}|{layer}".encode())
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            if index > layer or name.startswith(out_prefix):
                continue
        elif name.startswith(after):
            continue
        _tensor_digest(h, name, compat.parameter_value(model, name, p), full=name in full,
                       as_dtype=as_dtype if p.is_floating_point() else None)
    return h.hexdigest()[:32]


def weights_fingerprint(model: nn.Module) -> str:
    """Strided content hash of every parameter (cheap; changes with any real edit)."""
    h = hashlib.sha256(str(getattr(model.config, "model_type", "?")).encode())
    for name, p in model.named_parameters():
        _tensor_digest(h, name, compat.parameter_value(model, name, p), full=False)
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's class, size and its ids for a probe string."""
    probe = "The quick brown fox, 1234 — naïve café.\nNew line"
    ids = list(tokenizer(probe)["input_ids"])
    return _sha([type(tokenizer).__name__, len(tokenizer), ids])[:16]


# ------------------------------------------------------------------ safetensors IO
def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {**meta, "checksum": _checksum(tensors)}
        save_file(tensors, tmp, metadata={"editkit": json.dumps(meta, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _safe_load(path: Path, expect: Mapping[str, Any]
               ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors and header of ``path`` if it is intact and matches ``expect``; else ``None``.

    A file that cannot be parsed (truncated, corrupted), whose checksum does not match its
    tensors, or whose header disagrees with ``expect`` is deleted (it would fail again).
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["editkit"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("checksum") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        if any(meta.get(k) != v for k, v in expect.items()):
            raise ValueError("header does not match the requested statistics")
    except Exception as exc:  # any failure means the file cannot be trusted
        logger.warning("discarding unusable statistics file %s (%s); recomputing", path, exc)
        try:
            path.unlink()
        except OSError:
            pass
        return None
    return tensors, meta


# ------------------------------------------------------------------- distribution
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if _dist()[1] > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------- public API
def second_moment(
    model: nn.Module,
    layers: int | Sequence[int],
    texts: Any = None,
    *,
    tokenizer: Any = None,
    n_samples: int = 100_000,
    max_length: int | None = None,
    dtype: str = "float32",
    adapter: Any = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    checkpoint_every: int = 50,
    progress: bool = True,
    source: str | os.PathLike | None = None,
    sort_by_length: bool = True,
    batch_tokens: int | None = None,
) -> dict[int, torch.Tensor]:
    """``C = E[k kᵀ]`` of the edited matrix's input keys, for each layer in ``layers``.

    Args:
        model: A causal LM with a registered adapter.
        layers: One layer index or several; all are computed in one pass over the texts.
        texts: The text source (see the module docstring); default ``"wikitext"``.
        tokenizer: Tokenizer of ``model`` (required).
        n_samples: Number of texts (documents) to read.
        max_length: Tokens per text (longer texts are truncated); default
            ``min(context length, 1024)``.
        dtype: dtype of the returned matrices (each batch's ``Σ k kᵀ`` is computed in the
            activations' precision, at least float32; the sum over batches in float64).
        adapter: Defaults to the registered adapter of ``model``.
        batch_size: Texts per forward pass without ``sort_by_length``; with it, the length
            sort reads ``8 × batch_size`` texts at a time.
        cache_dir: Defaults to ``default_cache_dir() / "stats"``.
        use_cache: Read and write the on-disk cache (checkpoints included).
        checkpoint_every: Batches between checkpoints of the partial sums.
        progress: Show a tqdm bar with tokens/s.
        source: Exported statistics to load instead of computing them: a directory written
            by :func:`export_statistics` (``editkit stats --export``) or a hub repository id;
            see :func:`load_statistics`, which refuses them for another model or other
            ``n_samples``/``max_length``. ``texts`` naming such a directory (e.g. a method's
            ``mom2_dataset``) does the same.
        sort_by_length: Batch texts of similar length together (read ``8 × batch_size``
            texts, sort, cut into batches of at most ``batch_tokens`` padded tokens) instead
            of padding each run of ``batch_size`` texts; the same C up to float64 rounding,
            with far less padding. ``False`` for the plain loop.
        batch_tokens: Padded tokens per forward pass when sorting by length; default
            ``batch_size × max_length``, capped at ``BATCH_TOKENS`` when the model is on the
            CPU (small forwards are faster there: their activations stay in cache).

    Returns:
        ``{layer: C}`` with ``C`` of shape ``(d_key, d_key)`` on the CPU.

    Raises:
        InvalidHyperParamsError: a layer is out of range.
        StatsError: bad source, no tokenizer, no tokens, or the default hub source is
            unavailable (offline) — the message says how to pass local text.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise StatsError("layers is empty; pass one layer index or a list of them")
    for layer in layer_list:
        adapter.check_layer(model, layer, "layer")
    layer_list = sorted(set(layer_list))
    if dtype not in _DTYPES:
        raise StatsError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    for what, value in (("n_samples", n_samples), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every),
                        ("batch_tokens", 1 if batch_tokens is None else batch_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise StatsError(f"{what}={value!r} must be a positive integer")
    if tokenizer is None:
        raise StatsError("second_moment needs the model's tokenizer: pass tokenizer=...")
    ctx = context_length(model)
    if max_length is None:
        max_length = min(ctx or 1024, 1024)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise StatsError(f"max_length={max_length!r} must be a positive integer")
    if ctx is not None and max_length > ctx:
        # Longer texts would index past the position embedding; a shorter sample of generic
        # text is still a sample of it.
        logger.info("statistics texts clipped from max_length=%d to the model's context size "
                    "of %d tokens", max_length, ctx)
        max_length = ctx
    if source is None and is_exported_statistics(texts):
        source = texts
    if source is not None:  # shared statistics: loaded and checked, never recomputed
        return load_statistics(source, model, layer_list, tokenizer=tokenizer,
                               n_samples=n_samples, max_length=max_length, dtype=dtype,
                               adapter=adapter)

    source = text_source(texts, n_samples, model=model, tokenizer=tokenizer,
                         generated_length=min(max_length, 128))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    if use_cache:
        sweep_stale_once(root)
    model_type = str(getattr(model.config, "model_type", "model"))
    common = {
        "format": CACHE_FORMAT, "source": source.identity, "n_samples": n_samples,
        "max_length": max_length, "dtype": dtype, "tokenizer": tokenizer_fingerprint(tokenizer),
        "slot": "mlp_out.input",
    }
    # The weights' fingerprint keys the cache only (hashing a large embedding takes a while).
    keys = {layer: {**common, "layer": layer,
                    "model": model_fingerprint(model, adapter, layer) if use_cache else None}
            for layer in layer_list}
    paths = {layer: root / model_type / f"mom2_l{layer}_{_sha(key)[:24]}.safetensors"
             for layer, key in keys.items()}

    results: dict[int, torch.Tensor] = {}
    if use_cache:
        for layer in layer_list:
            loaded = _safe_load(paths[layer], {"key": keys[layer]})
            if loaded is not None:
                results[layer] = loaded[0]["mom2"].to(_DTYPES[dtype])
                logger.info("layer %d statistics loaded from %s", layer, paths[layer])
    # Every rank must agree on what is missing, or the all-reduce below would deadlock.
    have = torch.tensor([float(layer in results) for layer in layer_list], dtype=torch.float64,
                        device=next(model.parameters()).device)
    _all_reduce(have, torch.distributed.ReduceOp.MIN if _dist()[1] > 1 else None)
    missing = [layer for layer, h in zip(layer_list, have.tolist(), strict=True) if h < 1.0]
    if not missing:
        return results
    for layer in missing:
        results.pop(layer, None)

    run_key = _sha([keys[layer] for layer in missing] + [list(_dist())])[:24]
    ckpt = root / model_type / f"mom2_partial_{run_key}.safetensors" if use_cache else None
    if batch_tokens is None:  # small forwards on a CPU (cache), full batches on accelerators
        batch_tokens = batch_size * max_length
        if next(model.parameters()).device.type == "cpu":
            batch_tokens = min(batch_tokens, BATCH_TOKENS)
    sums, count = _accumulate(model, adapter, tokenizer, source, missing, n_samples, max_length,
                              batch_size, ckpt, checkpoint_every, progress, sort_by_length,
                              batch_tokens)
    device = next(model.parameters()).device
    count_t = _all_reduce(torch.tensor([float(count)], dtype=torch.float64, device=device))
    for layer in missing:
        sums[layer] = _all_reduce(sums[layer]).cpu()
    total = int(count_t.item())
    if total == 0:
        raise StatsError(f"no tokens were read from {source.description}; pass non-empty texts")
    rank, _ = _dist()
    for layer in missing:
        mom2 = sums[layer] / total
        results[layer] = mom2.to(_DTYPES[dtype])
        if use_cache and rank == 0:
            meta = {"key": keys[layer], "count": total, "source_description": source.description}
            _atomic_save({"mom2": mom2.to(_DTYPES[dtype])}, meta, paths[layer])
            logger.info("layer %d statistics (%d tokens) cached at %s", layer, total, paths[layer])
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return {layer: results[layer] for layer in layer_list}


#: Chunks of this many batches' worth of texts are sorted by length before batching.
LENGTH_WINDOW = 8
#: Default cap on the padded tokens of one statistics forward pass. Measured on one CPU
#: thread (SmolLM2, 256-token pydoc texts): 4,096-token batches took 1.8x the time of
#: 256-512-token ones, whose activations stay in cache (docs/performance.md).
BATCH_TOKENS = 512


def length_batches(ids: list[list[int]], token_budget: int) -> list[list[list[int]]]:
    """``ids`` sorted longest first and cut into batches whose padded size (texts × the
    batch's longest text) stays within ``token_budget``.

    Padding is work thrown away: a batch of 16 random paragraphs padded to the longest one
    runs mostly padding when lengths vary as much as documentation paragraphs do. The
    reference (``layer_stats``' ``length_collation``) sorts for the same reason. C is a sum
    over tokens, so the order changes it only by float64 rounding.
    """
    order = sorted(ids, key=len, reverse=True)
    groups: list[list[list[int]]] = []
    for seq in order:
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0]) <= token_budget:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def _accumulate(model: nn.Module, adapter: Any, tokenizer: Any, source: TextSource,
                layers: list[int], n_samples: int, max_length: int, batch_size: int,
                ckpt: Path | None, checkpoint_every: int, progress: bool,
                sort_by_length: bool, batch_tokens: int) -> tuple[dict[int, torch.Tensor], int]:
    """Local (this rank's) ``Σ k kᵀ`` per layer and token count, resuming from ``ckpt``."""
    rank, world = _dist()
    device = next(model.parameters()).device
    names = {layer: adapter.module_name("mlp_out", layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count, consumed = 0, 0
    expect = {"layers": layers, "rank": rank, "world": world}
    if ckpt is not None:
        loaded = _safe_load(ckpt, expect)
        if loaded is not None:
            tensors, meta = loaded
            sums = {layer: tensors[f"sum.{layer}"].to(device) for layer in layers}
            count, consumed = int(meta["count"]), int(meta["consumed"])
            logger.info("resuming statistics from checkpoint %s (%d texts done)", ckpt, consumed)

    pad = pad_id(tokenizer)
    window = LENGTH_WINDOW if sort_by_length else 1
    texts = itertools.islice(source.texts(n_samples), consumed, None)
    was_training = model.training
    model.eval()
    expected = n_samples if source.size is None else min(n_samples, source.size)
    bar = tqdm(total=expected, initial=consumed, disable=not progress, unit="text",
               desc=f"mom2 layers {layers}", mininterval=1.0)
    start, tokens_run, batches, saved_at = time.perf_counter(), 0, 0, 0
    partial: dict[int, torch.Tensor] = {}

    def flush(parts: dict[int, torch.Tensor]) -> None:
        for layer, part in parts.items():
            part = part.to(torch.float64)
            sums[layer] = sums[layer] + part if layer in sums else part
        parts.clear()

    try:
        while True:
            # Every rank reads the same global chunk and keeps every world-th text of it.
            chunk = list(itertools.islice(texts, batch_size * world * window))
            if not chunk:
                break
            index0 = consumed
            consumed += len(chunk)
            mine = [t for i, t in enumerate(chunk, index0) if i % world == rank]
            ids = [s for s in tokenizer(mine, truncation=True, max_length=max_length)["input_ids"]
                   if len(s) > 0] if mine else []
            groups = (length_batches(ids, batch_tokens) if sort_by_length
                      else [ids] if ids else [])
            for group in groups:
                batch = right_pad(group, pad, device)
                with torch.no_grad(), Trace(model, list(names.values()), retain_input=True,
                                            stop=True) as tr:
                    model(**batch.model_inputs(), use_cache=False)
                mask = batch.attention_mask.bool()
                for layer, name in names.items():
                    # Gram matrices in the activations' precision (at least float32; in
                    # float64 they took a fifth of the loop on SmolLM2), summed there over
                    # one chunk of texts, then in float64, where the rounding of a long run
                    # would add up.
                    k = tr.inputs[name][mask]
                    k = k if k.dtype == torch.float64 else k.float()
                    if layer in partial:
                        partial[layer].addmm_(k.T, k)
                    else:
                        partial[layer] = k.T @ k
                n = int(mask.sum())
                count += n
                tokens_run += n
                batches += 1
            flush(partial)  # per chunk: a resumed run repeats the same float32 sums
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens_run / max(time.perf_counter() - start, 1e-9):.0f}",
                            refresh=False)
            if ckpt is not None and batches - saved_at >= checkpoint_every and sums:
                saved_at = batches
                _atomic_save({f"sum.{layer}": s for layer, s in sums.items()},
                             {**expect, "count": count, "consumed": consumed}, ckpt)
        if consumed < n_samples:
            # The source had fewer texts than asked for: the bar ends at the real total (not
            # at 37 %), and the user learns the statistics rest on fewer texts.
            bar.total = consumed
            bar.refresh()
            logger.warning("the text source %s ran out after %d of the %d requested texts; "
                           "the statistics use those %d (pass a larger source for more)",
                           source.description, consumed, n_samples, consumed)
    finally:
        bar.close()
        model.train(was_training)
    if not sums:  # this rank read nothing; contribute zeros of the right size
        for layer in layers:
            d = adapter.module(model, "mlp_out", layer)
            d_in = _in_features(adapter, d)
            sums[layer] = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    return sums, count


def _in_features(adapter: Any, module: nn.Module) -> int:
    return int(adapter.kv_view(module.weight).shape[1])


# ------------------------------------------------------------ shareable statistics
#: The card (JSON) and tensor file names of an exported statistics directory.
STATS_CARD = "editkit_stats.json"
STATS_TENSORS = "mom2.safetensors"
#: Bumped when the exported layout or the meaning of a card field changes.
EXPORT_FORMAT = 1
#: The half-precision dtypes whose copies of a float32 model an exported card recognises.
_HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _tensor_sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _model_identity(model: nn.Module, adapter: Any) -> dict[str, Any]:
    """What an exported card records about the model, beside the per-layer fingerprints."""
    config = getattr(model, "config", None)
    d_key = _in_features(adapter, adapter.module(model, "mlp_out", 0))
    return {
        "model_type": str(getattr(config, "model_type", "?")),
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        # A hub snapshot's commit when the model came from the hub (transformers records it).
        "revision": getattr(config, "_commit_hash", None),
        "n_layers": int(adapter.num_layers(model)),
        "d_key": d_key,
        "weights_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def export_statistics(model: nn.Module, covariances: Mapping[int, torch.Tensor],
                      directory: str | os.PathLike, *, tokenizer: Any, texts: Any = None,
                      n_samples: int = 100_000, max_length: int | None = None,
                      adapter: Any = None) -> Path:
    """Write ``covariances`` (``{layer: C}``, as :func:`second_moment` returns them) to
    ``directory`` for others to reuse: ``mom2.safetensors`` (one tensor ``layer.<l>`` per
    layer) and the card ``editkit_stats.json``.

    The card records what the statistics are statistics *of*, so that a loader can refuse
    them for another model or other settings: the model's type, size, hub revision and, per
    layer, the fingerprint of the weights that shape that layer's keys
    (:func:`model_fingerprint`); the tokenizer's fingerprint; the text source, ``n_samples``,
    ``max_length`` and dtype; a SHA-256 of every tensor; the editkit version. ``texts``,
    ``n_samples`` and ``max_length`` are the settings the matrices were computed with.

    Returns the directory.
    """
    from editkit._version import __version__

    adapter = adapter if adapter is not None else get_adapter(model)
    if not covariances:
        raise StatsError("no statistics to export; pass {layer: C} as second_moment returns it")
    layers = sorted(int(x) for x in covariances)
    for layer in layers:
        adapter.check_layer(model, layer, "layer")
    identity = _model_identity(model, adapter)
    tensors = {f"layer.{layer}": covariances[layer].detach().contiguous().cpu()
               for layer in layers}
    for layer in layers:
        shape = tuple(tensors[f"layer.{layer}"].shape)
        if shape != (identity["d_key"], identity["d_key"]):
            raise StatsError(f"C of layer {layer} has shape {shape}; this model's keys have "
                             f"width {identity['d_key']}, so it is not this model's statistics")
    dtypes = {str(t.dtype).replace("torch.", "") for t in tensors.values()}
    ctx = context_length(model)
    if max_length is None:
        max_length = min(ctx or 1024, 1024)
    if ctx is not None:  # as second_moment clips it, so that the card says what was used
        max_length = min(max_length, ctx)
    source = text_source(texts, n_samples, model=model, tokenizer=tokenizer,
                         generated_length=min(max_length, 128))
    card = {
        "format": EXPORT_FORMAT,
        "editkit_version": __version__,
        "what": "C = E[k kᵀ] of the mlp_out input keys (ROME eq. 2, MEMIT eq. 11)",
        "model": {**identity,
                  "fingerprints": {str(x): model_fingerprint(model, adapter, x)
                                   for x in layers},
                  # What a bfloat16 / float16 copy of these weights hashes to, so that the
                  # statistics of a float32 model serve its half-precision copies too.
                  "fingerprints_as": {
                      name: {str(x): model_fingerprint(model, adapter, x, as_dtype=dt)
                             for x in layers}
                      for name, dt in _HALF_DTYPES.items()
                      if identity["weights_dtype"] in ("float32", "float64")}},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "layers": layers,
        "text_source": {"identity": source.identity, "description": source.description},
        "n_samples": n_samples,
        "max_length": max_length,
        "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        "sha256": {key: _tensor_sha(t) for key, t in tensors.items()},
    }
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=STATS_TENSORS, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"editkit_stats": json.dumps({"format": EXPORT_FORMAT})})
        os.replace(tmp, out / STATS_TENSORS)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # The card last: a directory with a card holds complete tensors.
    fd, tmp = tempfile.mkstemp(dir=out, prefix=STATS_CARD, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=1, ensure_ascii=False)
    os.replace(tmp, out / STATS_CARD)
    return out


def is_exported_statistics(value: Any) -> bool:
    """Whether ``value`` is a path to a directory written by :func:`export_statistics`."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    path = Path(value).expanduser()
    return path.is_dir() and (path / STATS_CARD).is_file()


def _stats_directory(source: str | os.PathLike, revision: str | None) -> Path:
    """A local export directory, or a hub repository's snapshot (downloaded once)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / STATS_CARD).is_file():
            raise StatsError(f"{str(path)!r} holds no {STATS_CARD}; pass a directory written by "
                             "editkit stats --export DIR (or export_statistics)")
        return path
    repo = str(source)
    if repo.count("/") != 1 or path.exists():
        raise StatsError(f"statistics source {repo!r} is neither an export directory nor a hub "
                         "repository id (org/name); pass one written by editkit stats --export")
    from editkit.editor import _hub_offline, _hub_unreachable

    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise StatsError(f"loading statistics from the hub repository {repo!r} needs "
                         "huggingface_hub (pip install huggingface_hub)") from exc
    patterns = [STATS_CARD, STATS_TENSORS]
    try:  # a cached snapshot needs no network
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception as exc:
        local_error = exc
    why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set" if _hub_offline()
           else _hub_unreachable())
    if why is not None:
        raise StatsError(
            f"the statistics repository {repo!r} is not in the local hub cache and the hub "
            f"cannot be reached ({why}); download it where there is network "
            f"(huggingface-cli download {repo}) and pass its directory, or compute the "
            "statistics here with editkit stats") from local_error
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise StatsError(f"cannot download statistics from the hub repository {repo!r} "
                         f"({type(exc).__name__}: {exc}); check the id and your access") from exc


def load_statistics(source: str | os.PathLike, model: nn.Module,
                    layers: int | Sequence[int] | None = None, *, tokenizer: Any = None,
                    n_samples: int | None = None, max_length: int | None = None,
                    dtype: str | None = None, adapter: Any = None,
                    revision: str | None = None) -> dict[int, torch.Tensor]:
    """``{layer: C}`` from an export directory or hub repository (``org/name``) written by
    :func:`export_statistics`, after checking that its card matches ``model``.

    Refused with :class:`StatsError`: a card of another model (type, layer count, key width,
    or the fingerprint of the weights that shape a requested layer's keys), another
    tokenizer (when ``tokenizer`` is given), other settings (``n_samples`` / ``max_length``
    when given), a layer the export lacks, or tensors whose SHA-256 differs from the card's
    (a damaged or altered file). ``dtype`` converts the matrices (default: as stored).
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    root = _stats_directory(source, revision)
    where = str(source)
    try:
        card = json.loads((root / STATS_CARD).read_text(encoding="utf-8"))
        if not isinstance(card, dict):
            raise ValueError("the card is not a JSON object")
    except (OSError, ValueError) as exc:
        raise StatsError(f"the statistics card {str(root / STATS_CARD)!r} cannot be read "
                         f"({exc}); export the statistics again") from None
    if card.get("format") != EXPORT_FORMAT:
        raise StatsError(f"statistics at {where!r} have export format {card.get('format')!r}; "
                         f"this editkit reads format {EXPORT_FORMAT}; export them again")
    stored = [int(x) for x in card.get("layers", [])]
    wanted = stored if layers is None else (
        [layers] if isinstance(layers, int) else sorted(set(layers)))
    for layer in wanted:
        adapter.check_layer(model, layer, "layer")
    missing = [x for x in wanted if x not in stored]
    if missing:
        raise StatsError(f"statistics at {where!r} hold layers {stored}, not {missing}; export "
                         "them for those layers too (editkit stats --layers ... --export)")
    mine = _model_identity(model, adapter)
    theirs = card.get("model") or {}
    for key in ("model_type", "n_layers", "d_key"):
        if theirs.get(key) != mine[key]:
            raise StatsError(f"statistics at {where!r} are of another model: {key} "
                             f"{theirs.get(key)!r} in the card, {mine[key]!r} here; use "
                             "statistics exported from this model")
    as_mine = ((theirs.get("fingerprints_as") or {}).get(mine["weights_dtype"]) or {})
    for layer in wanted:
        fingerprint = model_fingerprint(model, adapter, layer)
        if fingerprint not in ((theirs.get("fingerprints") or {}).get(str(layer)),
                               as_mine.get(str(layer))):
            raise StatsError(
                f"statistics at {where!r} were computed on other weights: the fingerprint of "
                f"the weights that shape layer {layer}'s keys differs (another checkpoint, an "
                f"edited or fine-tuned model, or weights in {theirs.get('weights_dtype')} "
                f"rather than {mine['weights_dtype']}); use statistics exported from this "
                "model or compute them with editkit stats")
    if tokenizer is not None and card.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise StatsError(f"statistics at {where!r} were computed with another tokenizer; use "
                         "the model's own tokenizer's statistics")
    for key, value in (("n_samples", n_samples), ("max_length", max_length)):
        if value is not None and card.get(key) != value:
            raise StatsError(f"statistics at {where!r} were computed with {key}="
                             f"{card.get(key)!r}, not the requested {value!r}; request "
                             f"{key}={card.get(key)!r} or compute statistics with your setting")
    if dtype is not None and dtype not in _DTYPES:
        raise StatsError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    out: dict[int, torch.Tensor] = {}
    try:
        with safe_open(str(root / STATS_TENSORS), framework="pt") as f:
            for layer in wanted:
                out[layer] = f.get_tensor(f"layer.{layer}")
    except Exception as exc:  # missing, truncated or not safetensors
        raise StatsError(f"the statistics tensors {str(root / STATS_TENSORS)!r} cannot be read "
                         f"({type(exc).__name__}: {exc}); export the statistics again") from None
    for layer, c in out.items():
        if (card.get("sha256") or {}).get(f"layer.{layer}") != _tensor_sha(c):
            raise StatsError(f"the tensor of layer {layer} at {where!r} does not match the "
                             "card's SHA-256 (damaged or altered); export the statistics again")
    logger.info("statistics of layers %s loaded from %s (%s)", wanted, where,
                (card.get("text_source") or {}).get("description"))
    return {layer: c.to(_DTYPES[dtype]) if dtype else c for layer, c in out.items()}
